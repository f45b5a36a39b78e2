"""qwen/families.py: the model families the code runs, and a model of any of them with random weights.

    net = random_init(tokenizer, image_processor, family="qwen3_vl", text_layers=4, hidden=192, heads=6, kv_heads=3)
    net.config.model_type   # "qwen3_vl": the FAMILIES key of any loaded model

qwen/tiny.py builds its tiny models with random_init, and bench.py the Qwen2-VL-2B architecture (the defaults).
"""
import torch
import transformers
from transformers import AutoModelForImageTextToText

from model import STOP_TOKENS, VISION_TOKENS


# Families the code is tested with (tiny random configs on CPU); their text decoders share one layout
# apart from the marked differences, and all use the same vision special tokens and 3-D M-RoPE.
FAMILIES = {
    "qwen2_vl": "Qwen2-VL",        # the paper's model; ViT patch 14
    "qwen2_5_vl": "Qwen2.5-VL",    # windowed ViT, patch 14
    "qwen3_vl": "Qwen3-VL",        # patch 16, q/k RMS-norm, interleaved M-RoPE, deepstack visual features
    "qwen3_5": "Qwen3.5",          # patch 16, hybrid decoder: linear-attention (gated delta) + gated attention layers
}


def random_init(tokenizer, image_processor, seed=0, family="qwen2_vl", text_layers=28, hidden=1536, heads=12,
                kv_heads=2, mlp=8960, vision_depth=32, vision_dim=1280, vision_heads=16, vision_mlp_ratio=4,
                rope_theta=1e6, model_vocab=None, tie_embeddings=True):
    """A model of `family` and the given size with random weights (deterministic for a seed); the defaults
    are Qwen2-VL-2B's published architecture. `model_vocab` None: the tokenizer's size; `tie_embeddings`
    False: an LM head of its own (Qwen2-VL-7B). It saves with
    `save_pretrained` into a directory that plain transformers loads back."""
    if family not in FAMILIES:
        raise ValueError(f"model family {family!r}: expected one of {sorted(FAMILIES)}")
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS + STOP_TOKENS}
    head_dim = hidden // heads
    half = head_dim // 2 if family != "qwen3_5" else head_dim // 8   # Qwen3.5 rotates a quarter of each head
    quarter = half // 4                        # M-RoPE splits the rotary half into (t, h, w) ≈ 1/4, 3/8, 3/8
    sections = [half - 2 * ((half - quarter) // 2), (half - quarter) // 2, (half - quarter) // 2]
    text = dict(vocab_size=model_vocab or len(tokenizer), hidden_size=hidden, intermediate_size=mlp,
                num_hidden_layers=text_layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                max_position_embeddings=32768, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                pad_token_id=ids["<|endoftext|>"],
                rope_parameters={"rope_type": "default", "rope_theta": rope_theta, "mrope_section": sections})
    vision = dict(depth=vision_depth, num_heads=vision_heads, patch_size=image_processor.patch_size,
                  spatial_merge_size=image_processor.merge_size, temporal_patch_size=2)
    if family == "qwen2_vl":
        vision.update(embed_dim=vision_dim, hidden_size=hidden, mlp_ratio=vision_mlp_ratio)
    else:
        vision.update(hidden_size=vision_dim, intermediate_size=vision_dim * vision_mlp_ratio, out_hidden_size=hidden)
    if family == "qwen2_5_vl":
        vision.update(window_size=4 * image_processor.patch_size * image_processor.merge_size,
                      fullatt_block_indexes=[vision_depth - 1])
    if family in ("qwen3_vl", "qwen3_5"):
        text.update(head_dim=head_dim)
        text["rope_parameters"]["mrope_interleaved"] = True
        vision.update(num_position_embeddings=256)
    if family == "qwen3_vl":
        vision.update(deepstack_visual_indexes=list(range(min(3, vision_depth))))
    if family == "qwen3_5":   # one gated-attention layer after every three linear-attention ones, as released
        text["rope_parameters"]["partial_rotary_factor"] = 0.25
        text.update(layer_types=["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(text_layers)],
                    linear_num_key_heads=heads // 2, linear_num_value_heads=heads, linear_key_head_dim=head_dim,
                    linear_value_head_dim=head_dim)
    config = transformers.AutoConfig.for_model(
        family, text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=tie_embeddings)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(config)
    model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    return model

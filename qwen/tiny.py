"""qwen/tiny.py: the tiny test models, one per family, and the tokenizer they share; nothing is downloaded.

    policy, tokenizer, image_processor = model.load("tiny", build=builder("tiny"))    # or load_tiny(family=...)

A tiny model is a real architecture of its family (`families.random_init`) with random weights,
2.5M parameters, sized for the toy task of toy/task.py: the image is a grid of 28-px cells, one
merged visual token each. The tokenizer is a byte-level BPE trained here on the toy task's
vocabulary, with Qwen's special tokens and the prompt's fixed text as whole tokens.
"""
import functools, json, os

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from model import CHAT_TEMPLATE, PLAIN_INSTRUCTION, R1VL_INSTRUCTION, SPECIAL_TOKENS, SYSTEM, set_pixel_range
from qwen.families import random_init

# Patch 14 and merge 2 as in the real model, so one visual token covers a 28x28 pixel cell.
TINY = dict(text_layers=4, hidden=192, heads=6, kv_heads=3, mlp=384, vision_depth=4, vision_dim=128,
            vision_heads=4, vision_mlp_ratio=2, rope_theta=10000.0)
VOCAB_SIZE = 1024
MIN_TOKENS, MAX_TOKENS = 4, 64   # visual tokens per image: 2x2 to 8x8 cells
# The tiny models by name (`--model tiny-qwen3-vl`), one per supported family: the same size and tokenizer.
TINY_MODELS = {"tiny": "qwen2_vl", "tiny-qwen2.5-vl": "qwen2_5_vl", "tiny-qwen3-vl": "qwen3_vl", "tiny-qwen3.5": "qwen3_5"}


def builder(name):
    """What `model.load(name, build=...)` builds for a tiny model's name; None for any other name (a checkpoint)."""
    return functools.partial(load_tiny, family=TINY_MODELS[name]) if name in TINY_MODELS else None


def is_tiny(name):
    """Whether `name` is a tiny model: one by name, or a folder a tiny model was saved to (a run's warmup/ or final/),
    known by its config's text trunk (TINY's width, depth and MLP: no released Qwen model is that small)."""
    if name in TINY_MODELS:
        return True
    try:
        with open(os.path.join(os.path.expanduser(name), "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return False
    text = (config.get("text_config") or config) if isinstance(config, dict) else None
    return isinstance(text, dict) and [text.get(k) for k in ("hidden_size", "num_hidden_layers", "intermediate_size")] == [
        TINY["hidden"], TINY["text_layers"], TINY["mlp"]]

# Qwen3-VL's and Qwen3.5's chat formats (the released templates, reduced to what the prompts here use): no
# default system turn; Qwen3.5 thinks unless told not to, and then closes an empty think block in the prompt.
_TURNS = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
          "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for c in message['content'] %}"
          "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}"
          "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}")
CHAT_TEMPLATES = {
    "qwen3_vl": _TURNS + "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    "qwen3_5": _TURNS + "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and "
                        "not enable_thinking %}<think>\n\n</think>\n\n{% else %}<think>\n{% endif %}{% endif %}"}


def load_tiny(seed=0, family="qwen2_vl", **arch):
    """(model, tokenizer, image_processor): the TINY model of `family` with random weights (`arch` overrides it).
    Qwen3-VL and Qwen3.5 see 16-px patches, so their cells are resized to 32 px: one merged token each still."""
    patch = 14 if family in ("qwen2_vl", "qwen2_5_vl") else 16
    image_processor = Qwen2VLImageProcessorPil(patch_size=patch, merge_size=2)
    set_pixel_range(image_processor, MIN_TOKENS, MAX_TOKENS)
    tk = tokenizer(qwen_split=family == "qwen3_5")
    tk.chat_template = CHAT_TEMPLATES.get(family, tk.chat_template)    # Qwen2/2.5-VL: model.CHAT_TEMPLATE
    return random_init(tk, image_processor, seed, family, **{**TINY, **arch}), tk, image_processor


PHRASES = [SYSTEM, R1VL_INSTRUCTION.split("{question}")[0], "### Image Description:", "### Rationales:",
           "### Let's think step by step.", "### Step", "### The final answer is:", "\n\n"]


# How Qwen's tokenizers cut text before BPE (digits one by one); transformers rebuilds Qwen3.5's tokenizer
# with it whatever the saved one says, so the tiny Qwen3.5's tokenizer is trained with it too.
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def tokenizer(vocab_size=VOCAB_SIZE, qwen_split=False):
    """Byte-level BPE (any text encodes) trained on a small built-in corpus, with Qwen2-VL's special tokens
    and the toy task's fixed text (PHRASES) as whole tokens; `qwen_split`: Qwen3.5's pre-tokenizer."""
    words = ("the a of and to is in are how many which what more than fewer most least each total sum "
             "difference cells cell row column grid colour color red green blue yellow white black count "
             "counts there image shows question answer compare number numbers equal plus minus times "
             "so then first second third last step steps option options because need we add subtract "
             "double twice largest find not has")
    colours = "red green blue yellow white black".split()
    # Line-start and capitalised forms too (byte-level BPE never merges across a space or newline), so
    # "Row", "Count", "How" and a colour opening a line are one token each, as in the toy task's text.
    lines = ["\n".join("How Which What Are Count Counting Row Choices system user assistant".split()),
             " ".join(f"Row {r}: {a}, {b}, {c}." for r in range(1, 4) for a, b, c in zip(colours, colours[1:], colours[2:])),
             "\n".join(f"{c} = {n}" for c in colours for n in range(10))]
    corpus = [R1VL_INSTRUCTION.format(question=words), PLAIN_INSTRUCTION.format(question=words), SYSTEM, words,
              "### Image Description:\n### Rationales:\n### Let's think step by step.\n"
              "### The final answer is: ", " ".join(f"### Step {i}:" for i in range(1, 10)),
              " ".join(f"{a} + {b} = {a + b}. {a} - {b} = {a - b}. {a} x {b} = {a * b}."
                       for a in range(13) for b in range(13)), "A B C D E (A) (B) (C) (D) Yes No yes no", *lines]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if qwen_split:
        tk.normalizer = normalizers.NFC()
        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
                                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(corpus * 3, trainer)
    # The prompt's fixed text and the section headers become one token each (matched before BPE), so a
    # tiny model spends its compute on the content: a toy sample is ~100 tokens instead of ~200.
    tk.add_tokens([AddedToken(t, normalized=False) for t in PHRASES])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        additional_special_tokens=SPECIAL_TOKENS[1:], padding_side="left")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer

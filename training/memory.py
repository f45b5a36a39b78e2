"""training/memory.py: the bytes per GPU a StepGRPO step keeps resident, counted exactly on models built on the
meta device (no RAM needed) by the code train.py runs: load_model's dtypes, lora.add_adapters, freeze_vision,
model.inference_copy, rollout's KV cache shape.

    python bench.py --memory          # the table for the Qwen2-VL-2B and -7B architectures

Counted per rank (rank 0, the largest shard): weights; gradients and AdamW's two moments of what trains (its
per-tensor step counters live on the CPU); the RL reference; the bf16 sampling copy; the static KV cache of the
paper's step (1 prompt x 4 accumulation x M = 4 = 16 rows of 1,024 new tokens after a 640x480 image); under
FSDP, the weights one forward holds gathered at a time (the root's and the largest block's). FSDP2 splits
every tensor along dim 0 into `world` equal, padded rows. Not counted: activations, logits, allocator caches
and the CUDA context, which only a run on a GPU measures (bench.py's peak_memory_gib).
"""
import argparse
import math

import torch
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

import model as M
import rollout
from qwen import families, tiny
from training import lora, parallel

# The published architectures (their config.json): the 2B is random_init's default; the 7B's own LM head.
ARCHITECTURES = {"Qwen2-VL-2B": dict(model_vocab=151936),
                 "Qwen2-VL-7B": dict(text_layers=28, hidden=3584, heads=28, kv_heads=4, mlp=18944, model_vocab=152064,
                                     tie_embeddings=False)}
SETUPS = [("full, data parallel", dict(), 1), ("--fsdp, 2 ranks", dict(fsdp=True), 2),
          ("--fsdp, 4 ranks", dict(fsdp=True), 4), ("--fsdp, 8 ranks", dict(fsdp=True), 8),
          ("--freeze_vision", dict(freeze_vision=True), 1), ("--lora_rank 64", dict(lora_rank=64), 1)]
ROWS, NEW_TOKENS, IMAGE = 16, 1024, (640, 480)
PROMPT_TEXT_TOKENS = 128       # an estimate: chat template, the R1-VL instruction and a question (Qwen tokenizer)


def meta_model(architecture):
    _, tokenizer, image_processor = tiny.load_tiny()
    with torch.device("meta"):
        return families.random_init(tokenizer, image_processor, **ARCHITECTURES[architecture]).float()


def shard_bytes(q, world):
    rows = math.ceil(q.shape[0] / world) if q.dim() else 1
    return rows * (q[0].numel() if q.dim() else 1) * q.element_size()


def prompt_tokens(image_processor_patch=14, merge=2):
    """The 640x480 image's merged visual tokens at the paper's pixel range, plus the estimated text."""
    unit = image_processor_patch * merge
    h, w = smart_resize(IMAGE[1], IMAGE[0], factor=unit, min_pixels=round(M.MIN_TOKENS * unit ** 2),
                        max_pixels=round(M.MAX_TOKENS * unit ** 2))
    return h * w // unit ** 2 + PROMPT_TEXT_TOKENS


def kv_cache_bytes(net):
    text = net.config.get_text_config()
    length = -(-(prompt_tokens() + NEW_TOKENS) // rollout.CACHE_ROUND) * rollout.CACHE_ROUND
    rows, head_dim = rollout.padded_rows(ROWS), text.hidden_size // text.num_attention_heads
    keys = text.num_hidden_layers * rows * text.num_key_value_heads * length * head_dim * 2     # bf16
    return 2 * keys + rows * length + 8 * length                                                # + valid, slots


def reference_bytes(architecture, fsdp, world):
    """train.load_reference under bf16 autocast: whole, with its matmul weights in bf16 (the sampling copy's
    layout); under FSDP sharded like the policy, in fp32."""
    ref = meta_model(architecture)
    if fsdp:
        return sum(shard_bytes(q, world) for q in ref.parameters())
    return sum(q.numel() * q.element_size() for q in M.inference_copy(ref, torch.bfloat16).parameters())


def account(architecture, lora_rank=0, freeze_vision=False, fsdp=False, world=1):
    """{part: bytes on one GPU} for one setup of train.py (see the module docstring)."""
    args = argparse.Namespace(lora_rank=lora_rank, lora_alpha=None, lora_dropout=0.0, lora_targets="language",
                              freeze_vision=freeze_vision)
    net = meta_model(architecture)
    if freeze_vision:
        lora.freeze_vision(net)
    if lora_rank:
        net = lora.add_adapters(net, args, torch.bfloat16)
    params = list(net.parameters())                                       # tied weights once
    trained = [q for q in params if q.requires_grad]
    n = 1 if not fsdp else world
    out = dict(weights=sum(shard_bytes(q, n) for q in params),
               gradients=sum(shard_bytes(q, n) for q in trained),
               optimizer=2 * sum(shard_bytes(q, n) for q in trained),
               reference=0 if lora_rank else reference_bytes(architecture, fsdp, n),
               sampling_copy=0 if lora_rank else sum(q.numel() * q.element_size()   # LoRA samples from the policy
                                                     for q in M.inference_copy(net, torch.bfloat16).parameters()),
               kv_cache=kv_cache_bytes(net))
    if fsdp:
        blocks = parallel.blocks(net)
        in_blocks = {id(q) for b in blocks for q in b.parameters()}
        root = sum(q.numel() * q.element_size() for q in params if id(q) not in in_blocks)
        out["fsdp_gathered"] = root + max(sum(q.numel() * q.element_size() for q in b.parameters()) for b in blocks)
    out["total"] = sum(out.values())
    out["params"] = sum(q.numel() for q in params)
    return out


def table(architecture):
    """Lines of the GiB table for one architecture, a column per setup."""
    columns = [(name, account(architecture, world=world, **flags)) for name, flags, world in SETUPS]
    parts = ["weights", "gradients", "optimizer", "reference", "sampling_copy", "kv_cache", "fsdp_gathered", "total"]
    lines = [f"{architecture} ({columns[0][1]['params']:,} parameters): GiB per GPU, the paper's step "
             f"({ROWS} rows x {NEW_TOKENS} new tokens after a {prompt_tokens()}-token prompt)",
             f"{'':<16}" + "".join(f"{name:>22}" for name, _ in columns)]
    for part in parts:
        lines.append(f"{part:<16}" + "".join(f"{c.get(part, 0) / 2 ** 30:>22.2f}" for _, c in columns))
    lines.append(f"{'CUDA peak':<16}" + "".join(f"{'needs a GPU run':>22}" for _ in columns))
    return lines, columns

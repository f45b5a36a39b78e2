"""training/memory.py: the bytes per GPU a StepGRPO step needs at its peak, counted on models built on the meta
device by the code train.py runs: load_model's dtypes and FSDP units, lora.add_adapters, freeze_vision,
sampling_copy.inference_copy, rollout's KV cache shape; activations are counted by running one block of each kind
on the CPU at the model's width (the whole table: ~50 s and ~1.3 GB of RAM at most on a 2-core CPU).

    python bench.py --memory          # the table for the Qwen2-VL-2B and -7B architectures

Counted per rank (rank 0, the largest shard) for the paper's RL step: 1 prompt x 4 accumulation x M = 4 =
16 rows of 1,024 new tokens after a 640x480 image, scored in micro-batches of 4 rows (train.py's defaults):

    weights, gradients, optimizer   fp32 master weights; gradients and AdamW's two moments of what trains
    step_transient                  the largest gradient's square (clip_gradients); AdamW is fused on CUDA
    reference, sampling_copy        the RL reference and the bf16 copy rollouts are sampled from
    kv_cache                        the static cache of the 16 rows (while sampling)
    fsdp_gathered                   the root's fp32 weights and two blocks' (one computing, one prefetched)
    autocast_casts                  bf16 casts of the trained matmul weights, which autocast caches for the
                                    forward and autograd keeps for the backward (none under FSDP's mixed precision)
    activations(_checkpointed)      what autograd saves for one micro-batch, without and with
                                    --gradient_checkpointing, and the LM head's chunk in its backward

The peak is the largest of three moments: sampling (resident + KV cache), the update (resident + gradients +
gathered weights + casts + one micro-batch's activations: summed, an upper bound) and the optimizer step
(resident + gradients + step transient); resident = weights + optimizer + reference + sampling copy. Not
counted: the allocator's cache and fragmentation, the CUDA context, NCCL buffers; CUDA's attention kernels
may save a little more or less than the CPU's the probe runs (an estimate there). tests/test_memory.py
checks the count against a measured CPU peak of a scaled-down model.
"""
import argparse
import copy
import math

import torch
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

import model as M
import rollout
from qwen import families, tiny
from training import lora, parallel, sampling_copy

# The published architectures (their config.json): the 2B is random_init's default; the 7B's own LM head.
ARCHITECTURES = {"Qwen2-VL-2B": dict(model_vocab=151936),
                 "Qwen2-VL-7B": dict(text_layers=28, hidden=3584, heads=28, kv_heads=4, mlp=18944, model_vocab=152064,
                                     tie_embeddings=False)}
SETUPS = [("full, data parallel", dict(), 1), ("--fsdp, 2 ranks", dict(fsdp=True), 2),
          ("--fsdp, 4 ranks", dict(fsdp=True), 4), ("--fsdp, 8 ranks", dict(fsdp=True), 8),
          ("--freeze_vision", dict(freeze_vision=True), 1), ("--lora_rank 64", dict(lora_rank=64), 1)]
ROWS, NEW_TOKENS, IMAGE, MICRO_BATCH = 16, 1024, (640, 480), 4
PROMPT_TEXT_TOKENS = 128       # an estimate: chat template, the R1-VL instruction and a question (Qwen tokenizer)
HEAD_CHUNK = 256               # model.completion_logprobs' rows of fp32 log-softmax at a time
PROBED = {}                    # per_token's counts, by setup
PARTS = ["weights", "gradients", "optimizer", "step_transient", "reference", "sampling_copy", "kv_cache",
         "fsdp_gathered", "autocast_casts", "activations", "activations_checkpointed"]


def meta_model(architecture):
    """The model on the meta device: a name in ARCHITECTURES, or random_init's keyword arguments."""
    _, tokenizer, image_processor = tiny.load_tiny()
    arch = ARCHITECTURES[architecture] if isinstance(architecture, str) else architecture
    with torch.device("meta"):
        return families.random_init(tokenizer, image_processor, **arch).float()


def nbytes(tensors, world=1):
    return sum(shard_bytes(q, world) for q in tensors)


def shard_bytes(q, world):
    rows = math.ceil(q.shape[0] / world) if q.dim() else 1
    return rows * (q[0].numel() if q.dim() else 1) * q.element_size()


def image_patches(patch=14, merge=2):
    """The 640x480 image's patches at the paper's pixel range (merge x merge patches make one visual token)."""
    unit = patch * merge
    h, w = smart_resize(IMAGE[1], IMAGE[0], factor=unit, min_pixels=round(M.MIN_TOKENS * unit ** 2),
                        max_pixels=round(M.MAX_TOKENS * unit ** 2))
    return h * w // patch ** 2


def prompt_tokens():
    """The image's merged visual tokens plus the estimated text."""
    return image_patches() // 4 + PROMPT_TEXT_TOKENS


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
        return nbytes(ref.parameters(), world)
    return nbytes(sampling_copy.inference_copy(ref, torch.bfloat16).parameters())


def matmul_weights(module, skip=()):
    """The parameters of module's Linear and convolution layers (those autocast casts), `skip` excepted."""
    return [q for m in module.modules() if M.is_matmul(m) and m not in skip for q in m.parameters(recurse=False)]


def saved_bytes(fn, exclude):
    """Bytes of the distinct storages autograd saves for backward while fn() runs, `exclude`'s storages aside."""
    own, seen = {t.untyped_storage().data_ptr() for t in exclude}, {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in own:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def probe(module, hidden, **kwargs):
    """Bytes autograd saves for one forward of `module` (a meta-device block) on `hidden`, run on the CPU under
    bf16 autocast with its matmul weights in bf16 (their casts are counted apart: autocast_casts) and its other
    weights as trained. Weight values change no size: they are random."""
    module = copy.deepcopy(module)
    for m in module.modules():
        if M.is_matmul(m):
            m.to(torch.bfloat16)
    module.to_empty(device="cpu")
    with torch.no_grad():
        for q in module.parameters():
            q.normal_(0, 0.02)
    extra = [t for v in kwargs.values() for t in (v if isinstance(v, tuple) else (v,)) if torch.is_tensor(t)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return saved_bytes(lambda: module(hidden.requires_grad_(), **kwargs), [*module.parameters(), *extra])


def per_token(architecture, lora_rank=0, freeze_vision=False, n=128):
    """Bytes saved per token by one text layer and the final norm, per patch by one vision block and (per
    patch) the merger: each probed on n tokens (once per setup)."""
    key = repr((architecture, lora_rank, freeze_vision, n))
    if key not in PROBED:
        PROBED[key] = probe_blocks(architecture, lora_rank, freeze_vision, n)
    return PROBED[key]


def probe_blocks(architecture, lora_rank, freeze_vision, n):
    net = policy_model(architecture, lora_rank, freeze_vision)
    text, vision = net.model.language_model, net.model.visual
    hidden = text.config.hidden_size
    x = torch.randn(1, n, hidden)
    position = torch.arange(n)[None].expand(3, 1, n)
    cos, sin = type(text.rotary_emb)(config=text.config)(x, position)
    layer = probe(text.layers[0], x, attention_mask=None, position_ids=position, position_embeddings=(cos, sin))
    out = dict(layer=layer / n, norm=probe(text.norm, x) / n, block=0.0, merger=0.0)
    trains = lambda m: any(q.requires_grad for q in m.parameters())
    if trains(vision.blocks[0]):
        dim, heads = vision.blocks[0].norm1.weight.shape[0], vision.config.num_heads
        v = torch.randn(n, dim, dtype=torch.bfloat16)          # the vision tower's residual stream under autocast
        pos = (torch.ones(n, dim // heads), torch.zeros(n, dim // heads))
        out["block"] = probe(vision.blocks[0], v, cu_seqlens=torch.tensor([0, n], dtype=torch.int32),
                             position_embeddings=pos) / n
    if trains(vision.merger):
        out["merger"] = probe(vision.merger, torch.randn(n, vision.blocks[0].norm1.weight.shape[0],
                                                         dtype=torch.bfloat16)) / n
    return out


def activation_bytes(architecture, rows, prompt, completion, patches, checkpointing, lora_rank=0, freeze_vision=False):
    """What one forward of `rows` rows (each `prompt` + `completion` tokens, one image of `patches` patches) saves
    for its backward: the probed layers, the final norm and merger, the bf16 pixels the patch embedding keeps,
    the completion positions' hidden states, and three fp32 [chunk x vocabulary] tensors of the LM head's chunk
    in the backward. With checkpointing each layer keeps only its input (fp32 text residual, bf16 vision
    residual) and one layer at a time is recomputed in full."""
    p = per_token(architecture, lora_rank, freeze_vision)
    net = meta_model(architecture)
    text, vision = net.config.get_text_config(), net.config.vision_config
    tokens, image = rows * (prompt + completion), rows * patches
    dim = net.model.visual.blocks[0].norm1.weight.shape[0]
    if checkpointing:
        layers = text.num_hidden_layers * tokens * text.hidden_size * 4 + max(p["layer"] * tokens, p["block"] * image)
        layers += vision.depth * image * dim * 2 if p["block"] else 0
    else:
        layers = text.num_hidden_layers * p["layer"] * tokens + vision.depth * p["block"] * image
    pixels = image * vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2 * 2 if p["block"] else 0
    head = rows * completion * text.hidden_size * 4 + 3 * min(HEAD_CHUNK, rows * completion) * text.vocab_size * 4
    return round(layers + p["norm"] * tokens + p["merger"] * image + pixels + head)


def policy_model(architecture, lora_rank=0, freeze_vision=False):
    """The policy as load_model builds it (on the meta device), before any sharding."""
    net = meta_model(architecture)
    if freeze_vision:
        lora.freeze_vision(net)
    if lora_rank:
        args = argparse.Namespace(lora_rank=lora_rank, lora_alpha=None, lora_dropout=0.0, lora_targets="language",
                                  freeze_vision=freeze_vision)
        net = lora.add_adapters(net, args, torch.bfloat16)
    return net


def account(architecture, lora_rank=0, freeze_vision=False, fsdp=False, world=1, rows=MICRO_BATCH,
            prompt=None, completion=NEW_TOKENS, patches=None):
    """{part: bytes on one GPU} for one setup of train.py under bf16 (see the module docstring), with "peak"
    and "peak_checkpointed" (without and with --gradient_checkpointing) and "params"."""
    net = policy_model(architecture, lora_rank, freeze_vision)
    params = list(net.parameters())                                       # tied weights once
    trained = [q for q in params if q.requires_grad]
    n = world if fsdp else 1
    in_blocks = {id(q) for b in parallel.blocks(net) for q in b.parameters()}
    cast = [q for q in matmul_weights(net, skip=[net.lm_head]) if q.requires_grad    # the LM head runs in fp32
            and not (fsdp and id(q) in in_blocks)]                       # FSDP gathers those already in bf16
    out = dict(weights=nbytes(params, n), gradients=nbytes(trained, n), optimizer=2 * nbytes(trained, n),
               step_transient=max(shard_bytes(q, n) for q in trained),
               reference=0 if lora_rank else reference_bytes(architecture, fsdp, n),
               sampling_copy=0 if lora_rank else nbytes(sampling_copy.inference_copy(net, torch.bfloat16).parameters()),   # LoRA samples from the policy
               kv_cache=kv_cache_bytes(net), fsdp_gathered=0, autocast_casts=sum(q.numel() * 2 for q in cast))
    if fsdp:
        root = sum(q.numel() * q.element_size() for q in params if id(q) not in in_blocks)
        matmul = {id(q) for q in matmul_weights(net)}
        out["fsdp_gathered"] = root + 2 * max(sum(q.numel() * (2 if id(q) in matmul else 4) for q in b.parameters())
                                              for b in parallel.blocks(net))
    shape = dict(rows=rows, prompt=prompt or prompt_tokens(), completion=completion, patches=patches or image_patches(),
                 lora_rank=lora_rank, freeze_vision=freeze_vision)
    out["activations"] = activation_bytes(architecture, checkpointing=False, **shape)
    out["activations_checkpointed"] = activation_bytes(architecture, checkpointing=True, **shape)
    resident = out["weights"] + out["optimizer"] + out["reference"] + out["sampling_copy"]
    update = resident + out["gradients"] + out["fsdp_gathered"] + out["autocast_casts"]
    others = [resident + out["kv_cache"], resident + out["gradients"] + out["step_transient"]]
    out["peak"] = max(update + out["activations"], *others)
    out["peak_checkpointed"] = max(update + out["activations_checkpointed"], *others)
    out["params"] = sum(q.numel() for q in params)
    return out


def table(architecture):
    """Lines of the GiB table for one architecture, a column per setup."""
    columns = [(name, account(architecture, world=world, **flags)) for name, flags, world in SETUPS]
    lines = [f"{architecture} ({columns[0][1]['params']:,} parameters): GiB per GPU, the paper's step "
             f"({ROWS} rows x {NEW_TOKENS} new tokens after a {prompt_tokens()}-token prompt; micro-batches of "
             f"{MICRO_BATCH} rows)",
             f"{'':<24}" + "".join(f"{name:>22}" for name, _ in columns)]
    for part in PARTS + ["peak", "peak_checkpointed"]:
        lines.append(f"{part:<24}" + "".join(f"{c[part] / 2 ** 30:>22.2f}" for _, c in columns))
    lines.append(f"{'CUDA peak':<24}" + "".join(f"{'needs a GPU run':>22}" for _ in columns))
    return lines, columns

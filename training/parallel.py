"""training/parallel.py: the multi-process pieces train.py uses: data parallel by explicit gradient
all-reduce, and FSDP2 sharding for models whose weights and optimizer state do not fit one GPU.

Data parallel (default under torchrun): every rank holds the whole model; after the backward
passes `sync_gradients` averages gradients. Written out instead of wrapping the model in DDP so
that (a) the loop can call the model's parts directly (chunked log-probs need the LM head weight),
(b) a parameter that got no gradient on a rank, e.g. the vision tower when a rank saw no image,
counts as zero instead of hanging DDP, and (c) accumulation needs no `no_sync`.

FSDP (`--fsdp`): every weight, gradient and AdamW state is split 1/world over ranks
(`torch.distributed.fsdp.fully_shard`): each text decoder layer and vision block is one unit, and the
root unit holds the rest (embeddings, LM head, norms, vision merger). A unit gathers its weights for
its forward and frees them right after (and again for backward), so at most one block is whole at a
time, beside the root's weights while a forward or backward runs. Ranks must therefore run the same
number of forwards: the loop pads micro-batch counts across ranks (`lockstep`), and sampling reads an
unsharded inference copy of the weights (model.py).
"""
import atexit
import os
import types

import torch
import torch.distributed as dist
from PIL import Image
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor

import model as M


def setup():
    """(distributed?, rank, world size, device) from torchrun's environment (gloo on CPU, NCCL on CUDA)."""
    if int(os.environ.get("RANK", -1)) == -1:
        return False, 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    atexit.register(close)       # every way out (an error, a stop, Ctrl-C) tears the group down before the
                                 # interpreter does: a group left to C++'s exit aborts ("terminate called ...")
    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
        torch.cuda.set_device(device)
    return True, dist.get_rank(), dist.get_world_size(), device


def close(finished=False):
    """Destroy the process group. A finished run first waits for every rank, so none tears down its side of
    the connections while another is still writing its last files or has a collective in flight."""
    if dist.is_available() and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def blocks(net):
    """The repeated blocks FSDP shards: text decoder layers and vision transformer blocks."""
    return [*net.model.language_model.layers, *net.model.visual.blocks]


def shard(net, param_dtype=None):
    """FSDP2's usual form: each block is a unit, and the root holds the rest (embeddings, LM head, norms,
    vision merger), so every trainable weight is a shard and AdamW sees only DTensors. Scoring
    (model.completion_logprobs) calls the trunk and reads the LM head's weight instead of the root's forward,
    so `score_tokens` is registered as a forward of the root: FSDP gathers the root's weights around it, again
    for its backward, and reduce-scatters their gradients.

    `reshard_after_forward=True` everywhere, the root included, which by default keeps its weights whole
    from forward to the end of backward: without a backward (the frozen reference) they would stay whole,
    and for the policy it bounds memory to one gathered block plus the root's weights while in use.

    With `param_dtype` (bf16 runs) FSDP's mixed precision gathers a block's matmul weights already cast (half
    the bytes), so autocast casts nothing and no bf16 copy of a block outlives its unit; gradients are
    reduced in fp32. The weights autocast would not cast (norms, and any other module's own parameters) get
    fp32 units of their own: a block then computes exactly what sampling_copy.inference_copy computes, the same bits
    under autocast as without FSDP. Such a module's own matmuls (Qwen3.5's gated delta net reads its conv
    weight directly) stay in its fp32 unit, cast by autocast. The root stays fp32 (embeddings, LM head)."""
    mixed = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    for block in blocks(net):
        if param_dtype is not None:
            for module in full_precision_parts(block):
                fully_shard(module, reshard_after_forward=True)
        fully_shard(block, reshard_after_forward=True, mp_policy=mixed)     # param_dtype None: plain fp32
    fully_shard(net, reshard_after_forward=True)
    net.score_tokens = types.MethodType(M.score_tokens, net)
    register_fsdp_forward_method(net, "score_tokens")
    return net


def full_precision_parts(block):
    """The modules inside a block that own weights autocast leaves in fp32 (norms; a gated delta net's
    decay and bias), innermost first, so that each becomes its own unit before the one around it."""
    return [m for m in reversed(list(block.modules())) if m is not block and not M.is_matmul(m)
            and any(True for _ in m.parameters(recurse=False))]


def placeholder_image():
    """A blank image for a weight-0 forward: under FSDP a rank whose samples were all skipped still has
    to take part in every block's gather."""
    return Image.new("RGB", (56, 56), "white")


def all_reduce(values, device, distributed, op="sum"):
    """`values` (a number, or a list of numbers or of lists) summed, or with op="max" maxed, over ranks: a float64
    tensor. Every collective of this code base goes through here or through FSDP: NCCL serves only CUDA tensors,
    so the tensor is made on the run's device, never on the host (tests/test_cuda_config.py)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if distributed:
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t


def lockstep(jobs, fsdp, distributed, device):
    """Under FSDP, pad this rank's list of micro-batch jobs to the longest across ranks by repeating
    its last job with weight 0, so every rank runs the same number of sharded forwards; a rank with no
    job at all gets weight-0 jobs of row 0 (of a placeholder rollout, setup.placeholder_rollout).
    Returns [(job, weight)]."""
    out = [(job, 1.0) for job in jobs]
    if not (fsdp and distributed):
        return out
    n = int(all_reduce(len(jobs), device, distributed, "max"))
    return out + [(jobs[-1] if jobs else [0], 0.0)] * (n - len(jobs))


def sync_gradients(params, world):
    """Average replicated gradients over ranks (data parallel); FSDP already reduce-scattered (and averaged) its
    shards. A parameter without a gradient gets zeros, so every rank reduces the same tensors."""
    for q in params:
        if q.grad is None:
            q.grad = torch.zeros_like(q)
        if world > 1 and not isinstance(q.grad, DTensor):
            dist.all_reduce(q.grad)
            q.grad /= world


def clip_gradients(params, max_norm):
    """Scale all gradients so their global L2 norm is at most max_norm; returns the norm before. Under FSDP
    every gradient is a shard: the squared norms add up as one partial sum, reduced over ranks once."""
    sq = sum(q.grad.float().pow(2).sum() for q in params if q.grad is not None)
    norm = float(sq.full_tensor() if isinstance(sq, DTensor) else sq) ** 0.5
    if norm > max_norm:
        for q in params:
            if q.grad is not None:
                q.grad.mul_(max_norm / (norm + 1e-6))
    return norm


def full_state(net, optimizer, fsdp):
    """(model, optimizer) state dicts with whole tensors (FSDP shards gathered onto rank 0's CPU)."""
    if not fsdp:
        return net.state_dict(), optimizer.state_dict() if optimizer else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    if optimizer is None:
        return get_model_state_dict(net, options=options), None
    return get_state_dict(net, optimizer, options=options)


def load_full_state(net, optimizer, model_state, optimizer_state, fsdp):
    if not fsdp:
        net.load_state_dict(model_state, strict=False)     # checkpoint.load checked: only frozen weights are missing
        optimizer.load_state_dict(optimizer_state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
    set_state_dict(net, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state,
                   options=StateDictOptions(full_state_dict=True, strict=False))


def global_means(lists, device, distributed):
    """{name: mean over every rank's values} for a dict of per-sample value lists (NaN if none)."""
    sums = all_reduce([[sum(v), len(v)] for v in lists.values()], device, distributed)
    return {k: (s / n).item() if n else float("nan") for k, (s, n) in zip(lists, sums)}


def global_max(lists, device, distributed):
    """{name: max over every rank's values} for a dict of value lists (NaN if none)."""
    top = all_reduce([max(v, default=float("-inf")) for v in lists.values()], device, distributed, "max")
    return {k: x.item() if x > float("-inf") else float("nan") for k, x in zip(lists, top)}

"""training/sampling_copy.py: the copy of the policy that a bf16 (or FSDP) run samples from.

    sampler = inference_copy(policy, torch.bfloat16)     # once
    refresh_inference_copy(sampler, policy)              # after every optimizer step
"""
import torch
from torch.distributed.tensor import DTensor
from transformers import AutoModelForImageTextToText

from model import is_matmul


def inference_copy(policy, dtype=torch.bfloat16):
    """A separate, unsharded copy of `policy` to sample from, with its weights in the compute dtype.

    Sampling from the fp32 master weights under autocast casts every matrix to bf16 again at every
    decoded token; the copy holds them cast once. It holds in `dtype` exactly the weights autocast
    would cast (those of Linear and Conv layers, LM head excepted) and keeps embeddings, norms and
    the LM head in fp32, so under the same autocast it computes what the fp32 policy computes: the
    same bf16 matmuls, an fp32 residual stream and an fp32 LM head. Run it under that autocast.
    Keep it current with `refresh_inference_copy` after every optimizer step. A LoRA policy has none: its
    frozen base is held in this layout already and it samples through its own adapted layers (training/lora.py).
    """
    with torch.device("meta"):
        copy = AutoModelForImageTextToText.from_config(policy.config)
    for module in copy.modules():                          # cast while on meta: no fp32 copy is ever allocated
        if is_matmul(module) and module is not copy.lm_head:
            module.to(dtype)
    copy.to_empty(device=next(policy.parameters()).device).eval().requires_grad_(False)
    copy.tie_weights()                                     # to_empty gives tied weights separate storage
    with torch.no_grad():
        for name, buf in policy.named_buffers():           # rotary frequencies; never sharded
            copy.get_buffer(name).copy_(buf)
    copy.generation_config = policy.generation_config
    refresh_inference_copy(copy, policy)
    return copy


@torch.no_grad()
def refresh_inference_copy(copy, policy):
    """Copy the policy's current weights into `copy`, each cast to the copy's dtype for it: one
    device-side copy per tensor. FSDP2 shards (DTensors) are gathered first, a collective, so under
    FSDP every rank calls this at the same point."""
    target, source = dict(copy.named_parameters()), dict(policy.named_parameters())
    if target.keys() != source.keys():     # a LoRA policy samples through its own layers (training/lora.py)
        raise ValueError(f"inference copy and policy differ in parameters: {sorted(target.keys() ^ source.keys())[:5]}")
    for name, p in source.items():
        target[name].copy_(p.full_tensor() if isinstance(p, DTensor) else p)

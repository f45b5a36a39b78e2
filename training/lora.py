"""training/lora.py: what trains. LoRA adapters (peft) on a frozen base, and a frozen vision tower.

    python train.py --model Qwen/Qwen2-VL-2B-Instruct --lora_rank 64      # adapters on the text decoder's Linear layers
    python train.py --model Qwen/Qwen2-VL-2B-Instruct --freeze_vision     # full fine-tuning of the language model

LoRA (`--lora_rank R`): every targeted Linear layer W gets W + (alpha/R)·B·A with A [R, in], B [out, R]; B
starts at zero, so the adapted model starts as the base. The base is frozen and held in the layout of the
sampling copy (model.inference_copy): Linear and Conv weights in the compute dtype (bf16 on CUDA), embeddings,
norms and the LM head in fp32, so under autocast it computes what fp32 weights would. Adapters, their
gradients and AdamW state are fp32. The RL reference is the same model with its adapters off (`adapters_off`):
no second copy, and KL exactly 0 at step 0.

Sampling: where rollouts come from an inference copy (bf16 on CUDA), model.refresh_inference_copy writes the
merged weights W + (alpha/R)·B·A into it after each step, so the decode step and its CUDA graphs run plain
Linear layers (one matmul per projection instead of three) and full fine-tuning and LoRA share one sampler;
a merge costs one [out, R] x [R, in] product per layer per step, next to a rollout's thousands of decode
steps. In fp32 (CPU) the policy itself samples, its peft layers called by the decode step as they are.

`--freeze_vision`: the vision tower (patch embedding and ViT blocks) never trains, in both stages, with or
without LoRA: no gradients, no optimizer state, no all-reduce. Its merger, the MLP that projects visual
features into the language model's space, keeps training with full fine-tuning: it is the interface the
language model reads, as in LLaVA-style fine-tuning.
"""
import contextlib
import os

import torch
from safetensors.torch import save_file

TARGETS = {"language": ("model.language_model.",), "all": ("model.language_model.", "model.visual.")}


def add_flags(parser):
    g = parser.add_argument_group("what trains (training/lora.py)")
    g.add_argument("--lora_rank", type=int, default=0, help="LoRA adapters of this rank on a frozen base; 0 = full fine-tuning")
    g.add_argument("--lora_alpha", type=float, default=None, help="LoRA scale alpha (the update is alpha/rank·BA); default 2·rank")
    g.add_argument("--lora_dropout", type=float, default=0.0,
                   help="dropout on the adapters' input (0: the scored distribution is exactly the sampled one)")
    g.add_argument("--lora_targets", default="language", choices=sorted(TARGETS),
                   help="Linear layers that get adapters: the text decoder's, or also the vision tower's")
    g.add_argument("--freeze_vision", action="store_true", help="never train the vision tower (its merger trains)")


def vision_tower(net):
    """The vision tower's parameters that --freeze_vision freezes: all of model.visual but the merger(s)."""
    return [q for name, q in net.model.visual.named_parameters() if "merger" not in name]


def freeze_vision(net):
    for q in vision_tower(net):
        q.requires_grad_(False)
    return net


def add_adapters(net, args, dtype):
    """Freeze `net`, cast its base to the sampling copy's layout in `dtype`, and add fp32 LoRA adapters."""
    import peft
    if args.freeze_vision and args.lora_targets != "language":
        raise SystemExit("error: --freeze_vision with --lora_targets all: the vision tower would get adapters")
    for module in net.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.modules.conv._ConvNd)) and module is not net.lm_head:
            module.to(dtype)
    targets = [n for n, m in net.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith(TARGETS[args.lora_targets])]
    config = peft.LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha or 2 * args.lora_rank,
                             lora_dropout=args.lora_dropout, bias="none", target_modules=targets)
    net = peft.inject_adapter_in_model(config, net)       # in place; only the adapters keep requires_grad
    for name, q in net.named_parameters():
        if ".lora_" in name:
            q.data = q.data.float()
    return net


def layers(net):
    """The LoRA layers of `net` (peft's), by module name."""
    return [(name, m) for name, m in net.named_modules() if hasattr(m, "get_delta_weight") and hasattr(m, "base_layer")]


@contextlib.contextmanager
def adapters_off(net):
    """Compute with the base model (the RL reference); a no-op for a model without adapters."""
    found = [m for _, m in layers(net)]
    for m in found:
        m.enable_adapters(False)
    try:
        yield net
    finally:
        for m in found:
            m.enable_adapters(True)


def merged_state(net):
    """The plain architecture's state dict on CPU in fp32, LoRA layers merged: W + (alpha/R)·B·A. fp32, since a
    small update merged into bf16 weights would be rounded away."""
    out, seen = {}, {}
    for name, t in net.state_dict().items():
        if ".lora_" not in name:      # tied weights stay one tensor
            out[name.replace(".base_layer.", ".")] = seen.setdefault(id(t), t.detach().float().cpu())
    for name, m in layers(net):
        out[name + ".weight"] = out[name + ".weight"] + m.get_delta_weight("default").detach().float().cpu()
    return out


def save(directory, net):
    """`directory`: the merged model plain transformers loads; `directory`/adapter: the adapters in peft's format
    (`peft.PeftModel.from_pretrained(base, directory + "/adapter")`)."""
    import peft
    from transformers import AutoModelForImageTextToText
    with torch.device("meta"):
        plain = AutoModelForImageTextToText.from_config(net.config)
    plain.generation_config = net.generation_config
    plain.save_pretrained(directory, state_dict=merged_state(net))
    adapter = os.path.join(directory, "adapter")
    os.makedirs(adapter, exist_ok=True)
    net.peft_config["default"].save_pretrained(adapter)
    state = peft.get_peft_model_state_dict(net)
    save_file({"base_model.model." + k: v.detach().float().cpu().contiguous() for k, v in state.items()},
              os.path.join(adapter, "adapter_model.safetensors"))

"""training/lora.py: what trains. LoRA adapters (peft) on a frozen base, and a frozen vision tower.

    python train.py --model Qwen/Qwen2-VL-2B-Instruct --lora_rank 64      # adapters on the text decoder's Linear layers
    python train.py --model Qwen/Qwen2-VL-2B-Instruct --freeze_vision     # full fine-tuning of the language model

LoRA (`--lora_rank R`): every targeted Linear layer W gets W + (alpha/R)·B·A with A [R, in], B [out, R]; B
starts at zero, so the adapted model starts as the base. The base is frozen and held in the layout of the
sampling copy (sampling_copy.inference_copy): Linear and Conv weights in the compute dtype (bf16 on CUDA), embeddings,
norms and the LM head in fp32, so under autocast it computes what fp32 weights would. Adapters, their
gradients and AdamW state are fp32. The RL reference is the same model with its adapters off (`adapters_off`):
no second copy, and KL exactly 0 at step 0.

Sampling: the policy itself samples, in every dtype: the decode step calls its peft layers as they are (the base
matmul plus the unmerged adapters), so rollouts come from the layers the scorer differentiates, under the same
autocast, and the base is held once. (Merging (alpha/R)·B·A into a bf16 copy instead would round small updates
away and hold a second copy of the base.)

After a LoRA warm-up (`--stage both`) the RL stage starts from the warm-up's model: its adapters merged into the
base (warmup/), fresh adapters on top, the reference being that merged model. final/adapter applies to --model:
the warm-up's adapters and the RL ones side by side, one adapter of rank 2R (`chain_warmup`, `save`).

`--freeze_vision`: the vision tower (patch embedding and ViT blocks) never trains, in both stages, with or
without LoRA: no gradients, no optimizer state, no all-reduce. Its merger, the MLP that projects visual
features into the language model's space, keeps training with full fine-tuning: it is the interface the
language model reads, as in LLaVA-style fine-tuning.
"""
import contextlib
import copy
import json
import os

import torch
from safetensors.torch import save_file

import model as M

# LoRA's learning rates, set by --lora_rank unless given: ten times full fine-tuning's, the factor of published LoRA
# recipes for these models (EasyR1's RL: 1e-5 at rank 64), for the RL lr and the warm-up's (10 x setup.paper_sft_lr).
# Not measured here on a real model; the tiny models on the toy task have their own (toy.LORA_PRESET, measured).
RATES = dict(lr=1e-5)
SFT_LR_FACTOR = 10
TARGETS = {"language": ("model.language_model.",), "all": ("model.language_model.", "model.visual.")}


def add_flags(parser):
    g = parser.add_argument_group("what trains (training/lora.py)")
    g.add_argument("--lora_rank", type=int, default=0, help="LoRA adapters of this rank on a frozen base; 0 = full "
                   "fine-tuning. Sets LoRA's learning rates unless given (below)")
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
        if M.is_matmul(module) and module is not net.lm_head:
            module.to(dtype)
    targets = [n for n, m in net.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith(TARGETS[args.lora_targets])]
    config = peft.LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha or 2 * args.lora_rank,
                             lora_dropout=args.lora_dropout, bias="none", target_modules=targets)
    net = peft.inject_adapter_in_model(config, net)       # in place; only the adapters keep requires_grad
    for name, q in net.named_parameters():
        if ".lora_" in name:
            q.data = q.data.float()
    name = getattr(args, "model", None)
    net.lora_base = os.path.abspath(name) if name and os.path.isdir(name) else name   # the base save() names
    return net


def chain_warmup(net, start, base):
    """Keep the adapters a warm-up saved in `start`/adapter (they fit `base`, --model), so that save() writes the
    RL stage's adapters chained to them: an adapter for `base`, not for the merged warm-up `net` was loaded from."""
    from safetensors.torch import load_file
    adapter = os.path.join(start, "adapter")
    with open(os.path.join(adapter, "adapter_config.json")) as f:
        config = json.load(f)
    net.warmup_adapter = (config, load_file(os.path.join(adapter, "adapter_model.safetensors")))
    net.lora_base = config.get("base_model_name_or_path") or base


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


def adapter(net):
    """(peft config, {key: fp32 tensor}) of the adapter for the base named `net.lora_base` (--model). After a LoRA
    warm-up it is the warm-up's adapter (scale s1, rank R1) and this stage's (s2, R2) side by side: A = [A1; A2],
    B = [s1·B1, s2·B2], rank R1 + R2, alpha = rank (scale 1), so that B·A = s1·B1·A1 + s2·B2·A2 exactly."""
    import peft
    config = copy.deepcopy(net.peft_config["default"])
    config.base_model_name_or_path = getattr(net, "lora_base", None)
    state = {"base_model.model." + k: v.detach().float().cpu().contiguous()
             for k, v in peft.get_peft_model_state_dict(net).items()}
    if getattr(net, "warmup_adapter", None) is None:
        return config, state
    first, weights = net.warmup_adapter
    s1, s2 = first["lora_alpha"] / first["r"], config.lora_alpha / config.r
    for key in [k for k in state if ".lora_A." in k]:
        b = key.replace(".lora_A.", ".lora_B.")
        state[key] = torch.cat([weights[key], state[key]], 0)
        state[b] = torch.cat([s1 * weights[b], s2 * state[b]], 1)
    config.r = config.lora_alpha = first["r"] + config.r
    return config, state


def save(directory, net):
    """`directory`: the merged model plain transformers loads; `directory`/adapter: the adapter for --model in
    peft's format (`peft.PeftModel.from_pretrained(base, directory + "/adapter")`), its adapter_config.json naming
    that base (base_model_name_or_path)."""
    from transformers import AutoModelForImageTextToText
    with torch.device("meta"):
        plain = AutoModelForImageTextToText.from_config(net.config)
    plain.generation_config = net.generation_config
    plain.save_pretrained(directory, state_dict=merged_state(net))
    path = os.path.join(directory, "adapter")
    os.makedirs(path, exist_ok=True)
    config, state = adapter(net)
    config.save_pretrained(path)
    save_file(state, os.path.join(path, "adapter_model.safetensors"))

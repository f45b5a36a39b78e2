"""training/optim.py: the optimizer and its step, the same in both stages.

AdamW on the trainable weights with the stage's schedule (the warm-up: 3 % linear warm-up then cosine, as the
paper; StepGRPO: linear decay, no warm-up, as the official code), and a step that syncs gradients over ranks,
clips the global norm at 1 and skips an update whose loss or gradient is not finite.
"""
import math

import torch

import model as M
from training import parallel, sampling_copy


def make_optimizer(run, lr, weight_decay, steps, warmup_frac, cosine):
    """(AdamW on the trainable weights, its schedule over `steps`: warm-up then cosine, or linear decay).
    The fused kernel where CUDA's configuration runs (M.cuda_config, the CPU stand-in included): the batched
    (foreach) default would hold a transient as large as the trained fp32 weights."""
    opt = torch.optim.AdamW([q for q in run.policy.parameters() if q.requires_grad], lr=lr, weight_decay=weight_decay,
                            fused=True if M.cuda_config(run.device) else None)
    warm = max(1, int(warmup_frac * steps))

    def factor(s):  # SFT: warm-up then cosine (paper); RL: linear decay, no warm-up (official)
        if s < warm and warmup_frac > 0:
            return (s + 1) / warm
        frac = min(1.0, s / max(1, steps))
        return 0.5 * (1 + math.cos(math.pi * frac)) if cosine else 1.0 - frac
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def optimizer_step(run, optimizer, scheduler, loss_value):
    """Sync, clip and step, unless the loss (on some rank) or the global gradient norm is not finite: then the
    update is skipped and logged, so NaN never reaches the weights. Then refresh the sampler's copy of the
    weights. Returns the gradient norm before clipping."""
    bad = parallel.all_reduce(float(not math.isfinite(loss_value)), run.device, run.ddp)
    params = [q for q in run.policy.parameters() if q.requires_grad]
    parallel.sync_gradients(params, run.world)
    norm = parallel.clip_gradients(params, 1.0)          # the global norm: the same on every rank
    if bad or not math.isfinite(norm):
        run.skipped["nonfinite_loss"] += 1
        run.skipped_in_a_row += 1
        run.log.print(f"non-finite {'loss ' + str(loss_value) if bad else 'gradient norm ' + str(norm)}: update skipped")
    else:
        optimizer.step()
        run.skipped_in_a_row = 0
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    if run.sampler is not run.policy:
        sampling_copy.refresh_inference_copy(run.sampler, run.policy)
    return norm

"""The StepGRPO objective (R1-VL, arXiv 2503.12937, Eqs. 4-5). Pure torch.

    Â_i  = (r_i − mean_g r) / (std_g r + 1e-4)                       group of M completions (Eq. 4)
    ρ_t  = π_θ(o_t) / π_old(o_t),   KL_t = π_ref/π_θ − log(π_ref/π_θ) − 1    (k3 estimator)
    L    = −mean_i mean_t [ min(ρ_t Â_i, clip(ρ_t, 1−ε, 1+ε) Â_i) − β KL_t ]           (Eq. 5)

Choices and simplifications vs. the paper and the official code (TRL 0.14-era GRPO):
1. One gradient step per rollout batch (official): `old_logp=None` stands π_old in by
   stopgrad(π_θ), so ρ ≡ 1 in value, clipping never acts, and the gradient is Â·∇logπ_θ.
   Passing real `old_logp` turns on PPO clipping for several updates per batch (an option).
2. `norm="seq"` (official) averages each completion's own tokens, then completions;
   `norm="token"` (DAPO-style) divides the token sum by the token count, so long completions
   weigh more. Completions with no tokens add 0 and are left out of the sequence mean.
3. KL_t is the per-token k3 estimator (≥ 0, unbiased for KL(π_θ‖π_ref)); β = 0.04, β = 0 skips
   the reference model. Groups with identical rewards get Â = 0 exactly (only KL acts).
4. Sampling and scoring run different kernels (a bf16 inference copy, a cached decode), so the
   sampler's π_s differs slightly from the scored π_θ. `sampling_mismatch` measures it every step;
   `tis_cap` (off by default, as in the paper) weights each token's policy gradient by the
   truncated importance ratio min(π_θ/π_s, C) (Yao et al., 2025, "Your efficient RL framework
   secretly brings you off-policy RL training").
5. Options, each off by default (the paper's behaviour): the advantage scalings `centred_advantages`
   (Dr. GRPO) and `per_reward_advantages` (GDPO) beside Eq. 4; clip-higher (`clip_eps_high`, DAPO);
   per-token advantages from `step_credit` (this project's extension, not in the paper).
"""
import torch


def _groups(rewards, group_size):
    """rewards [B·M] -> ([B, M] view, [B] bool: the group's rewards are all identical)."""
    if rewards.dim() != 1 or group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards of shape {tuple(rewards.shape)} cannot be split into groups "
                         f"of {group_size}: expected a 1-D tensor of length B*group_size")
    g = rewards.view(-1, group_size)
    return g, (g == g[:, :1]).all(dim=1)


def group_advantages(rewards, group_size):
    """Eq. 4: Â_i = (r_i − mean_g) / (std_g + 1e-4), torch's unbiased std as the official code.

    `rewards` [B·M] is ordered group by group (M = group_size consecutive completions per
    prompt). Returns (advantages [B·M], fraction of groups whose rewards are all identical).
    Such groups get exactly 0. With group_size 1 the std is undefined: every advantage is 0
    and every group counts as identical.
    """
    g, same = _groups(rewards, group_size)
    if group_size == 1:
        return torch.zeros_like(rewards), 1.0
    adv = (g - g.mean(dim=1, keepdim=True)) / (g.std(dim=1, keepdim=True) + 1e-4)
    adv = torch.where(same.unsqueeze(1), torch.zeros_like(adv), adv)  # exact 0, no rounding
    return adv.reshape(-1), same.float().mean().item()


def centred_advantages(rewards, group_size):
    """Dr. GRPO (Liu et al., 2025, arXiv 2503.20783, "Understanding R1-Zero-like training"): Â_i = r_i − mean_g,
    no division by the group's std, so a group whose rewards differ by hundredths (α·k of Eq. 2 in an
    all-wrong group) gets advantages of hundredths, not ±1. Returns as group_advantages."""
    g, same = _groups(rewards, group_size)
    adv = torch.where(same.unsqueeze(1), torch.zeros_like(g), g - g.mean(dim=1, keepdim=True))
    return adv.reshape(-1), same.float().mean().item()


def per_reward_advantages(parts, group_size):
    """GDPO (Liu et al., 2026, arXiv 2601.05242, group reward-decoupled normalization; without its batch-wide
    renormalisation of the sum):
    Â_i = Σ_p (r_i^p − mean_g r^p) / (std_g r^p + 1e-4), each reward part (here StepRAR and StepRVR,
    the columns of `parts` [B·M, P]) z-scored within its group by Eq. 4, then summed; a part that
    is constant in a group adds 0. Returns (advantages, share of groups where every part is constant)."""
    adv = sum(group_advantages(parts[:, p].contiguous(), group_size)[0] for p in range(parts.shape[1]))
    same = torch.stack([_groups(parts[:, p].contiguous(), group_size)[1] for p in range(parts.shape[1])]).all(0)
    return adv, same.float().mean().item()


def scaled_advantages(rewards, group_size, scale="group_std", parts=None):
    """Advantages and zero-spread share by `scale` (train.py --adv_scale): "group_std" (Eq. 4, the paper),
    "none" (centred_advantages) or "per_reward" (per_reward_advantages of the reward `parts` [B·M, P])."""
    if scale == "per_reward":
        return per_reward_advantages(parts, group_size)
    return (group_advantages if scale == "group_std" else centred_advantages)(rewards, group_size)


def step_credit(advantages, matched, token_step, group_size, weight):
    """Per-step credit (this project's extension; the paper gives one advantage per completion):

        Â_{i,t} = Â_i + w · (m_{i,s} − mean_g m_{·,s})   for a token t inside the span where key step s matched,
        Â_{i,t} = Â_i                                     elsewhere,

    with m_{i,s} ∈ {0, 1} whether completion i matched key step s (StepRAR's match, Eq. 2). A matched step's
    tokens gain w·(1 − share of its group that matched it): a step every completion found adds nothing,
    a step only one found adds most, even when that completion's answer is wrong. (Unmatched steps have no
    tokens to carry their negative centred credit.) matched [B·M, S] (0/1, S padded with 0 columns);
    token_step [B·M, T] long: the key step whose span holds token t, −1 for none. Returns [B·M, T]."""
    m = matched.to(advantages.dtype).view(-1, group_size, matched.shape[1])
    credit = (m - m.mean(dim=1, keepdim=True)).reshape(matched.shape)
    on = token_step >= 0
    extra = torch.where(on, credit.gather(1, token_step.clamp(min=0)), torch.zeros((), dtype=credit.dtype))
    return advantages.unsqueeze(1) + weight * extra


def kl_k3(logp, ref_logp):
    """Per-token k3 estimator of KL(π_θ‖π_ref): exp(ref − logp) − (ref − logp) − 1 ≥ 0.

    Written expm1(d) − d: exp(d) − 1 in fp32 cancels to rounding noise when |d| is small (at |d| ≈ 1e-4 the
    true value, ≈ d²/2 = 5e-9, is below fp32's step near 1), and expm1 keeps it exact."""
    d = ref_logp - logp
    return torch.expm1(d) - d


def policy_loss(logp, old_logp, ref_logp, advantages, mask, beta=0.04, clip_eps=0.2,
                norm="seq", denom=None, sampler_logp=None, tis_cap=0.0, clip_eps_high=None):
    """Eq. 5: −mean[min(ρ_t Â, clip(ρ_t, 1−ε, 1+ε) Â) − β KL_t] over completion tokens.

    logp, old_logp, ref_logp, mask: [N, T]; mask (float or bool) is 1 for completion tokens up
    to and including the first EOS; advantages: [N], or per token [N, ≥T] (step_credit).
    `old_logp=None` means on-policy (ρ ≡ 1). `clip_eps_high` (clip-higher, DAPO: Yu et al., 2025, arXiv 2503.14476)
    makes the range [1−ε, 1+ε_high]; None: ε_high = ε.
    `ref_logp` may be None when beta == 0. norm: "seq" or "token" (module docstring, item 2).

    `denom`: the count to divide the summed objective by — completions with ≥ 1 token for
    "seq", tokens for "token". By default the local count (the local mean). Give the count over
    all micro-batches (divided by the world size under DDP, whose gradients are averaged) and
    the micro-batch losses add up to exactly the global mean.

    `sampler_logp` with `tis_cap` > 0: the policy-gradient term of each token is weighted by
    min(exp(logp − sampler_logp), tis_cap), detached (module docstring, item 4).

    Returns (loss, stats) with stats python floats: kl (mean per-token KL), clip_frac (share of
    tokens whose clipped branch is active, i.e. gets no gradient), of which clip_low_frac (ρ < 1−ε,
    Â < 0) and clip_high_frac (ρ > 1+ε_high, Â > 0), entropy (mean −log π_θ(o_t) over the sampled
    tokens: an unbiased estimate of the per-token entropy), ratio_min, ratio_max, adv_mean, n_tokens.
    """
    if norm not in ("seq", "token"):
        raise ValueError(f"unknown norm {norm!r}: use 'seq' (per completion) or 'token'")
    if beta and ref_logp is None:
        raise ValueError("ref_logp is None but beta != 0: pass reference log-probs or beta=0")
    mask = mask.to(logp.dtype)
    old_logp = logp.detach() if old_logp is None else old_logp
    adv = advantages.to(logp.dtype)
    adv = adv.unsqueeze(1) if adv.dim() == 1 else adv[:, :logp.shape[1]]
    high = clip_eps if clip_eps_high is None else clip_eps_high

    ratio = torch.exp(logp - old_logp)
    clipped = torch.clamp(ratio, 1 - clip_eps, 1 + high)
    objective = torch.min(ratio * adv, clipped * adv)
    if tis_cap:
        objective = objective * torch.exp(logp.detach() - sampler_logp).clamp(max=tis_cap)
    kl = kl_k3(logp, ref_logp) if beta else torch.zeros_like(logp)
    per_token = -(objective - beta * kl) * mask

    n_tok = mask.sum(dim=1)
    if norm == "seq":
        total = (per_token.sum(dim=1) / n_tok.clamp(min=1)).sum()  # empty rows add 0
        local = (n_tok > 0).sum()
    else:
        total, local = per_token.sum(), n_tok.sum()
    loss = total / (local.clamp(min=1) if denom is None else denom)

    with torch.no_grad():
        on = mask.bool()
        n = max(int(on.sum()), 1)
        low, up = (ratio < 1 - clip_eps) & (adv < 0) & on, (ratio > 1 + high) & (adv > 0) & on
        r = ratio[on] if on.any() else torch.ones(1)
        stats = {"kl": (kl * mask).sum().item() / n,
                 "clip_frac": (low | up).sum().item() / n, "clip_low_frac": low.sum().item() / n,
                 "clip_high_frac": up.sum().item() / n, "entropy": -(logp.detach() * mask).sum().item() / n,
                 "ratio_min": r.min().item(), "ratio_max": r.max().item(),
                 "adv_mean": advantages.float().mean().item(), "n_tokens": float(on.sum())}
    return loss, stats


@torch.no_grad()
def sampling_mismatch(logp, sampler_logp, mask):
    """How far the scored log-probs are from the sampler's on the same tokens: mean and max |Δ log p| and
    the range of the importance ratio π_θ/π_s (1 everywhere when sampling and scoring agree)."""
    on = mask.bool()
    if not on.any():
        return {"logp_diff_mean": float("nan"), "logp_diff_max": float("nan"),
                "sampler_ratio_min": float("nan"), "sampler_ratio_max": float("nan")}
    d = (logp.float() - sampler_logp.float())[on]
    return {"logp_diff_mean": d.abs().mean().item(), "logp_diff_max": d.abs().max().item(),
            "sampler_ratio_min": d.exp().min().item(), "sampler_ratio_max": d.exp().max().item()}

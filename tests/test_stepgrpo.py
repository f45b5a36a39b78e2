"""StepGRPO objective: each function against an independent float64 re-computation of its formula."""
import math

import numpy as np
import pytest
import torch

from stepgrpo import group_advantages, kl_k3, policy_loss


def reference_advantages(rewards, m):
    """Eq. 4 by hand: unbiased std (ddof=1), identical groups → 0."""
    out, zero = [], 0
    for k in range(0, len(rewards), m):
        g = np.asarray(rewards[k:k + m], dtype=np.float64)
        if np.all(g == g[0]):
            out += [0.0] * m
            zero += 1
        else:
            out += list((g - g.mean()) / (g.std(ddof=1) + 1e-4))
    return out, zero / (len(rewards) // m)


def reference_loss(logp, old, ref, adv, mask, beta, eps, norm):
    """Eq. 5 token by token in plain python; empty rows are left out of the sequence mean."""
    seq_means, total, count = [], 0.0, 0
    for i in range(len(logp)):
        vals = []
        for t in range(len(logp[i])):
            if not mask[i][t]:
                continue
            r = math.exp(logp[i][t] - old[i][t])
            obj = min(r * adv[i], min(max(r, 1 - eps), 1 + eps) * adv[i])
            d = ref[i][t] - logp[i][t]
            vals.append(obj - beta * (math.exp(d) - d - 1))
        if vals:
            seq_means.append(sum(vals) / len(vals))
        total, count = total + sum(vals), count + len(vals)
    return -sum(seq_means) / len(seq_means) if norm == "seq" else -total / count


def make_batch(n=5, t=7, seed=0, lengths=(7, 3, 5, 1, 6)):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(n, t, generator=g, dtype=torch.float64) * 3
    ref = logp + 0.3 * torch.randn(n, t, generator=g, dtype=torch.float64)
    adv = torch.randn(n, generator=g, dtype=torch.float64)
    mask = (torch.arange(t)[None] < torch.tensor(lengths)[:, None]).double()
    return logp, ref, adv, mask


@pytest.mark.parametrize("rewards,m,frac", [
    ([1.0, 1.0, 1.0, 1.0, 0.0, 0.5, 1.0, 0.2], 4, 0.5),
    ([0.3, 0.3, 0.3, 0.7, 0.7, 0.7], 3, 1.0),
    ([0.0, 1.0, 2.0, 0.0, 0.1, 0.1], 2, 1 / 3),
    ([0.1, 2.5, -1.0, 0.4, 0.9, 0.9, 3.0, 0.0], 4, 0.0),
])
def test_advantages_match_formula_and_count_identical_groups(rewards, m, frac):
    adv, got_frac = group_advantages(torch.tensor(rewards, dtype=torch.float64), m)
    want, want_frac = reference_advantages(rewards, m)
    np.testing.assert_allclose(adv.numpy(), want, rtol=1e-12, atol=1e-12)
    assert got_frac == pytest.approx(want_frac) == pytest.approx(frac)


def test_identical_reward_groups_get_exactly_zero_advantage():
    adv, frac = group_advantages(torch.full((8,), 0.1), 4)
    assert torch.equal(adv, torch.zeros(8)) and frac == 1.0


def test_std_is_unbiased():
    adv, _ = group_advantages(torch.tensor([0.0, 1.0], dtype=torch.float64), 2)
    unbiased = 0.5 / (math.sqrt(0.5) + 1e-4)  # biased std would give 0.5 / (0.5 + 1e-4)
    np.testing.assert_allclose(adv.numpy(), [-unbiased, unbiased], rtol=1e-12)


def test_group_size_one_gives_zero_advantage():
    adv, frac = group_advantages(torch.tensor([0.2, 0.9, 0.4]), 1)
    assert torch.equal(adv, torch.zeros(3)) and frac == 1.0


@pytest.mark.parametrize("n,m", [(7, 4), (6, 0)])
def test_length_not_divisible_by_group_size_raises(n, m):
    with pytest.raises(ValueError, match="groups"):
        group_advantages(torch.zeros(n), m)


def test_k3_matches_formula_is_nonnegative_and_zero_when_equal():
    logp, ref, _, _ = make_batch()
    kl = kl_k3(logp, ref)
    want = [[math.exp(r - p) - (r - p) - 1 for p, r in zip(lp, rf)]
            for lp, rf in zip(logp.tolist(), ref.tolist())]
    np.testing.assert_allclose(kl.numpy(), want, rtol=1e-12, atol=1e-15)
    assert (kl >= 0).all()
    assert torch.equal(kl_k3(logp, logp), torch.zeros_like(logp))


@pytest.mark.parametrize("norm", ["seq", "token"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_on_policy_loss_matches_formula(norm, beta):
    logp, ref, adv, mask = make_batch()
    loss, stats = policy_loss(logp, None, ref, adv, mask, beta=beta, norm=norm)
    want = reference_loss(logp.tolist(), logp.tolist(), ref.tolist(), adv.tolist(),
                          mask.tolist(), beta, 0.2, norm)
    assert loss.item() == pytest.approx(want, rel=1e-12)
    assert stats["ratio_min"] == stats["ratio_max"] == 1.0 and stats["clip_frac"] == 0.0


def test_seq_and_token_norm_differ_on_unequal_lengths():
    logp, ref, adv, mask = make_batch()
    seq, _ = policy_loss(logp, None, ref, adv, mask, norm="seq")
    tok, _ = policy_loss(logp, None, ref, adv, mask, norm="token")
    assert abs(seq.item() - tok.item()) > 1e-3


@pytest.mark.parametrize("norm", ["seq", "token"])
def test_clipped_objective_and_clip_frac_match_formula(norm):
    logp, ref, adv, mask = make_batch(seed=1)
    old = logp + 0.4 * torch.randn(logp.shape, generator=torch.Generator().manual_seed(2),
                                   dtype=torch.float64)
    loss, stats = policy_loss(logp, old, ref, adv, mask, beta=0.04, clip_eps=0.2, norm=norm)
    want = reference_loss(logp.tolist(), old.tolist(), ref.tolist(), adv.tolist(),
                          mask.tolist(), 0.04, 0.2, norm)
    assert loss.item() == pytest.approx(want, rel=1e-12)
    clipped = total = 0
    for i, row in enumerate(mask.tolist()):
        for t, on in enumerate(row):
            if on:
                r, a = math.exp(logp[i, t] - old[i, t]), adv[i].item()
                clipped += (r < 0.8 and a < 0) or (r > 1.2 and a > 0)
                total += 1
    assert 0 < clipped < total and stats["clip_frac"] == pytest.approx(clipped / total)


def test_on_policy_gradient_equals_policy_gradient_plus_kl():
    logp0, ref, adv, mask = make_batch(seed=3)
    beta = 0.04
    logp = logp0.clone().requires_grad_()
    loss, _ = policy_loss(logp, logp.detach(), ref, adv, mask, beta=beta, norm="seq")
    (grad,) = torch.autograd.grad(loss, logp)
    plain = logp0.clone().requires_grad_()
    per_tok = (adv[:, None] * plain - beta * kl_k3(plain, ref)) * mask
    pg = -(per_tok.sum(1) / mask.sum(1)).mean()
    (want,) = torch.autograd.grad(pg, plain)
    assert torch.allclose(grad, want, rtol=1e-12, atol=1e-15)
    assert loss.item() == pytest.approx(-(((adv[:, None] - beta * kl_k3(logp0, ref)) * mask)
                                          .sum(1) / mask.sum(1)).mean().item(), rel=1e-12)


@pytest.mark.parametrize("norm", ["seq", "token"])
def test_empty_rows_give_no_nan_and_are_left_out(norm):
    logp0, ref, adv, mask = make_batch(lengths=(4, 0, 6, 0, 2))
    logp = logp0.clone().requires_grad_()
    loss, stats = policy_loss(logp, None, ref, adv, mask.bool(), norm=norm)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all()
    assert torch.equal(logp.grad[[1, 3]], torch.zeros(2, logp.shape[1], dtype=torch.float64))
    keep = [0, 2, 4]
    without, _ = policy_loss(logp0[keep], None, ref[keep], adv[keep], mask[keep], norm=norm)
    assert loss.item() == pytest.approx(without.item(), rel=1e-12)
    empty, _ = policy_loss(logp0, None, ref, adv, torch.zeros_like(mask), norm=norm)
    assert empty.item() == 0.0


def test_bool_and_float_masks_agree():
    logp, ref, adv, mask = make_batch()
    a, _ = policy_loss(logp, None, ref, adv, mask)
    b, _ = policy_loss(logp, None, ref, adv, mask.bool())
    assert a.item() == b.item()


@pytest.mark.parametrize("norm", ["seq", "token"])
def test_denom_combines_micro_batches_into_full_batch_loss_and_gradient(norm):
    logp0, ref, adv, mask = make_batch(seed=4)
    old = logp0 + 0.3 * torch.randn(logp0.shape, generator=torch.Generator().manual_seed(5),
                                    dtype=torch.float64)
    logp = logp0.clone().requires_grad_()
    full, _ = policy_loss(logp, old, ref, adv, mask, norm=norm)
    (want,) = torch.autograd.grad(full, logp)
    denom = mask.shape[0] if norm == "seq" else mask.sum()
    logp = logp0.clone().requires_grad_()
    parts = [policy_loss(logp[s], old[s], ref[s], adv[s], mask[s], norm=norm, denom=denom)[0]
             for s in (slice(0, 2), slice(2, None))]  # unequal sizes and lengths
    (got,) = torch.autograd.grad(sum(parts), logp)
    assert sum(parts).item() == pytest.approx(full.item(), rel=1e-12)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-15)


def test_stats_report_kl_and_advantage_means():
    logp, ref, adv, mask = make_batch()
    _, stats = policy_loss(logp, None, ref, adv, mask)
    want_kl = (kl_k3(logp, ref) * mask).sum().item() / mask.sum().item()
    assert stats["kl"] == pytest.approx(want_kl) and stats["adv_mean"] == pytest.approx(adv.mean())
    assert stats["n_tokens"] == mask.sum().item()


def test_beta_zero_needs_no_reference():
    logp, _, adv, mask = make_batch()
    loss, stats = policy_loss(logp, None, None, adv, mask, beta=0.0)
    assert loss.item() == pytest.approx(-adv.mean().item(), rel=1e-12) and stats["kl"] == 0.0


@pytest.mark.parametrize("kwargs,match", [({"norm": "sample"}, "unknown norm"),
                                          ({"ref_logp": None}, "ref_logp")])
def test_bad_arguments_raise(kwargs, match):
    logp, ref, adv, mask = make_batch()
    args = {"logp": logp, "old_logp": None, "ref_logp": ref, "advantages": adv, "mask": mask}
    with pytest.raises(ValueError, match=match):
        policy_loss(**{**args, **kwargs})


def test_k3_keeps_small_log_ratios_in_fp32():
    """At |log-ratio| ~ 1e-4 the k3 value (~d²/2) is below fp32's resolution near 1: exp(d) - d - 1 reads it
    mostly as rounding noise, expm1(d) - d to about 1 % per token and 0.1 % on average."""
    d = torch.linspace(-3e-4, 3e-4, 101, dtype=torch.float64)
    d = d[d != 0].float()
    exact = torch.expm1(d.double()) - d.double()              # of the same fp32 inputs, in fp64
    kl = kl_k3(torch.zeros(len(d)), d).double()
    np.testing.assert_allclose(kl.numpy(), exact.numpy(), rtol=3e-2)   # exp(d) - d - 1: off by up to 3000x
    assert abs(kl.mean().item() / exact.mean().item() - 1) < 1e-3


# ---------------------------------------------------------------------------- options (each off by default)
# One group of 4: two wrong answers with k = 1 (StepRAR 0.1), two right ones (1.1); StepRVR 1, 0, 1, 0; a second
# group whose rewards are all equal.
RAR, RVR = [0.1, 0.1, 1.1, 1.1, 0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0]
TOTAL = [a + b for a, b in zip(RAR, RVR)]   # 1.1, 0.1, 2.1, 1.1 | 1, 1, 1, 1


def test_each_advantage_scaling_against_a_hand_computed_group():
    from stepgrpo import centred_advantages, per_reward_advantages, scaled_advantages
    total, parts = torch.tensor(TOTAL, dtype=torch.float64), torch.tensor([RAR, RVR], dtype=torch.float64).T
    s = math.sqrt(2 / 3) + 1e-4                       # the first group's deviations are 0, −1, 1, 0
    eq4, frac = scaled_advantages(total, 4, "group_std", parts)
    assert eq4.tolist() == pytest.approx([0, -1 / s, 1 / s, 0, 0, 0, 0, 0], abs=1e-12) and frac == 0.5
    assert torch.equal(eq4, group_advantages(total, 4)[0])
    none, frac = scaled_advantages(total, 4, "none", parts)
    assert none.tolist() == pytest.approx([0, -1, 1, 0, 0, 0, 0, 0], abs=1e-12) and frac == 0.5
    assert torch.equal(none, centred_advantages(total, 4)[0])
    # GDPO: StepRAR deviations ∓0.5 and StepRVR ±0.5, each std √(1/3): the sum is 0, −2·0.5/s', 2·0.5/s', 0
    s1 = math.sqrt(1 / 3) + 1e-4
    gdpo, frac = scaled_advantages(total, 4, "per_reward", parts)
    assert gdpo.tolist() == pytest.approx([0, -1 / s1, 1 / s1, 0, 0, 0, 0, 0], abs=1e-12) and frac == 0.5
    assert torch.equal(gdpo, per_reward_advantages(parts, 4)[0])
    # equal totals from opposite parts: no spread for Eq. 4, spread in each part for GDPO (they cancel here)
    _, frac = per_reward_advantages(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), 2)
    assert frac == 0.0 and group_advantages(torch.tensor([1.0, 1.0]), 2)[1] == 1.0


def test_step_credit_adds_the_group_centred_match_to_the_tokens_of_each_matched_step():
    from stepgrpo import step_credit
    adv = torch.tensor([0.5, -0.5, -1.0, 1.0], dtype=torch.float64)
    matched = torch.tensor([[1, 1], [1, 0], [0, 0], [1, 0]])         # step 0 by 3 of 4, step 1 by 1 of 4
    token_step = torch.tensor([[-1, 0, 0, -1, 1, -1], [0, -1, -1, -1, -1, -1], [-1] * 6, [-1, -1, -1, 0, 0, -1]])
    got = step_credit(adv, matched, token_step, 4, weight=2.0)
    want = [[0.5, 0.5 + 2 * 0.25, 0.5 + 2 * 0.25, 0.5, 0.5 + 2 * 0.75, 0.5],
            [-0.5 + 2 * 0.25] + [-0.5] * 5, [-1.0] * 6, [1.0, 1.0, 1.0, 1.0 + 2 * 0.25, 1.0 + 2 * 0.25, 1.0]]
    assert torch.allclose(got, torch.tensor(want, dtype=torch.float64), atol=1e-12, rtol=0)
    assert torch.equal(step_credit(adv, matched, token_step, 4, 0.0), adv[:, None].expand(4, 6))


def test_per_token_advantages_enter_the_loss_token_by_token():
    logp, ref, adv, mask = make_batch(seed=5)
    per_token = adv[:, None] * torch.linspace(0.5, 1.5, logp.shape[1], dtype=torch.float64)
    loss, _ = policy_loss(logp, None, ref, per_token, mask, beta=0.04, norm="token")
    by_hand = -((per_token - 0.04 * kl_k3(logp, ref)) * mask).sum() / mask.sum()
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-12)
    flat, _ = policy_loss(logp, None, ref, adv, mask, beta=0.04, norm="token")
    same, _ = policy_loss(logp, None, ref, adv[:, None].expand_as(logp).contiguous(), mask, beta=0.04, norm="token")
    assert same.item() == flat.item()


def test_clip_higher_widens_only_the_upper_range_and_counts_each_side():
    logp = torch.log(torch.tensor([[1.0, 1.0, 1.0, 1.0]], dtype=torch.float64))
    old = torch.log(torch.tensor([[0.5, 0.8, 1 / 1.25, 1.5]], dtype=torch.float64))   # ratios 2, 1.25, 1.25, 2/3
    for adv, low, high in ((1.0, 0, 0.25), (-1.0, 0.25, 0)):
        a = torch.tensor([adv], dtype=torch.float64)
        _, sym = policy_loss(logp, old, None, a, torch.ones(1, 4), beta=0.0, clip_eps=0.2)
        loss, asym = policy_loss(logp, old, None, a, torch.ones(1, 4), beta=0.0, clip_eps=0.2, clip_eps_high=0.28)
        assert (asym["clip_low_frac"], asym["clip_high_frac"]) == (low, high)           # 1.25 is inside 1 + 0.28
        assert sym["clip_high_frac"] == (0.75 if adv > 0 else 0) and sym["clip_low_frac"] == low
        ratio = torch.tensor([2.0, 1.25, 1.25, 2 / 3], dtype=torch.float64)
        want = torch.minimum(ratio * adv, ratio.clamp(0.8, 1.28) * adv).mean()
        assert loss.item() == pytest.approx(-want.item(), rel=1e-12)
    _, st = policy_loss(logp, old, None, torch.tensor([1.0]), torch.ones(1, 4), beta=0.0)
    assert st["entropy"] == pytest.approx(0.0, abs=1e-12)        # −log π of tokens of probability 1

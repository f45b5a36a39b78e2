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

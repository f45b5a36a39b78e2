"""training/credit.py: the inputs of per-step credit (stepgrpo.step_credit, `--step_credit`): which key steps each
completion matched (StepRAR's match, rewards.match_key_steps) and which of its tokens spell each match.

The match is found in the completion's text; rewards.key_step_spans gives the characters of each match, and
`token_steps` turns characters into tokens by decoding prefixes of the completion's tokens (a binary search per
span boundary), so a token belongs to a step when any of its characters lies in that step's span.
"""
import torch

import rewards
from stepgrpo import step_credit


def token_steps(tokenizer, ids, spans):
    """[len(ids)] list: per token, the index of the span (start, end: characters of the decoded text) that
    holds one of its characters, else −1; a later span wins where two overlap. None spans are skipped."""
    ends = {}

    def end(t):                                   # characters decoded from tokens 0..t
        if t not in ends:
            ends[t] = len(tokenizer.decode(ids[:t + 1], skip_special_tokens=True))
        return ends[t]

    def token_at(c):                              # the first token whose text reaches past character c
        lo, hi = 0, len(ids)
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if end(mid) > c else (mid + 1, hi)
        return lo

    out = [-1] * len(ids)
    for s, span in enumerate(spans):
        if span and span[1] > span[0]:
            for t in range(token_at(span[0]), min(token_at(span[1] - 1), len(ids) - 1) + 1):
                out[t] = s
    return out


def token_advantages(run, ro, rs, advantages):
    """[rows, T] per-token advantages of stepgrpo.step_credit with weight --step_credit: each row's matched key
    steps (rewards' `matched`) and the tokens of their spans in its completion."""
    n_steps = max([len(r.get("matched") or []) for r in rs] + [1])
    matched = torch.zeros(len(rs), n_steps)
    token_step = torch.full(ro.completion_ids.shape, -1, dtype=torch.long)
    for i, r in enumerate(rs):
        found = r.get("matched") or []
        matched[i, :len(found)] = torch.tensor([float(m is not None) for m in found])
        keep = ro.completion_mask[i].bool().cpu()
        steps = token_steps(run.tokenizer, ro.completion_ids[i].cpu()[keep].tolist(), rewards.key_step_spans(ro.texts[i], found))
        token_step[i, torch.nonzero(keep).squeeze(1)] = torch.tensor(steps, dtype=torch.long)
    return step_credit(advantages, matched, token_step, run.args.num_generations, run.args.step_credit).to(run.device)

"""training/dynamic.py: dynamic sampling (DAPO: Yu et al., 2025, arXiv 2503.14476, Sec. 3.2), `--dynamic_sampling`.

A group whose answers are all right or all wrong carries no outcome signal. Dynamic sampling drops such groups
and fills the step with groups of fresh prompts, so that every trained group holds both. The filter reads the
answer's correctness, not the shaped reward: StepRAR's α·k and StepRVR spread almost every StepGRPO group.

- Fresh prompts come from a second stream of the data (data.batch_at with its own shuffle): at step k, rank r
  reads its window of E = --max_extra_batches × (its prompts per step) positions of that stream. The window is
  a function of the step, never of what earlier steps drew, so a resumed run draws exactly what an uninterrupted
  one did; each prompt's samples are seeded by its position there (offset past the main stream's seeds).
- Rounds: each draws as many prompts as groups are still missing, from the window in order, until the step is
  full or the window is used up; at most E extra prompts per step, so a model whose every group scores 0 ends
  after E draws. A step that cannot fill trains on what it has: its mixed groups, topped up with dropped groups
  in the order drawn (the batch keeps its size); logs.py counts and reports it.
- Each rank fills its own groups (whole groups stay on one rank). Sampling reads each rank's own unsharded
  sampling copy (no collective), so ranks may run different numbers of rounds; the update's sharded forwards
  stay in lockstep as always (parallel.lockstep). Which groups are kept depends on the number of ranks.
"""
import torch
import torch.nn.functional as F

import model as M
import rollout
from training import data

STREAM_SEED = 104_729          # the extra stream's shuffle: data.batch_at(..., seed + STREAM_SEED)
SEED_OFFSET = 1 << 40          # its rollout seeds start past any main-stream position


def mixed(group_rewards):
    """The group's answers are neither all right nor all wrong."""
    return len({bool(r["correct"]) for r in group_rewards}) > 1


def fill(run, step, first, draw):
    """(rollout, answered, rewards, counts) of the step after dynamic sampling. `first` is (rollout, answered,
    rewards) of the step's own prompts; draw(samples, positions) samples and rewards more prompts alike.
    counts: groups_dropped (drawn, not trained on), prompts_drawn (extra prompts), groups_unfilled (trained
    groups that are all right or all wrong because the window ran out)."""
    a, m = run.args, run.args.num_generations
    want = a.prompts_per_step * a.grad_accum
    budget = a.max_extra_batches * want
    extra, positions = data.batch_at(run.train_set, step, budget, run.rank, run.world, a.seed + STREAM_SEED)
    parts, kept, dropped, drawn = [first], [], [], 0
    while True:
        rs = parts[-1][2]
        for g in range(len(rs) // m):                  # (round, group) of each group drawn, in order
            (kept if mixed(rs[g * m:(g + 1) * m]) else dropped).append((len(parts) - 1, g))
        need = want - len(kept)
        if need <= 0 or drawn >= budget:
            break
        n = min(need, budget - drawn)
        parts.append(draw(extra[drawn:drawn + n], [SEED_OFFSET + p for p in positions[drawn:drawn + n]]))
        drawn += n
    short = dropped[:max(0, want - len(kept))]
    chosen = sorted(kept + short)
    counts = dict(groups_dropped=len(dropped) - len(short), prompts_drawn=drawn, groups_unfilled=len(short))
    if not chosen:
        return None, [], [], counts
    if len(parts) == 1 and len(chosen) == len(first[2]) // m:
        return (*first, counts)                    # nothing dropped: the step's own rollout as it was
    rows = [(parts[i], [g * m + j for j in range(m)]) for i, g in chosen]
    ro = concat([(part[0], idx) for part, idx in rows], run.tokenizer.pad_token_id)
    answered = [part[1][r] for part, idx in rows for r in idx]
    rs = [part[2][r] for part, idx in rows for r in idx]
    return ro, answered, rs, counts


def concat(parts, pad_id):
    """One rollout.Rollout of the rows `rows` of each (rollout, rows) in `parts` (whole groups), in order:
    prompts left-padded and completions right-padded to the longest, image blocks kept with their rows,
    groups renumbered 0, 1, ... (kept: the same numbers)."""
    sel = [(M.select_rows(ro.prompt, rows), torch.as_tensor(rows, dtype=torch.long), ro) for ro, rows in parts]
    width = max(p["input_ids"].shape[1] for p, _, _ in sel)
    length = max(ro.completion_ids.shape[1] for _, _, ro in sel)
    left = lambda key, fill: torch.cat([F.pad(p[key], (width - p[key].shape[1], 0), value=fill) for p, _, _ in sel])
    right = lambda key, fill: torch.cat([F.pad(getattr(ro, key)[rows], (0, length - getattr(ro, key).shape[1]), value=fill)
                                         for _, rows, ro in sel])
    blocks = lambda key: [p[key] for p, _, _ in sel if p[key] is not None]
    prompt = dict(input_ids=left("input_ids", pad_id), attention_mask=left("attention_mask", 0),
                  mm_token_type_ids=left("mm_token_type_ids", 0),
                  pixel_values=torch.cat(blocks("pixel_values")) if blocks("pixel_values") else None,
                  image_grid_thw=torch.cat(blocks("image_grid_thw")) if blocks("image_grid_thw") else None)
    groups, offset = [], 0
    for _, rows, ro in sel:
        g = ro.group[rows.to(ro.group.device)]
        groups.append(g - g.min() + offset)
        offset += int(g.max() - g.min()) + 1
    return rollout.Rollout(prompt, right("completion_ids", pad_id), right("completion_mask", 0), right("logprobs", 0.0),
                           torch.cat([ro.truncated[rows.to(ro.truncated.device)] for _, rows, ro in sel]),
                           [ro.texts[r] for _, rows, ro in sel for r in rows.tolist()], torch.cat(groups),
                           list(range(offset)), sel[0][2].suppress_ids)

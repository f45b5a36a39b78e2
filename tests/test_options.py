"""The training options beside the paper's defaults: dynamic sampling's refill (training/dynamic.py) and the token
spans of per-step credit (training/credit.py). The objective's options are pinned in test_stepgrpo.py."""
from types import SimpleNamespace

import pytest
import torch

import rewards
from rollout import Rollout
from training import credit, dynamic

M = 2   # completions per prompt


def fake_rollout(groups):
    """A rollout of groups (tag, (correct, correct)): prompts of different lengths, completions coded by tag."""
    n, plen, clen = len(groups), 2 + len(groups), 3 + len(groups)
    ids = torch.arange(1, 2 * n * plen + 1).view(2 * n, plen)
    prompt = dict(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=torch.zeros_like(ids),
                  pixel_values=None, image_grid_thw=None)
    tags = [tag for tag, _ in groups for _ in range(M)]
    comp = torch.tensor([[100 * t + j for j in range(clen)] for t in tags])
    return (Rollout(prompt, comp, torch.ones_like(comp), -comp.float(), torch.zeros(2 * n, dtype=torch.bool),
                    [f"{t}/{i % M}" for i, t in enumerate(tags)], torch.arange(n).repeat_interleave(M), list(range(n)),
                    torch.zeros(0, dtype=torch.long)),
            [{"id": t} for t in tags], [{"correct": c} for _, cs in groups for c in cs])


MIXED, WRONG, RIGHT = (True, False), (False, False), (True, True)


def fake_run(want=3, extra=2):
    args = SimpleNamespace(num_generations=M, prompts_per_step=want, grad_accum=1, max_extra_batches=extra, seed=0)
    return SimpleNamespace(args=args, train_set=[{"id": i} for i in range(50)], rank=0, world=1,
                           tokenizer=SimpleNamespace(pad_token_id=0))


def scripted(*rounds):
    """A draw() that answers each call with the next scripted round and records what it was asked for."""
    asked, queue = [], list(rounds)

    def draw(samples, positions):
        asked.append(positions)
        return fake_rollout(queue.pop(0))
    return draw, asked


def test_dynamic_sampling_keeps_mixed_groups_in_draw_order_and_reads_a_window_fixed_by_the_step():
    draw, asked = scripted([(4, WRONG), (5, MIXED)], [(6, WRONG)], [(7, RIGHT)], [(8, MIXED)])
    first = fake_rollout([(1, MIXED), (2, WRONG), (3, RIGHT)])
    ro, answered, rs, counts = dynamic.fill(fake_run(), 5, first, draw)
    assert [s["id"] for s in answered] == [1, 1, 5, 5, 8, 8] and ro.texts == ["1/0", "1/1", "5/0", "5/1", "8/0", "8/1"]
    assert counts == dict(groups_dropped=5, prompts_drawn=5, groups_unfilled=0)
    # each round asks for the groups still missing, from positions 30.. of the extra stream (step 5 × 6)
    base = dynamic.SEED_OFFSET + 5 * 6
    assert asked == [[base, base + 1], [base + 2], [base + 3], [base + 4]]
    # the rollout is whole: groups renumbered, prompts left-padded, completions right-padded, rows kept together
    assert ro.group.tolist() == [0, 0, 1, 1, 2, 2] and ro.kept == [0, 1, 2]
    assert ro.completion_ids[2].tolist() == [500, 501, 502, 503, 504, 0] and ro.logprobs[2, 4:].tolist() == [-504, 0]
    assert ro.completion_mask.sum(1).tolist() == [6, 6, 5, 5, 4, 4]
    assert ro.prompt["input_ids"].shape[1] == 5 and ro.prompt["attention_mask"][4].tolist() == [0, 0, 1, 1, 1]
    assert ro.prompt["input_ids"][4, 2:].tolist() == [1, 2, 3]      # round 4's first row, as it was
    assert ro.prompt["input_ids"][0].tolist() == first[0].prompt["input_ids"][0].tolist()


def test_dynamic_sampling_stops_at_its_bound_and_trains_on_the_groups_it_has():
    draw, asked = scripted([(4, WRONG), (5, WRONG), (6, WRONG)], [(7, WRONG), (8, WRONG), (9, WRONG)])
    first = fake_rollout([(1, WRONG), (2, WRONG), (3, WRONG)])          # an untrained model: every group scores 0
    ro, answered, rs, counts = dynamic.fill(fake_run(extra=2), 0, first, draw)
    assert len(asked) == 2 and counts == dict(groups_dropped=6, prompts_drawn=6, groups_unfilled=3)
    assert [s["id"] for s in answered] == [1, 1, 2, 2, 3, 3]            # the step's own groups, as many as asked


def test_dynamic_sampling_leaves_a_full_step_as_it_was():
    first = fake_rollout([(1, MIXED), (2, MIXED), (3, MIXED)])
    ro, answered, rs, counts = dynamic.fill(fake_run(), 0, first, scripted()[0])
    assert ro is first[0] and counts == dict(groups_dropped=0, prompts_drawn=0, groups_unfilled=0)


def test_token_steps_mark_the_tokens_that_spell_each_matched_key_step(tiny):
    tokenizer = tiny[1]
    text = ("### Image Description:\nA grid.\n### Rationales:\nCount.\n### Step 1:\nThere are 3 red cells.\n"
            "### Step 2:\nSo blue = 8 in all.\n### The final answer is: 8")
    _, matched = rewards.match_key_steps(text, [["3 red"], ["green"], ["blue = 8"]])
    spans = rewards.key_step_spans(text, matched)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    steps = credit.token_steps(tokenizer, ids, spans)
    for s, want in ((0, "3 red"), (2, "blue = 8")):
        tokens = [t for t, k in enumerate(steps) if k == s]
        assert tokens == list(range(tokens[0], tokens[-1] + 1))        # one run of tokens
        assert want in tokenizer.decode(ids[tokens[0]:tokens[-1] + 1]).strip()
        assert want not in tokenizer.decode(ids[tokens[0] + 1:tokens[-1] + 1])   # and no more than it needs
    assert 1 not in steps and steps.count(-1) > len(steps) // 2

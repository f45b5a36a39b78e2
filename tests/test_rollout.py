"""The static-cache decoder of rollout.py against the plain one (tiny preset, CPU, fp32)."""
import warnings

import pytest
import torch

import model as M
from conftest import with_head_bias
import rollout as R
from toy import task as toy


@pytest.fixture(scope="module")
def toy_inputs():
    samples = toy.dataset("test", n=4, seed=3)
    return [s["image"] for s in samples], [s["problem"] for s in samples]


@pytest.fixture(scope="module")
def ending(tiny):
    """The tiny model with its EOS logit raised, so completions stop at different places."""
    _, stop = M.special_ids(tiny[1])
    return with_head_bias(tiny, {stop[0]: 4.0})


def plain_generate(policy, tok, ip, images, questions, m, temperature, max_new_tokens, greedy=False, seeds=None):
    """The plain decoder: the model's own forward, one token at a time, with a cache and an attention
    mask that grow by one column per token. Returns (tokens [N, T], their log-probs [N, T])."""
    batch = M.build_inputs(tok, ip, images, questions)
    batch.pop("kept")
    suppress, stop = M.special_ids(tok)
    generators = None if seeds is None else [torch.Generator().manual_seed(s) for s in seeds]
    positions, deltas = M.rope_positions(policy, batch["input_ids"], batch["attention_mask"],
                                         batch["mm_token_type_ids"], batch["image_grid_thw"])
    out = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=positions,
                 pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"], use_cache=True)
    cache = out.cache
    cache.batch_repeat_interleave(m)
    logits = out.logits[:, -1].repeat_interleave(m, 0)
    attention = batch["attention_mask"].repeat_interleave(m, 0)
    next_pos = attention.sum(-1, keepdim=True) + deltas.repeat_interleave(m, 0)
    done = torch.zeros(len(logits), dtype=torch.bool)
    tokens, logps = [], []
    for _ in range(max_new_tokens):
        logits = logits.float() / (1.0 if greedy else temperature)
        logits[:, suppress] = float("-inf")
        logp = logits.log_softmax(-1)
        t = logp.argmax(-1) if greedy else R.sample(logp, 1.0, generators, m)
        t = torch.where(done, tok.pad_token_id, t)
        tokens.append(t), logps.append(logp.gather(1, t[:, None]).squeeze(1))
        done |= torch.isin(t, torch.tensor(stop))
        if done.all():
            break
        attention = torch.cat([attention, torch.ones_like(attention[:, :1])], 1)
        out = policy(input_ids=t[:, None], attention_mask=attention, position_ids=next_pos, cache=cache, use_cache=True)
        logits, next_pos = out.logits[:, -1], next_pos + 1
    return torch.stack(tokens, 1), torch.stack(logps, 1)


@pytest.mark.parametrize("m", [1, 3])    # 4 and 12 rows: the second is padded to a bucket of 16
def test_greedy_tokens_equal_the_plain_decoder(tiny, toy_inputs, m):
    images, questions = toy_inputs
    ro = R.generate(*tiny, images, questions, num_samples=m, greedy=True, max_new_tokens=40)
    ids, logps = plain_generate(*tiny, images, questions, m, 1.0, 40, greedy=True)
    assert torch.equal(ro.completion_ids, ids)
    assert torch.allclose(ro.logprobs, logps * ro.completion_mask, atol=1e-5)


def test_seeded_samples_equal_the_plain_decoder(ending, toy_inputs):
    images, questions = toy_inputs
    kw = dict(num_samples=3, temperature=1.2, max_new_tokens=40, seeds=[5, 6, 7, 8])
    ro = R.generate(*ending, images, questions, **kw)
    ids, logps = plain_generate(*ending, images, questions, 3, 1.2, 40, seeds=kw["seeds"])
    assert (~ro.truncated).sum() >= 3 and ro.truncated.any()           # rows end at different places
    assert torch.equal(ro.completion_ids, ids)
    assert torch.allclose(ro.logprobs, logps * ro.completion_mask, atol=1e-5)


@pytest.mark.parametrize("m", [4, 1])   # 16 rows together, 4 alone; 4 rows together, 1 alone
def test_a_prompts_samples_do_not_depend_on_the_other_prompts(tiny, toy_inputs, m):
    images, questions = toy_inputs
    kw = dict(num_samples=m, temperature=1.3, max_new_tokens=24)
    together = R.generate(*tiny, images, questions, seeds=[10, 11, 12, 13], **kw)
    for i in range(4):
        alone = R.generate(*tiny, images[i:i + 1], questions[i:i + 1], seeds=[10 + i], **kw)
        rows = slice(m * i, m * i + m)
        length = alone.completion_ids.shape[1]
        assert torch.equal(together.completion_ids[rows, :length], alone.completion_ids)
        assert (together.completion_ids[rows, length:] == tiny[1].pad_token_id).all()
        assert together.texts[rows] == alone.texts


@pytest.mark.parametrize("n, rows", [(1, 1), (2, 2), (3, 4), (5, 8), (16, 16), (17, 32), (33, 48)])
def test_rows_are_padded_to_a_few_buckets(n, rows):
    assert R.padded_rows(n) == rows


def test_every_decode_step_has_the_same_shapes(tiny, toy_inputs, monkeypatch):
    seen, step = [], R.decode_step

    def recording(model, cache, tokens, positions, slot):
        seen.append((cache.k[0].data_ptr(), cache.k[0].shape, tokens.shape, positions.shape, slot.shape))
        return step(model, cache, tokens, positions, slot)
    monkeypatch.setattr(R, "decode_step", recording)
    R.generate(*tiny, *toy_inputs, num_samples=3, max_new_tokens=20, ignore_eos=True)
    assert len(seen) == 19 and len(set(seen)) == 1
    (_, k_shape, tokens, _, _), = set(seen)
    assert tokens[0] == k_shape[0] == 16 and k_shape[2] % R.CACHE_ROUND == 0


def test_a_step_attends_over_the_slots_so_far_rounded_up(tiny, toy_inputs, monkeypatch):
    seen, step = [], R.decode_step
    monkeypatch.setattr(R, "decode_step", lambda model, cache, *a: seen.append(cache.k[0].shape[2]) or step(model, cache, *a))
    prompt_len = M.build_inputs(*tiny[1:], *toy_inputs)["input_ids"].shape[1]
    ro = R.generate(*tiny, *toy_inputs, num_samples=1, max_new_tokens=R.CACHE_ROUND + 8, ignore_eos=True)
    assert seen == [R.rounded(prompt_len + t + 1) for t in range(ro.completion_ids.shape[1] - 1)]
    assert seen[0] == R.CACHE_ROUND and seen[-1] == 2 * R.CACHE_ROUND


def test_compiled_step_is_compiled_at_most_twice_per_row_bucket(tiny, toy_inputs, monkeypatch):
    """The step torch.compile captures with inductor (fullgraph: no graph breaks) gives the eager tokens and
    compiles at most twice for a row bucket, whatever the step, the call, the cache length or the attended
    window (dynamic dimensions): once for a window that is its whole cache, once for one shorter than its
    cache (strided). CUDA graphs, on top of it on a GPU, are not tested here."""
    from torch._dynamo.testing import CompileCounterWithBackend
    torch._dynamo.reset()
    tiny[0].__dict__.pop("_kv_caches", None)
    counter = CompileCounterWithBackend("inductor")
    step = torch.compile(R.decode_step, backend=counter, fullgraph=True, dynamic=False)
    monkeypatch.setattr(R, "compiled_decode_step", lambda cuda: step)
    prompt_len = M.build_inputs(*tiny[1:], *toy_inputs)["input_ids"].shape[1]
    longer = R.CACHE_ROUND - prompt_len + 2                  # into the second attended window
    # (samples, new tokens, longest prompt the cache is sized for, compiles so far): the first two calls
    # attend over shorter windows than the cache, the last (a cache sized to this call) over its whole length
    for m, new_tokens, max_prompt_len, compiles in [(2, 12, 512, 1), (2, longer, 512, 1), (1, 12, 512, 2),
                                                    (4, longer, prompt_len, 4)]:
        kw = dict(num_samples=m, temperature=1.3, max_new_tokens=new_tokens, seeds=[1, 2, 3, 4], ignore_eos=True)
        compiled = R.generate(*tiny, *toy_inputs, compile=True, max_prompt_len=max_prompt_len, **kw)
        assert torch.equal(compiled.completion_ids, R.generate(*tiny, *toy_inputs, **kw).completion_ids)
        assert counter.frame_count == compiles
    sized = sorted([R.rounded(512 + 12)] * 2 + [R.rounded(prompt_len + longer)])   # by each bucket's first call
    assert sorted(c.slots.shape[0] for c in tiny[0]._kv_caches.values()) == sized


def test_compiled_decoding_allocates_one_cache_per_row_bucket(tiny, toy_inputs, monkeypatch):
    """Training with held-out evaluation samples groups of several sizes, prompts of several lengths and (for the
    evaluation) other completion lengths: each row bucket's cache is allocated once, sized for the longest prompt,
    and reused, so CUDA graphs are recorded once per window, never again for a new cache."""
    monkeypatch.setattr(R, "compiled_decode_step", lambda cuda: R.decode_step)   # the caches, not the compiler
    net = tiny[0]
    net.__dict__.pop("_kv_caches", None)
    seen = []                                                # every cache object ever kept (held: ids stay unique)
    images, questions = toy_inputs
    for step in range(8):
        m, new_tokens = (4, 16) if step % 3 else (1, 24)    # RL groups of 4; greedy evaluation, longer answers
        prompts = [q + " and more" * (step % 4) for q in questions]
        R.generate(net, *tiny[1:], images, prompts, num_samples=m, max_new_tokens=new_tokens, compile=True,
                   max_prompt_len=200, seeds=[step] * len(images))
        seen += [c for c in net._kv_caches.values() if all(c is not s for s in seen)]
    buckets = {R.padded_rows(len(images) * m) for m in (4, 1)}
    assert len(seen) == len(net._kv_caches) == len(buckets)


def test_generation_prints_no_deprecation_warning(tiny, toy_inputs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        R.generate(*tiny, *toy_inputs, num_samples=2, max_new_tokens=4)
    assert not [w for w in caught if "deprecat" in str(w.message).lower()]

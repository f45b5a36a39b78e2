"""rollout.py: sample M completions per image-question (or one greedy answer, for evaluation).

    ro = generate(policy, tokenizer, image_processor, images, questions, num_samples=4, temperature=1.0)
    ro.texts, ro.completion_ids, ro.completion_mask, ro.truncated

Decoding follows gpt-fast. Each prompt is prefilled once by the model's own forward (image
included) and its keys and values are copied into the rows of its M samples in a cache allocated
up front for prompt + max_new_tokens. One fixed-shape step (`decode_step`) then advances every row
by one token, writing its key and value into the cache in place; nothing grows with the length,
so a step costs the same at the thousandth token as at the tenth. Rows are padded to a few bucket
sizes, so `compile=True` (torch.compile "reduce-overhead", i.e. CUDA graphs) compiles the step once
per bucket, whatever the cache length; eager runs the same step on the same shapes. Qwen3.5's hybrid
decoder (linear-attention layers carry a recurrent state, not keys and values) decodes through its own
forward and cache instead (`prefill_own`, `own_decode_step`): eager, and the same loop around it.

The loop writes out every choice: vision special tokens are suppressed (a sampled `<|image_pad|>`
would make the next forward look for an image that is not there), positions are the model's 3-D
M-RoPE positions carried forward one text position per token, log-probs come from the fp32 LM head
the scorer uses (`model.head_logprobs`), and a completion ends at its first stop token, which is
kept in the mask. A bf16 run samples from a copy of the policy with its matrices cast once
(training/sampling_copy.py).
"""
import functools
import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.distributed.fsdp import FSDPModule
from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb

from model import (ATTENTION_ONLY, MAX_PROMPT_LEN, build_inputs, fp32_head, head_logprobs, rope_positions,
                   select_rows, special_ids)

log = logging.getLogger(__name__)

CACHE_ROUND = 256   # cache lengths, and the slots a step attends over, are rounded up to a multiple of this
CHECK_EVERY = 8     # steps between checks that every row has stopped (each check waits for the device)


@dataclass
class Rollout:
    """One row per completion; rows of a prompt's group are consecutive (group = index into kept)."""
    prompt: dict                  # build_inputs() batch, rows repeated M times, pixel blocks aligned
    completion_ids: torch.Tensor  # [N, T] sampled tokens, pad after the stop token
    completion_mask: torch.Tensor  # [N, T] 1 up to and including the first stop token
    logprobs: torch.Tensor        # [N, T] log-probs of the sampled tokens under the sampling distribution
    truncated: torch.Tensor       # [N] no stop token within max_new_tokens
    texts: list                   # [N] decoded completions (special tokens dropped)
    group: torch.Tensor           # [N] index into `kept` of the prompt each row answers
    kept: list                    # indices of the inputs that were generated (others skipped: prompt too long)
    suppress_ids: torch.Tensor    # token ids removed from the sampling distribution (on the device: the scorer
                                  # indexes with it per chunk, no host-to-device copy)

    def rows(self, idx):
        """(prompt sub-batch, completion ids, completion mask) for rows `idx`, e.g. one micro-batch,
        with the completion columns cut to the longest of these rows (no forward over padding)."""
        idx = torch.as_tensor(idx, dtype=torch.long, device=self.completion_ids.device)
        length = max(int(self.completion_mask[idx].sum(1).max()), 1)
        return select_rows(self.prompt, idx), self.completion_ids[idx, :length], self.completion_mask[idx, :length]


@dataclass
class KVCache:
    """Keys and values of every text layer for a fixed number of rows and slots, written in place. One buffer
    per layer, as in gpt-fast: a compiled write into a slice of one multi-layer tensor copies the whole tensor."""
    k: list               # per layer [rows, kv_heads, length, head_dim]
    v: list               # per layer [rows, kv_heads, length, head_dim]
    valid: torch.Tensor   # [rows, length] bool: slots a row may attend to (not its prompt's left padding)
    slots: torch.Tensor   # [length] 0..length-1: a slot becomes visible once decoding has reached it
    windows: dict = field(default_factory=dict, repr=False)   # size -> this cache's first `size` slots (window())


@torch.no_grad()
def generate(model, tokenizer, image_processor, images, questions, num_samples=4, temperature=1.0, top_p=1.0,
             max_new_tokens=256, greedy=False, style="r1vl", max_prompt_len=MAX_PROMPT_LEN, prompts=None, seeds=None,
             ignore_eos=False, compile=False):
    """Sample `num_samples` completions for each (image, question); greedy=True takes the argmax.

    `seeds` (one per input) gives each prompt's group its own random stream, so its samples do not
    depend on which other prompts share the batch (or rank); without it the global RNG is used.
    `ignore_eos` generates exactly `max_new_tokens` per completion (fixed workloads for benchmarks).
    `compile` runs the decode step as a CUDA graph; the first call for each row bucket compiles it,
    the first for each (row bucket, attended window) records its graph, and the bucket's cache, sized
    once for the longest prompt and completion, is kept on the model for the next calls.
    """
    batch = build_inputs(tokenizer, image_processor, images, questions, style, max_prompt_len, prompts)
    skipped = len(images) - (len(batch["kept"]) if batch else 0)
    if skipped:
        log.warning("skipped %d of %d prompts longer than %d tokens", skipped, len(images), max_prompt_len)
    if batch is None:
        return None
    if isinstance(model, FSDPModule):   # the decode step calls the layers' parts, which FSDP's hooks do not see
        raise TypeError("generate from an unsharded copy of an FSDP model: training.sampling_copy.inference_copy(policy)")
    device = next(model.parameters()).device
    kept = batch.pop("kept")
    batch = {k: v.to(device) if v is not None else None for k, v in batch.items()}
    suppress, stop = special_ids(tokenizer)
    suppress_t = torch.tensor(suppress, dtype=torch.long, device=device)   # indexed on the device at every token
    stop = [] if ignore_eos else stop
    stop_t, pad = torch.tensor(stop, dtype=torch.long, device=device), tokenizer.pad_token_id
    m = num_samples
    group = torch.arange(len(kept), device=device).repeat_interleave(m)
    n = len(group)
    generators = None if seeds is None else [torch.Generator(device).manual_seed(int(seeds[i])) for i in kept]

    was_training = model.training
    model.eval()
    if static_cache_fits(model):          # Qwen2-VL, Qwen2.5-VL, Qwen3-VL
        start, step = prefill, compiled_decode_step(device.type == "cuda") if compile else decode_step
    else:                                 # Qwen3.5: the model's own forward and cache, eager
        if compile:
            warn_once(f"{type(model).__name__} decodes eagerly with its own cache: no CUDA graph")
        start, step = prefill_own, own_decode_step
    cache, hidden, next_pos = start(model, batch, group, max_new_tokens, keep=compile,
                                    capacity=max(max_prompt_len, batch["input_ids"].shape[1]) + max_new_tokens)
    prompt_len = batch["input_ids"].shape[1]
    first_slot = torch.tensor([prompt_len], device=device)
    head = fp32_head(model)
    tokens = torch.full((next_pos.shape[1], 1), pad, dtype=torch.long, device=device)
    ids = torch.full((n, max_new_tokens), pad, dtype=torch.long, device=device)
    logps = torch.zeros(n, max_new_tokens, device=device)
    done = torch.zeros(n, dtype=torch.bool, device=device)
    for t in range(max_new_tokens):
        logp = head_logprobs(hidden[:n], *head, 1.0 if greedy else temperature, suppress_t)
        tok = logp.argmax(-1) if greedy else sample(logp, top_p, generators, m)
        tok = torch.where(done, pad, tok)
        ids[:, t], logps[:, t] = tok, logp.gather(1, tok[:, None]).squeeze(1)
        done |= torch.isin(tok, stop_t)
        if t == max_new_tokens - 1 or (t % CHECK_EVERY == 0 and bool(done.all())):
            break
        tokens[:n, 0] = tok
        slot = prompt_len + t
        hidden = step(model, window(cache, slot, compile) if isinstance(cache, KVCache) else cache, tokens,
                      next_pos + t, first_slot + t)
    model.train(was_training)

    completion_mask, truncated = first_stop_mask(ids[:, :t + 1], stop_t)
    length = int(completion_mask.sum(1).max())   # columns after every row's stop are pad: cut them
    completion_ids, completion_mask = ids[:, :length], completion_mask[:, :length]
    is_stop = torch.isin(completion_ids, stop_t)
    texts = [tokenizer.decode(row[keep], skip_special_tokens=True)
             for row, keep in zip(completion_ids, completion_mask.bool() & ~is_stop)]
    return Rollout(prompt=select_rows(batch, group), completion_ids=completion_ids, completion_mask=completion_mask,
                   logprobs=logps[:, :length] * completion_mask, truncated=truncated, texts=texts,
                   group=group, kept=kept, suppress_ids=suppress_t)


def prefill(model, batch, group, max_new_tokens, keep=False, capacity=0):
    """Run the prompts through the model's own forward (vision tower included) with their 3-D
    positions and copy each prompt's keys and values into the rows of its samples (`group`: the
    prompt of each row) in a fresh static cache. The prompts are left padded, so every row decodes
    its t-th token into the same slot: prompt length + t. With `keep` (compiled decoding) the cache is
    the row bucket's, at least `capacity` slots long, reused by every later call that fits it.

    Returns (cache, hidden state that predicts each row's first token [n, D], 3-D position of each
    row's first new token [3, rows, 1]: its valid prompt length plus the image's rope delta)."""
    out, first_pos = forward_prompts(model, batch)
    n, prompt_len = len(group), batch["input_ids"].shape[1]
    keys = out.cache.layers[0].keys                               # [prompts, kv_heads, prompt_len, head_dim]
    device = keys.device
    # Under autocast attention runs in the autocast dtype anyway, so the cache is kept in it.
    dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else keys.dtype
    length = rounded(max(prompt_len + max_new_tokens, capacity if keep else 0))
    shape = (len(out.cache.layers), padded_rows(n), keys.shape[1], length, keys.shape[3])
    cache = kv_cache(model, shape, dtype, device, keep)
    for layer, k, v in zip(out.cache.layers, cache.k, cache.v):
        k[:n, :, :prompt_len] = layer.keys[group]
        v[:n, :, :prompt_len] = layer.values[group]
    cache.valid.fill_(True)                                      # padding rows: anything, their output is dropped
    cache.valid[:n, :prompt_len] = batch["attention_mask"][group].bool()
    next_pos = torch.zeros(shape[1], 1, dtype=torch.long, device=device)
    next_pos[:n] = first_pos[group]
    return cache, out.last_hidden_state[group, -1], next_pos.expand(3, -1, -1)


def forward_prompts(model, batch):
    """The prompts through the model's own forward (vision tower included) at their 3-D positions, with
    the model's cache on. Returns (output, position of each prompt's first new token [prompts, 1])."""
    positions, deltas = rope_positions(model, batch["input_ids"], batch["attention_mask"],
                                       batch["mm_token_type_ids"], batch["image_grid_thw"])
    out = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=positions,
                      pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"], use_cache=True)
    return out, batch["attention_mask"].sum(-1, keepdim=True) + deltas.to(positions.device)


def decode_step(model, cache, tokens, positions, slot):
    """Advance every row by one token: `tokens` [rows, 1] at 3-D positions [3, rows, 1] go through
    the text decoder, their keys and values are written into cache slot `slot` ([1]), and each
    row attends to its valid slots up to `slot`. Returns the final hidden states [rows, D].

    The model's own layers, written out as in gpt-fast: every shape is fixed, so the step can be
    captured as one CUDA graph. Attention is `attend` whatever the model's attention implementation."""
    text = model.model.language_model
    rows, kv_heads = tokens.shape[0], cache.k[0].shape[1]
    h = text.embed_tokens(tokens)
    cos, sin = text.rotary_emb(h, positions)
    visible = (cache.valid & (cache.slots <= slot))[:, None, None, :]
    for layer, k_cache, v_cache in zip(text.layers, cache.k, cache.v):
        att = layer.self_attn
        x = layer.input_layernorm(h)
        q, k, v = (proj(x).view(rows, 1, -1, att.head_dim) for proj in (att.q_proj, att.k_proj, att.v_proj))
        if hasattr(att, "q_norm"):                          # Qwen3-VL: RMS-norm of each head's query and key
            q, k = att.q_norm(q), att.k_norm(k)
        q, k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        k_cache.index_copy_(2, slot, k.to(k_cache.dtype))
        v_cache.index_copy_(2, slot, v.transpose(1, 2).to(v_cache.dtype))
        # Grouped-query attention without repeating K/V: the query heads that share a K/V head
        # (consecutive, as in the model) attend as that head's group of queries.
        q = q.reshape(rows, kv_heads, -1, att.head_dim).to(k_cache.dtype)
        o = attend(q, k_cache, v_cache, visible, att.scaling)
        h = h + att.o_proj(o.reshape(rows, 1, -1))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return text.norm(h)[:, 0]


def attend(q, k, v, visible, scale):
    """softmax(q·kᵀ · scale, over the visible slots) · v for a step's queries [rows, kv_heads, queries, head_dim].
    On CUDA, SDPA's fused kernel. Elsewhere two matmuls and a softmax in fp32, as the fused kernel computes: at one
    query per row its fixed cost per call on a CPU is several times theirs (docs/performance.md)."""
    if q.is_cuda:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scale)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)).mul_(scale).masked_fill_(~visible, float("-inf"))
    return torch.matmul(scores.softmax(-1), v.float()).to(v.dtype)


def static_cache_fits(model):
    """Whether decode_step computes this model's text layers: Qwen2-VL, Qwen2.5-VL and Qwen3-VL (plain
    grouped-query attention). Qwen3.5's hybrid decoder (linear-attention layers with a recurrent state,
    gated attention) decodes with its own forward and cache: prefill_own / own_decode_step."""
    return model.config.model_type in ATTENTION_ONLY


@dataclass
class ModelCache:
    """The model's own cache (for Qwen3.5: each linear-attention layer's convolution and recurrent state,
    each attention layer's keys and values) and the attention mask, one column longer per step."""
    cache: object
    mask: torch.Tensor    # [rows, prompt + tokens so far]


def prefill_own(model, batch, group, max_new_tokens, keep=False, capacity=0):
    """prefill for decoders decode_step does not compute: the model's forward fills its own cache, whose
    rows are then repeated for each prompt's samples (`group`). Same returns as prefill."""
    out, first_pos = forward_prompts(model, batch)
    out.cache.reorder_cache(group)
    state = ModelCache(out.cache, batch["attention_mask"][group])
    return state, out.last_hidden_state[group, -1], first_pos[group].expand(3, -1, -1)


def own_decode_step(model, state, tokens, positions, slot):
    """decode_step through the model's own text decoder and cache (eager; the mask grows by a column)."""
    state.mask = torch.cat([state.mask, state.mask.new_ones(len(tokens), 1)], 1)
    out = model.model.language_model(input_ids=tokens, attention_mask=state.mask, position_ids=positions,
                                     cache=state.cache, use_cache=True)
    return out.last_hidden_state[:, -1]


@functools.cache
def warn_once(message):
    log.warning(message)


@functools.cache
def compiled_decode_step(cuda=True):
    """decode_step compiled once or twice per row bucket (the cache length is dynamic: see window) and, on CUDA,
    replayed as CUDA graphs, one recorded per row bucket x attended window; inductor alone elsewhere."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    step = torch.compile(decode_step, mode="reduce-overhead" if cuda else None, fullgraph=True, dynamic=False)

    def run(*args):
        if cuda:
            torch.compiler.cudagraph_mark_step_begin()   # the last step's output is consumed: its memory may be reused
        return step(*args)
    return run


def padded_rows(n):
    """Rows the decode step runs for n samples: the next of 1, 2, 4, 8, 16, then of 32, 48, 64, ...
    so a few captured graphs serve every batch; padding rows are computed and dropped."""
    return 1 << (n - 1).bit_length() if n <= 16 else -(-n // 16) * 16


def rounded(slots):
    return -(-slots // CACHE_ROUND) * CACHE_ROUND


def kv_cache(model, shape, dtype, device, keep=False):
    """A KVCache of `shape` (layers, rows, kv_heads, length, head_dim). With `keep` (compiled decoding) there is
    one cache per row bucket, kept on the model and reused by every call whose length fits it, so a captured
    CUDA graph finds its cache at the same address and nothing is allocated (or recorded) again; prefill sizes
    it once for the longest prompt and completion. A longer call replaces it (one compiled step serves every
    length: the length is marked dynamic)."""
    caches = model.__dict__.setdefault("_kv_caches", {}) if keep else {}
    layers, rows, kv_heads, length, head_dim = shape
    key = (layers, rows, kv_heads, head_dim, dtype)
    if key not in caches or caches[key].slots.shape[0] < length:
        new = [torch.zeros(rows, kv_heads, length, head_dim, dtype=dtype, device=device) for _ in range(2 * layers)]
        caches[key] = KVCache(new[:layers], new[layers:], torch.ones(rows, length, dtype=torch.bool, device=device),
                              torch.arange(length, device=device))
    return caches[key]


def window(cache, slot, compiled=False):
    """`cache` cut to its first slots up to `slot`, rounded up to CACHE_ROUND: a step attends over these only, so
    its cost follows the current length. Views of the cache's own buffers, made once per size and reused, with
    the length dynamic when `compiled`: one compiled step for every window that is the whole cache and one for
    every shorter (strided) window, at fixed addresses for CUDA graphs."""
    size = min(rounded(slot + 1), cache.slots.shape[0])
    if size not in cache.windows:
        cut = KVCache([k[:, :, :size] for k in cache.k], [v[:, :, :size] for v in cache.v], cache.valid[:, :size],
                      cache.slots[:size])
        for tensor, length_dim in [*((t, 2) for t in cut.k + cut.v), (cut.valid, 1), (cut.slots, 0)] if compiled else ():
            torch._dynamo.mark_static_address(tensor)
            torch._dynamo.maybe_mark_dynamic(tensor, length_dim)
        cache.windows[size] = cut
    return cache.windows[size]


def first_stop_mask(completion_ids, stop_ids):
    """(mask [N, T]: 1 up to and including the first stop token, truncated [N]: no stop token at all).

    Masking by `!= pad` would drop the real EOS when pad and EOS share an id, as in Qwen2-VL's tokenizer."""
    is_stop = torch.isin(completion_ids, torch.as_tensor(stop_ids, device=completion_ids.device)).long()
    return ((is_stop.cumsum(1) - is_stop) == 0).long(), ~is_stop.bool().any(1)


def sample(logp, top_p=1.0, generators=None, group_size=1):
    """Draw one token per row from softmax(logp) restricted to its top-p nucleus (Gumbel-max trick).

    argmax(logp + Gumbel noise) is an exact sample; drawing the noise from one generator per group
    of `group_size` rows makes each group's samples reproducible on their own."""
    if top_p < 1.0:
        sorted_logp, order = logp.sort(-1, descending=True)
        outside = sorted_logp.exp().cumsum(-1) - sorted_logp.exp() >= top_p   # the top token always stays
        logp = logp.scatter(-1, order, sorted_logp.masked_fill(outside, float("-inf")))
    if generators is None:
        u = torch.rand_like(logp)
    else:
        u = torch.cat([torch.rand(group_size, logp.shape[1], generator=g, device=logp.device) for g in generators])
    return (logp - torch.log(-torch.log(u.clamp(1e-20, 1 - 1e-7)))).argmax(-1)

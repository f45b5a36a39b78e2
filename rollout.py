"""rollout.py: sample M completions per image-question (or one greedy answer, for evaluation).

    ro = generate(policy, tokenizer, image_processor, images, questions, num_samples=4, temperature=1.0)
    ro.texts, ro.completion_ids, ro.completion_mask, ro.truncated

One prefill per prompt is shared by its M samples: the prompt and image are encoded once, then the
KV cache is repeated M times (nanochat's pattern). The decoding loop is written out so every
choice is visible: vision special tokens are suppressed (a sampled `<|image_pad|>` would break the
next forward, METHOD.md §9.5), positions are the model's 3-D M-RoPE positions carried forward one
text position per token, and a completion ends at its first stop token, which is kept in the mask.
"""
import logging
from dataclasses import dataclass

import torch

from model import MAX_PROMPT_LEN, build_inputs, rope_positions, select_rows, special_ids

log = logging.getLogger(__name__)


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
    suppress_ids: list            # token ids removed from the sampling distribution

    def rows(self, idx):
        """(prompt sub-batch, completion ids, completion mask) for rows `idx`, e.g. one micro-batch,
        with the completion columns cut to the longest of these rows (no forward over padding)."""
        idx = torch.as_tensor(idx, dtype=torch.long, device=self.completion_ids.device)
        length = max(int(self.completion_mask[idx].sum(1).max()), 1)
        return select_rows(self.prompt, idx), self.completion_ids[idx, :length], self.completion_mask[idx, :length]


@torch.no_grad()
def generate(model, tokenizer, image_processor, images, questions, num_samples=4, temperature=1.0, top_p=1.0,
             max_new_tokens=256, greedy=False, style="r1vl", max_prompt_len=MAX_PROMPT_LEN, prompts=None, seeds=None,
             ignore_eos=False):
    """Sample `num_samples` completions for each (image, question); greedy=True takes the argmax.

    `seeds` (one per input) gives each prompt's group its own random stream, so its samples do not
    depend on which other prompts share the batch (or rank); without it the global RNG is used.
    `ignore_eos` generates exactly `max_new_tokens` per completion (fixed workloads for benchmarks).
    """
    batch = build_inputs(tokenizer, image_processor, images, questions, style, max_prompt_len, prompts)
    skipped = len(images) - (len(batch["kept"]) if batch else 0)
    if skipped:
        log.warning("skipped %d of %d prompts longer than %d tokens", skipped, len(images), max_prompt_len)
    if batch is None:
        return None
    device = next(model.parameters()).device
    kept = batch.pop("kept")
    batch = {k: v.to(device) if v is not None else None for k, v in batch.items()}
    suppress, stop = special_ids(tokenizer)
    stop = [] if ignore_eos else stop
    stop_t, pad = torch.tensor(stop, device=device), tokenizer.pad_token_id
    m = num_samples
    generators = None if seeds is None else [torch.Generator(device).manual_seed(int(seeds[i])) for i in kept]

    # Prefill once per prompt with the model's own 3-D positions, then repeat the cache M times.
    positions, deltas = rope_positions(model, batch["input_ids"], batch["attention_mask"],
                                       batch["mm_token_type_ids"], batch["image_grid_thw"])
    was_training = model.training
    model.eval()
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=positions,
                pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"], use_cache=True,
                logits_to_keep=1)
    cache = out.past_key_values
    if m > 1:
        cache.batch_repeat_interleave(m)
    logits = out.logits[:, -1].repeat_interleave(m, 0)
    attention = batch["attention_mask"].repeat_interleave(m, 0)
    # After the prompt, text positions advance by one per token from (valid length + delta).
    next_pos = (attention.sum(-1, keepdim=True) + deltas.to(device).repeat_interleave(m, 0))
    n = logits.shape[0]
    done = torch.zeros(n, dtype=torch.bool, device=device)
    tokens, logps = [], []
    for _ in range(max_new_tokens):
        logits = logits.float() / (1.0 if greedy else temperature)
        logits[:, suppress] = float("-inf")
        logp = logits.log_softmax(-1)
        tok = logp.argmax(-1) if greedy else sample(logp, top_p, generators, m)
        tok = torch.where(done, torch.full_like(tok, pad), tok)
        tokens.append(tok), logps.append(logp.gather(1, tok[:, None]).squeeze(1))
        done |= torch.isin(tok, stop_t)
        if bool(done.all()):
            break
        attention = torch.cat([attention, torch.ones_like(attention[:, :1])], 1)
        out = model(input_ids=tok[:, None], attention_mask=attention, position_ids=next_pos, past_key_values=cache,
                    use_cache=True)
        logits, next_pos = out.logits[:, -1], next_pos + 1
    model.model.rope_deltas = None
    model.train(was_training)

    completion_ids = torch.stack(tokens, 1)
    completion_mask, truncated = first_stop_mask(completion_ids, stop_t)
    is_stop = torch.isin(completion_ids, stop_t)
    texts = [tokenizer.decode(ids[keep], skip_special_tokens=True)
             for ids, keep in zip(completion_ids, completion_mask.bool() & ~is_stop)]
    group = torch.arange(len(kept), device=device).repeat_interleave(m)
    return Rollout(prompt=select_rows(batch, group), completion_ids=completion_ids, completion_mask=completion_mask,
                   logprobs=torch.stack(logps, 1) * completion_mask, truncated=truncated, texts=texts,
                   group=group, kept=kept, suppress_ids=suppress)


def first_stop_mask(completion_ids, stop_ids):
    """(mask [N, T]: 1 up to and including the first stop token, truncated [N]: no stop token at all).

    Masking by `!= pad` would drop the real EOS when pad and EOS share an id (METHOD.md §9.8)."""
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

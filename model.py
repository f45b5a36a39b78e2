"""model.py: load Qwen2-VL (or Qwen2.5-VL, Qwen3-VL, Qwen3.5: qwen/families.py), build its inputs, and score completions.

    policy, tokenizer, image_processor = load("Qwen/Qwen2-VL-2B-Instruct")   # or a local dir, or "tiny"
    batch = build_inputs(tokenizer, image_processor, [image], ["What is 2+3?"])
    logp = completion_logprobs(policy, batch, completion_ids, temperature=1.0)

Everything the RL step needs from the model lives here: the prompt (the R1-VL instruction in the
model's own chat template), the image-token expansion, the 3-D M-RoPE positions, the per-token
log-probs of completion tokens.
`Qwen2VLProcessor` is not used (it cannot be built without torchvision), so inputs are made from
the tokenizer and the image processor directly, the same way it makes them.
"""
import functools
import importlib.util
import inspect
import json
import os

import torch
import transformers
from torch.distributed.fsdp import FSDPModule
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

# The paper's image limits, 3,136 to 400,000 pixels for Qwen2-VL, as visual tokens (one merged token per
# (patch x merge)^2 pixels: 28 x 28 for Qwen2/2.5-VL, 32 x 32 for Qwen3-VL/3.5), so every family sees an
# image as the same number of tokens: 4 to 510.
MIN_TOKENS, MAX_TOKENS = 3136 / 28 ** 2, 400_000 / 28 ** 2
MAX_PROMPT_LEN = 1024                      # longer prompts are skipped, never cut into image tokens
VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
STOP_TOKENS = ["<|im_end|>", "<|endoftext|>"]
ATTENTION_ONLY = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")   # decoders whose cache is keys and values (not Qwen3.5)
SYSTEM = "You are a helpful assistant."   # Qwen2-VL's default system turn; R1-VL sets no other

# Our wording of the R1-VL instruction: it names every section of the response format.
R1VL_INSTRUCTION = (
    "Answer the question about the image. Reason step by step and reply in exactly this format:\n"
    "### Image Description:\n### Rationales:\n### Let's think step by step.\n### Step 1:\n"
    "### Step 2: (as many steps as needed)\n### The final answer is: <answer>\n\nQuestion: {question}")
PLAIN_INSTRUCTION = "{question}\nAnswer the question using a single word or phrase."


# ----------------------------------------------------------------------------- loading

def cuda_config(device):
    """Whether a run on `device` takes the CUDA configuration: bf16 weights or autocast, a bf16 sampling copy,
    the compiled decode step, AdamW's fused step. On a GPU; and on the CPU with STEPGRPO_CUDA_STANDIN=1, which
    the tests set to run that configuration without one (inductor there, CUDA graphs need a GPU)."""
    return torch.device(device).type == "cuda" or os.environ.get("STEPGRPO_CUDA_STANDIN") == "1"


def load(name, device=None, dtype=None, attn_implementation=None, min_pixels=None, max_pixels=None, build=None):
    """Return (model, tokenizer, image_processor) for a hub id or a local directory; or, with `build`, for
    what `build()` returns in place of a checkpoint (the tiny models: `build=qwen.tiny.builder("tiny")`).

    bf16 on CUDA (cuda_config), fp32 on CPU unless `dtype` says otherwise; SDPA attention, or flash-attention-2
    when it is installed, a GPU is present and the weights are half precision. One pixel range is
    set on the image processor and used everywhere (rollout, scoring, evaluation), so the number of
    image tokens never differs: [MIN_TOKENS, MAX_TOKENS] visual tokens unless pixels are given.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if isinstance(dtype, str):
        dtype = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
                 "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}[dtype]
    dtype = dtype or (torch.bfloat16 if cuda_config(device) else torch.float32)
    if attn_implementation is None:
        fa2 = device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None
        attn_implementation = "flash_attention_2" if fa2 and dtype != torch.float32 else "sdpa"
    if build is not None:
        model, tokenizer, image_processor = build()
        model = model.to(dtype)
    else:
        if not os.path.isdir(name) and (name.startswith(".") or name.startswith("/")):
            raise FileNotFoundError(f"model directory {name!r} does not exist")
        where = hub_access(name)
        check_vision(name, transformers.AutoConfig.from_pretrained(name, **where))
        tokenizer = AutoTokenizer.from_pretrained(name, **where)
        tokenizer.chat_template = tokenizer.chat_template or processor_chat_template(name, **where)
        image_processor = AutoImageProcessor.from_pretrained(name, **where)
        model = AutoModelForImageTextToText.from_pretrained(name, dtype=dtype, attn_implementation=attn_implementation,
                                                            **where)
        set_pixel_range(image_processor, MIN_TOKENS, MAX_TOKENS)
    if min_pixels or max_pixels:   # pixels given by the user win
        size = image_processor.size
        image_processor.size = {"shortest_edge": min_pixels or size["shortest_edge"], "longest_edge": max_pixels or size["longest_edge"]}
    tokenizer.padding_side = "left"
    model.config.use_cache = True
    return model.to(device), tokenizer, image_processor


def hub_access(name, timeout=3):
    """from_pretrained's keywords for `name`: {} for a local folder or when the hub answers; offline
    (HF_HUB_OFFLINE, or no answer within `timeout` s) a hub id in the local cache loads from it, and one not
    in it is an OSError at once, saying so (transformers would retry for about a minute first)."""
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.utils import get_session
    if os.path.isdir(name):
        return {}
    why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else None
    if why is None:
        try:
            get_session().head(constants.ENDPOINT, timeout=timeout)
            return {}
        except Exception as e:     # any failure to get an answer: offline for this load
            why = f"{constants.ENDPOINT} does not answer ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return {"local_files_only": True}
    raise OSError(f"{name} is not a local folder, the hub cannot be reached ({why}) and it is not in the local "
                  "cache: pass a local folder, or download it where there is a network")


def check_vision(name, config):
    """ValueError for a model without a vision tower (a text-only LM): name the families that have one."""
    if getattr(config, "vision_config", None) is None:   # the families are qwen/families.py's FAMILIES
        raise ValueError(f"{name} has no vision tower (model_type {config.model_type!r}, a text-only model): pass a "
                         "vision-language model of a supported family: Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5")


def processor_chat_template(name, **where):
    """The chat template a checkpoint keeps for its processor (chat_template.jinja or .json) when its
    tokenizer has none; Qwen2-VL's format (CHAT_TEMPLATE) when it has neither."""
    for file in ("chat_template.jinja", "chat_template.json"):
        path = transformers.utils.cached_file(name, file, _raise_exceptions_for_missing_entries=False, **where)
        if path:
            text = open(path).read()
            return json.loads(text)["chat_template"] if file.endswith(".json") else text
    return CHAT_TEMPLATE


def set_pixel_range(image_processor, min_tokens, max_tokens):
    """The image processor resizes every image to [min_tokens, max_tokens] merged visual tokens (keeping
    aspect); in pixels that is tokens x (patch x merge)^2, which depends on the family's patch size."""
    unit = (image_processor.patch_size * image_processor.merge_size) ** 2
    image_processor.size = {"shortest_edge": round(min_tokens * unit), "longest_edge": round(max_tokens * unit)}


SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                  "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>"] + VISION_TOKENS

# Qwen2-VL's chat format as a Jinja template, so `apply_chat_template` gives the prompts we build.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\n" + SYSTEM + "<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


# ----------------------------------------------------------------------------- inputs

def prompt_text(tokenizer, question, style="r1vl", image=True):
    """The chat prompt for one question, from the model's own chat template: one user turn (the image, then
    the instruction) and the assistant header. `image` may be a number of images: a question holding as many
    `<image>` tags gets each image where its tag stands, else the images come first. Templates with a thinking
    switch (Qwen3.5) get it off: the R1-VL reply is the reasoning, so no <think> block is opened
    (rewards.visible_reply drops one anyway)."""
    instruction = {"r1vl": R1VL_INSTRUCTION, "plain": PLAIN_INSTRUCTION}[style].format(question=question)
    parts, n = instruction.split("<image>"), int(image)
    if n and len(parts) == n + 1:
        content = [c for k, text in enumerate(parts) for c in ([{"type": "image"}] if k else [])
                   + ([{"type": "text", "text": text}] if text else [])]
    else:
        content = [{"type": "image"}] * n + [{"type": "text", "text": instruction}]
    return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=False)


def build_inputs(tokenizer, image_processor, images, questions, style="r1vl", max_prompt_len=MAX_PROMPT_LEN,
                 prompts=None):
    """Tokenise a batch of (image, question) into left-padded model inputs.

    An image may be None (a question without one) or a list of images (several in one prompt, in order;
    prompt_text places them). Each `<|image_pad|>` is expanded to t·h·w / merge² tokens of its image from
    `image_grid_thw`, as the processor does. Prompts longer than `max_prompt_len` are dropped (never
    truncated into image tokens): `batch["kept"]` lists the indices that remain. `prompts` overrides the chat
    text (SFT uses it). Returns input_ids, attention_mask, mm_token_type_ids (0 text, 1 image), pixel_values
    (rows of all images in batch order), image_grid_thw (one row per image), kept.
    """
    merge = image_processor.merge_size
    per_row = [[] if im is None else list(im) if isinstance(im, (list, tuple)) else [im] for im in images]
    texts = prompts or [prompt_text(tokenizer, q, style, image=len(ims)) for ims, q in zip(per_row, questions)]
    flat = [im for ims in per_row for im in ims]
    first = [sum(map(len, per_row[:i])) for i in range(len(per_row))]     # row -> index of its first image
    pixel_values = grid = None
    if flat:
        enc = image_processor(images=flat, return_tensors="pt")
        pixel_values, grid = enc["pixel_values"], enc["image_grid_thw"]
    n_image_tokens = (grid.prod(-1) // merge ** 2).tolist() if flat else []
    rows, kept = [], []
    for i, text in enumerate(texts):
        pieces = text.split("<|image_pad|>")
        if len(pieces) - 1 != len(per_row[i]):
            raise ValueError(f"prompt {i} has {len(pieces) - 1} image placeholders for {len(per_row[i])} images")
        counts = n_image_tokens[first[i]:first[i] + len(per_row[i])]
        text = pieces[0] + "".join("<|image_pad|>" * n + piece for n, piece in zip(counts, pieces[1:]))
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > max_prompt_len:
            continue
        rows.append(ids)
        kept.append(i)
    if not rows:
        return None
    image_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    length = max(map(len, rows))
    input_ids = torch.full((len(rows), length), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), length, dtype=torch.long)
    for r, ids in enumerate(rows):                                    # left padding for generation
        input_ids[r, length - len(ids):] = torch.tensor(ids)
        attention_mask[r, length - len(ids):] = 1
    if flat:                                                          # keep only the kept rows' image blocks
        offsets = [0] + (grid.prod(-1)).cumsum(0).tolist()
        keep = [b for i in kept for b in range(first[i], first[i] + len(per_row[i]))]
        pixel_values = torch.cat([pixel_values[offsets[b]:offsets[b + 1]] for b in keep]) if keep else None
        grid = grid[keep] if keep else None
    batch = dict(input_ids=input_ids, attention_mask=attention_mask,
                 mm_token_type_ids=(input_ids == image_id).long(), pixel_values=pixel_values,
                 image_grid_thw=grid, kept=kept)
    check_image_tokens(batch, merge)
    return batch


def check_image_tokens(batch, merge):
    """#image-pad tokens must equal Σ t·h·w / merge² and pixel rows Σ t·h·w; a mismatch would silently
    pair image features with the wrong tokens."""
    grid, n_tokens = batch["image_grid_thw"], int(batch["mm_token_type_ids"].sum())
    expected = 0 if grid is None else int(grid.prod(-1).sum()) // merge ** 2
    rows = 0 if batch["pixel_values"] is None else batch["pixel_values"].shape[0]
    if n_tokens != expected or rows != expected * merge ** 2:
        raise ValueError(f"image tokens ({n_tokens}) / pixel rows ({rows}) do not match image_grid_thw ({expected})")


def select_rows(batch, rows):
    """The sub-batch of `rows`, keeping each row's block of pixel_values with it (pixel_values holds the
    images of all rows back to back, so plain row indexing would give a row another row's image)."""
    rows = torch.as_tensor(rows, dtype=torch.long)
    out = {k: v[rows] for k, v in batch.items() if k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    if batch["image_grid_thw"] is None:
        return {**out, "pixel_values": None, "image_grid_thw": None}
    blocks, offsets = image_blocks(batch)
    picked = [b for r in rows.tolist() for b in blocks[r]]
    out["pixel_values"] = torch.cat([batch["pixel_values"][offsets[b]:offsets[b + 1]] for b in picked]) if picked else None
    out["image_grid_thw"] = batch["image_grid_thw"][picked] if picked else None
    return out


def image_blocks(batch):
    """([indices of each row's image blocks], offsets of the blocks in pixel_values): a row's images are its runs of
    image tokens, in order."""
    mm = batch["mm_token_type_ids"].bool()
    per_row = ((mm[:, 1:] & ~mm[:, :-1]).sum(-1) + mm[:, 0]).tolist()
    first = [sum(per_row[:r]) for r in range(len(per_row))]
    sizes = batch["image_grid_thw"].prod(-1)
    return [list(range(f, f + n)) for f, n in zip(first, per_row)], [0, *sizes.cumsum(0).tolist()]


def shared_prompts(batch):
    """(first row of each distinct prompt, index of each row's prompt among those) when rows repeat a prompt, as
    the M samples of a group do (same tokens, mask and pixels); None when every prompt is distinct."""
    ids, mask = batch["input_ids"].tolist(), batch["attention_mask"].tolist()
    images = [[] for _ in ids]
    if batch["image_grid_thw"] is not None:
        blocks, offsets = image_blocks(batch)
        images = [[batch["pixel_values"][offsets[b]:offsets[b + 1]] for b in row] for row in blocks]

    def same(r, f):   # equal tokens give equal runs of image tokens: as many images
        return ids[r] == ids[f] and mask[r] == mask[f] and all(map(torch.equal, images[r], images[f]))
    first, of_row = [], []
    for r in range(len(ids)):
        u = next((u for u, f in enumerate(first) if same(r, f)), len(first))
        first += [r] if u == len(first) else []
        of_row.append(u)
    return None if len(first) == len(ids) else (first, of_row)


# ----------------------------------------------------------------------------- positions and scoring

def rope_positions(model, input_ids, attention_mask, mm_token_type_ids, image_grid_thw):
    """3-D M-RoPE positions [3, B, L] and per-row deltas [B, 1], computed by the model's own rule.

    Positions are never built from cumsum(attention_mask): image tokens share (t, h, w) positions,
    so the text after an image starts at max(position) + 1.
    """
    inner = model.model
    kwargs = dict(image_grid_thw=image_grid_thw, attention_mask=attention_mask)
    if "mm_token_type_ids" in inspect.signature(inner.get_rope_index).parameters:   # transformers >= 5
        kwargs["mm_token_type_ids"] = mm_token_type_ids
    return inner.get_rope_index(input_ids, **kwargs)


def completion_logprobs(model, batch, completion_ids, temperature=1.0, suppress_ids=None, chunk_size=256):
    """log π(o_t | q, o_<t) for every completion token, shape [B, T], teacher-forced (a prompt that rows repeat
    runs once: score_tokens).

    The logits are divided by the sampling temperature, and `suppress_ids` (tokens the sampler may
    never emit) are removed from the softmax, so these are the log-probs of the distribution that
    was actually sampled. Only completion positions reach the LM head, in row chunks of fp32
    log-softmax, each checkpointed under autograd so no full-vocabulary activation is kept.
    Positions are explicit, so no `rope_deltas` left by an earlier `generate` can shift them.
    """
    input_ids = torch.cat([batch["input_ids"], completion_ids], 1)
    attention_mask = torch.cat([batch["attention_mask"], torch.ones_like(completion_ids)], 1)
    mm = torch.cat([batch["mm_token_type_ids"], torch.zeros_like(completion_ids)], 1)
    positions, _ = rope_positions(model, input_ids, attention_mask, mm, batch["image_grid_thw"])
    model.model.rope_deltas = None
    # Rows that repeat a prompt (a group's M samples) run it once: see score_tokens.
    share = shared_prompts(batch) if shares_prompts(model) else None
    pixels = batch if share is None else select_rows(batch, share[0])
    # An FSDP2 model (training/parallel.py) carries `score_tokens` as a registered forward of its root, so
    # that the root's weights (embeddings, LM head, norms) are gathered around this call and its backward.
    score = getattr(model, "score_tokens", None) or functools.partial(score_tokens, model)
    return score(input_ids, attention_mask, positions, pixels["pixel_values"], pixels["image_grid_thw"], completion_ids,
                 temperature, suppress_ids, chunk_size, share)


def shares_prompts(model):
    """Whether score_tokens may run a repeated prompt once: decoders whose cache is keys and values (not Qwen3.5's
    recurrent state), without activation checkpointing (which runs the layers without a cache), and not under FSDP,
    whose ranks must run the same sharded forwards whichever of their rows repeat a prompt."""
    return model.config.model_type in ATTENTION_ONLY and not isinstance(model, FSDPModule) and not model.is_activation_checkpointing


def score_tokens(model, input_ids, attention_mask, positions, pixel_values, image_grid_thw, completion_ids,
                 temperature, suppress_ids, chunk_size, share=None):
    """completion_logprobs once its inputs are built: the trunk's forward, then the fp32 LM head in chunks.

    With `share` (first row of each distinct prompt, each row's prompt; pixel_values holds the distinct prompts'
    images) each distinct prompt, image included, goes through the trunk once with the cache on; its keys and
    values are repeated for its rows, and the completions run on from them. Gradients flow back through the
    repeated keys and values into the one prompt pass, so the loss and its gradient are those of the full rows,
    with (M - 1) / M of the prompt's and the vision tower's work left out."""
    prompt_len = input_ids.shape[1] - completion_ids.shape[1]
    if share is None:
        hidden = model.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                             pixel_values=pixel_values, image_grid_thw=image_grid_thw, use_cache=False).last_hidden_state
        hidden = hidden[:, prompt_len - 1:-1]                                # states that predict o_t
    else:
        first, of_row = (torch.as_tensor(x, device=input_ids.device) for x in share)
        out = model.model(input_ids=input_ids[first, :prompt_len], attention_mask=attention_mask[first, :prompt_len],
                          position_ids=positions[:, first, :prompt_len], pixel_values=pixel_values,
                          image_grid_thw=image_grid_thw, use_cache=True)
        hidden = out.last_hidden_state[of_row, -1:]
        if completion_ids.shape[1] > 1:
            out.cache.reorder_cache(of_row)
            rest = model.model(input_ids=input_ids[:, prompt_len:-1], attention_mask=attention_mask[:, :-1],
                               position_ids=positions[:, :, prompt_len:-1], cache=out.cache, use_cache=True)
            hidden = torch.cat([hidden, rest.last_hidden_state], 1)
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = completion_ids.reshape(-1)
    weight, bias = fp32_head(model)
    out = []
    for s in range(0, len(targets), chunk_size):
        args = (hidden[s:s + chunk_size], targets[s:s + chunk_size], weight, bias, temperature, suppress_ids)
        if torch.is_grad_enabled():
            out.append(torch.utils.checkpoint.checkpoint(_token_logprobs, *args, use_reentrant=False))
        else:
            out.append(_token_logprobs(*args))
    return torch.cat(out).reshape(completion_ids.shape).clone()   # not a view: FSDP hooks the root's output


def _token_logprobs(hidden, targets, weight, bias, temperature, suppress_ids):
    return head_logprobs(hidden, weight, bias, temperature, suppress_ids).gather(1, targets[:, None]).squeeze(1)


def fp32_head(model):
    """(weight, bias) of the LM head in fp32, cast once per call (a no-op for fp32 weights)."""
    head = model.lm_head
    return head.weight.float(), None if head.bias is None else head.bias.float()


def head_logprobs(hidden, weight, bias=None, temperature=1.0, suppress_ids=None):
    """log-softmax((hidden · Wᵀ + b) / temperature) over the vocabulary without `suppress_ids`, in fp32.

    Autocast is switched off and the hidden state is cast up, so the logits are an fp32 matmul
    even when the trunk ran in bf16; the sampler (rollout.py) and the scorer call this same
    function, so sampling and scoring log-probs differ only by what the trunk computed."""
    with torch.autocast(hidden.device.type, enabled=False):
        logits = torch.nn.functional.linear(hidden.float(), weight.float(), bias) / temperature
    if suppress_ids is not None:
        logits[:, suppress_ids] = float("-inf")
    return logits.log_softmax(-1)


# ----------------------------------------------------------------------------- weights and special tokens

def is_matmul(module):
    """Linear and convolution layers: those whose weights autocast casts (and sampling_copy.inference_copy holds cast)."""
    return isinstance(module, (torch.nn.Linear, torch.nn.modules.conv._ConvNd))


def special_ids(tokenizer):
    """(ids the sampler must never emit, ids that end a completion)."""
    def ids(tokens):
        found = [tokenizer.convert_tokens_to_ids(t) for t in tokens]
        return sorted({i for i in found if i is not None and i != tokenizer.unk_token_id})
    return ids(VISION_TOKENS), sorted(set(ids(STOP_TOKENS)) | {tokenizer.eos_token_id})

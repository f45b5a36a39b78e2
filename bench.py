"""bench.py: time one StepGRPO step on a fixed workload and print a table and a JSON line.

    python bench.py                         # tiny Qwen2-VL on CPU (about a minute)
    python bench.py --model qwen2-vl-2b     # the Qwen2-VL-2B architecture with random weights (CUDA)
    python bench.py --model out/final       # any local model directory

The workload is the one ../shared/peer/trl_grpo_step.py gives TRL's GRPOTrainer (prompts per step,
M samples, a fixed completion length with EOS disabled, one 112x112 image per prompt, the same
short question), so the two step times compare directly. The step mirrors train.py's RL step
phase by phase: generate → reward → reference log-probs → policy forward/backward + AdamW step.
Also measured: the two fast paths of rollout.py/model.py against their plain alternatives (one
prefill per prompt vs. one per sample; chunked completion-only log-probs vs. one full-vocabulary
log-softmax), so each is kept only for a measured gain.
"""
import argparse, json, os, resource, statistics, time

import torch
from PIL import Image, ImageDraw

import model as M
import rollout
import toy
from stepgrpo import group_advantages, policy_loss

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}   # dense, per GPU, vendor figures

p = argparse.ArgumentParser()
p.add_argument("--model", default="tiny", help="'tiny', 'qwen2-vl-2b' (random weights) or a local directory")
p.add_argument("--prompts_per_step", type=int, default=2)
p.add_argument("--num_generations", type=int, default=4)
p.add_argument("--max_new_tokens", type=int, default=64)
p.add_argument("--image_size", type=int, default=112)
p.add_argument("--steps", type=int, default=6, help="timed steps; one more runs first as warm-up")
p.add_argument("--beta", type=float, default=0.04)
p.add_argument("--decode_table", nargs="?", const="1,4,8,16:64,256,1024", default=None,
               help="also time decoding per step, ROWS:LENGTHS (default 1,4,8,16:64,256,1024); off by default")
p.add_argument("--compile", action="store_true", help="decode table: compiled decode step (CUDA graphs)")
args = p.parse_args()

device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
cuda = device.type == "cuda"
amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda)
if args.model == "qwen2-vl-2b":
    _, tokenizer, image_processor = toy.load_tiny()   # its tokenizer, with the paper's pixel range
    M.set_pixel_range(image_processor, M.MIN_PIXELS, M.MAX_PIXELS)
    policy = M.random_init(tokenizer, image_processor, model_vocab=151936).to(device)   # 2B: random_init's defaults
else:
    policy, tokenizer, image_processor = M.load(args.model, device=device, dtype=torch.float32)
reference = M.load(args.model, device=device)[0] if os.path.isdir(args.model) else None
if reference is None:   # the same random weights, frozen, in the compute dtype
    import copy
    reference = copy.deepcopy(policy).to(torch.bfloat16 if cuda else torch.float32)
reference.eval().requires_grad_(False)
optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-6)
suppress_ids, _ = M.special_ids(tokenizer)
n_params = sum(q.numel() for q in policy.parameters())


def make_image(i, size):
    """The peer harness's picture: a coloured square and the number drawn on white."""
    im = Image.new("RGB", (size, size), "white")
    d = ImageDraw.Draw(im)
    d.rectangle([4, 4, size // 2, size // 2], fill=(37 * i % 255, 80, 160))
    d.text((size // 2, size // 2), str(i), fill="black")
    return im


def sync():
    if cuda:
        torch.cuda.synchronize()


def timed(fn):
    sync()
    t = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t


def prompts(step):
    ids = range(step * args.prompts_per_step, (step + 1) * args.prompts_per_step)
    chat = [tokenizer.apply_chat_template([{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": f"What number is shown? ({i})"}]}], tokenize=False,
        add_generation_prompt=True) for i in ids]   # the peer's prompt, through the same chat template
    return [make_image(i, args.image_size) for i in ids], [str(i) for i in ids], chat


def generate(images, chat, m):
    return rollout.generate(policy, tokenizer, image_processor, images, [""] * len(images), num_samples=m,
                            temperature=1.0, max_new_tokens=args.max_new_tokens, prompts=chat, ignore_eos=True)


def step(i):
    """One RL step, phase by phase (train.py's rl() without logging and checkpoints)."""
    images, answers, chat = prompts(i)
    m, t = args.num_generations, {}
    with amp:
        ro, t["generate"] = timed(lambda: generate(images, chat, m))
    rewards, t["reward"] = timed(lambda: torch.tensor([float(answers[g] in text)
                                                       for text, g in zip(ro.texts, ro.group.tolist())]))
    adv = group_advantages(rewards, m)[0].to(device)
    with torch.no_grad(), amp:
        ref, t["reference"] = timed(lambda: M.completion_logprobs(reference, ro.prompt, ro.completion_ids, 1.0,
                                                                  suppress_ids) if args.beta else None)

    def update():
        with amp:
            lp = M.completion_logprobs(policy, ro.prompt, ro.completion_ids, 1.0, suppress_ids)
        loss, _ = policy_loss(lp, None, ref, adv, ro.completion_mask, beta=args.beta)
        loss.backward()
        optimizer.step(), optimizer.zero_grad(set_to_none=True)
    _, t["update"] = timed(update)
    t["step"] = sum(t.values())
    tokens = ro.completion_ids.numel()
    prompt_tokens = int(ro.prompt["attention_mask"].sum())
    return t, tokens, prompt_tokens, ro


def fast_path_checks(ro):
    """Each fast path against its plain alternative, on the same inputs."""
    images, _, chat = prompts(0)
    m = args.num_generations
    with amp:
        _, shared = timed(lambda: generate(images, chat, m))
        _, per_sample = timed(lambda: generate([im for im in images for _ in range(m)],
                                               [c for c in chat for _ in range(m)], 1))
    out = {"generate_s_shared_prefill": shared, "generate_s_prefill_per_sample": per_sample}
    for name, chunk in (("chunked", 256), ("one_block", 10 ** 9)):
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        with amp:
            lp, secs = timed(lambda: M.completion_logprobs(policy, ro.prompt, ro.completion_ids, 1.0, suppress_ids,
                                                           chunk_size=chunk).sum().backward())
        policy.zero_grad(set_to_none=True)
        out[f"score_backward_s_{name}"] = secs
        if cuda:
            out[f"score_backward_peak_gib_{name}"] = torch.cuda.max_memory_allocated() / 2 ** 30
    return out


def memory_bandwidth():
    """Achievable device memory bandwidth (bytes/s) from a large copy: the roofline for decoding."""
    x = torch.empty(2 ** 28, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    _, secs = timed(lambda: [y.copy_(x) for _ in range(20)])
    return 2 * x.numel() * 20 / secs


torch.manual_seed(0)
step(0)                                        # warm-up (allocations, kernels)
if cuda:
    torch.cuda.reset_peak_memory_stats()
runs = [step(i + 1) for i in range(args.steps)]
med = {k: statistics.median(r[0][k] for r in runs) for k in runs[0][0]}
tokens, prompt_tokens, ro = runs[-1][1], runs[-1][2], runs[-1][3]
result = dict(model=args.model, device=torch.cuda.get_device_name() if cuda else f"CPU x{torch.get_num_threads()} threads",
              params=n_params, prompts_per_step=args.prompts_per_step, num_generations=args.num_generations,
              completion_tokens=args.max_new_tokens, image_size=args.image_size, steps=args.steps,
              **{f"{k}_s_median": round(v, 4) for k, v in med.items()},
              rollout_tokens_per_s=round(tokens / med["generate"], 1),
              scoring_tokens_per_s=round(tokens / med["reference"], 1) if args.beta else None)
if cuda:
    result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
    weight_bytes = 2 * n_params                          # bf16 weight copies read once per decoding step
    result["decode_bandwidth_roofline_frac"] = round(
        weight_bytes * args.max_new_tokens / med["generate"] / memory_bandwidth(), 3)
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in torch.cuda.get_device_name()), None)
    flops = 6 * n_params * (tokens + prompt_tokens)    # forward + backward over prompt and completion tokens
    result["update_mfu"] = round(flops / med["update"] / peak, 3) if peak else None
else:
    result["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2)
result.update({k: round(v, 4) for k, v in fast_path_checks(ro).items()})

print(f"{'phase':<12}{'median s':>10}")
for k in ("generate", "reward", "reference", "update", "step"):
    print(f"{k:<12}{med[k]:>10.4f}")
for k, v in result.items():
    if not k.endswith("_s_median"):
        print(f"{k:<34}{v}")
print(json.dumps(result))


# ----------------------------------------------------------------------------- decode scaling

def decode_table(rows_list, lengths, compile=False):
    """ms per decode step for `rows` samples of one prompt (shared prefill) at each completion length,
    with EOS off: (time for `length` tokens - time for 1 token) / (length - 1), so the prefill and
    the fixed costs drop out. Decodes from the bf16 inference copy on CUDA. On CUDA also the
    fraction of the bandwidth roofline: the bytes a step must read (text decoder weights and LM
    head, plus the whole static KV cache it attends over) at the measured copy bandwidth."""
    sampler = M.inference_copy(policy, torch.bfloat16) if cuda else policy
    images, _, chat = prompts(0)
    text = sampler.config.get_text_config()
    weight_bytes = sum(q.numel() * q.element_size() for name, q in sampler.named_parameters()
                       if not name.startswith("model.visual"))
    bandwidth = memory_bandwidth() if cuda else None

    def run(rows, length):
        with amp:
            return rollout.generate(sampler, tokenizer, image_processor, images[:1], [""], num_samples=rows,
                                    max_new_tokens=length, prompts=chat[:1], seeds=[0], ignore_eos=True,
                                    compile=compile)
    table = []
    for rows in rows_list:
        run(rows, 2)
        base = min(timed(lambda: run(rows, 1))[1] for _ in range(3))
        for length in lengths:
            if compile:
                run(rows, length)                             # compiles this (rows, cache length) shape
            ro, secs = min((timed(lambda: run(rows, length)) for _ in range(2)), key=lambda r: r[1])
            step_s = (secs - base) / (length - 1)
            row = dict(rows=rows, tokens=length, ms_per_step=round(1000 * step_s, 3))
            if cuda:
                cache_len = -(-(ro.prompt["input_ids"].shape[1] + length) // rollout.CACHE_ROUND) * rollout.CACHE_ROUND
                kv_bytes = (2 * text.num_hidden_layers * rollout.padded_rows(rows) * text.num_key_value_heads
                            * cache_len * (text.hidden_size // text.num_attention_heads) * 2)
                row["roofline_frac"] = round((weight_bytes + kv_bytes) / bandwidth / step_s, 3)
            table.append(row)
    for row in table:                                         # per rows: time per step relative to the shortest
        first = next(r for r in table if r["rows"] == row["rows"])
        row["vs_shortest"] = round(row["ms_per_step"] / first["ms_per_step"], 2)
    return table


if args.decode_table:
    rows_spec, lengths_spec = args.decode_table.split(":")
    table = decode_table([int(r) for r in rows_spec.split(",")], [int(n) for n in lengths_spec.split(",")],
                         args.compile)
    print(f"{'rows':>6}{'tokens':>8}{'ms/step':>10}{'vs shortest':>13}" + (f"{'roofline':>10}" if cuda else ""))
    for r in table:
        print(f"{r['rows']:>6}{r['tokens']:>8}{r['ms_per_step']:>10.3f}{r['vs_shortest']:>13.2f}"
              + (f"{r['roofline_frac']:>10.3f}" if cuda else ""))
    print(json.dumps({**result, "decode_compile": args.compile, "decode_table": table}))

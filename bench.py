"""bench.py: time train.py's own StepGRPO step on a fixed workload; print a table and a JSON line.

    python bench.py                                        # tiny Qwen2-VL on CPU, the small workload
    python bench.py --model qwen2-vl-2b                    # the Qwen2-VL-2B architecture, random weights (CUDA)
    python bench.py --model qwen2-vl-2b --workload paper   # R1-VL's step: 16 rows x 1,024 tokens, 640x480 image
    python bench.py --decode_table                         # also ms per decode step by rows x length
    python bench.py --memory                               # bytes per GPU at the paper step's peak (no GPU needed)
    python bench.py --model qwen2-vl-2b --workload paper --lora_rank 64   # that step's measured peak (CUDA)
    python bench.py --compile_vs_eager 16:2048             # ms per decode step, compiled and eager (CPU too)
    python bench.py --vs_trl /tmp/trl-venv/bin/python      # also TRL's GRPOTrainer step, same model and workload

Workloads (every completion exactly --max_new_tokens long: EOS is ignored, so runs compare):
    small  2 prompts x M = 4, 64 new tokens, one 112x112 image and a short question per prompt, β = 0.04.
    paper  the paper's step on one GPU: 1 prompt x 4 accumulation steps x M = 4 = 16 rows of 1,024 new
           tokens, one 640x480 image per prompt, T = 1.2, micro-batches of 4 rows.
The step is train.py's: a Run built by train.setup from the same flags as a training run, then
`collect` (generate, reward, advantages) and `update` (reference log-probs, micro-batched loss and
backward, AdamW step, refresh of the sampler's weights), timed phase by phase. Also measured: the
fast paths against their plain alternatives (one prefill per prompt vs one per sample; chunked
completion-only log-probs vs one full-vocabulary block), and with --decode_table the time per decode
step by batch rows and completion length (flat in length: a static KV cache). On CUDA the decode
figures are also given as a fraction of the memory-bandwidth roofline, and the update as MFU. The
table compares generations of different lengths, whose caches differ in size (a step attends over its
whole cache); a second table times single steps early and late in one long generation, where only the
position differs. With --vs_trl, Hugging Face TRL's GRPOTrainer step is timed on the same model and
workload (scripts/trl_step.py, run by the given Python of TRL's own environment).
"""
import argparse, gc, json, os, re, resource, shutil, statistics, subprocess, sys, time

import torch
from PIL import Image, ImageDraw

from qwen import families, tiny
from training import flags, memory
import model as M
import rollout

import train

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}   # dense, per GPU, vendor figures
WORKLOADS = {"small": dict(prompts_per_step=2, grad_accum=1, max_new_tokens=64, image=(112, 112), temperature=1.0,
                           micro_batch=8),
             "paper": dict(prompts_per_step=1, grad_accum=4, max_new_tokens=1024, image=(640, 480), temperature=1.2,
                           micro_batch=4)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=flags.ShowDefaults)
    p.add_argument("--model", default="tiny", help="'tiny', 'qwen2-vl-2b' (random weights) or a model directory")
    p.add_argument("--workload", default="small", choices=sorted(WORKLOADS), help="see the module docstring")
    p.add_argument("--steps", type=int, default=3, help="timed steps; one more runs first as warm-up")
    p.add_argument("--gradient_checkpointing", action="store_true", help="as train.py's flag")
    p.add_argument("--decode_table", nargs="?", const="1,4,8,16:64,256,1024", default=None,
                   help="also time decoding per step, ROWS:LENGTHS")
    p.add_argument("--compile", action="store_true", help="decode with CUDA graphs, in the step and the tables")
    p.add_argument("--compile_vs_eager", default=None, help="also ms per decode step compiled and eager, ROWS:SLOTS "
                   "(CUDA graphs on CUDA, inductor alone elsewhere)")
    p.add_argument("--out_dir", default="out/bench", help="the run's folder; the random 2B model is saved here once")
    p.add_argument("--lora_rank", type=int, default=0, help="as train.py's flag")
    p.add_argument("--freeze_vision", action="store_true", help="as train.py's flag")
    p.add_argument("--memory", action="store_true",
                   help="print the counted bytes per GPU at the peak, part by part (training/memory.py); exit")
    p.add_argument("--vs_trl", metavar="PYTHON", default=None, help="also time TRL's GRPOTrainer step on the same "
                   "model and workload: scripts/trl_step.py run by PYTHON, of an environment with trl installed")
    args = p.parse_args(argv)
    if args.vs_trl and not shutil.which(args.vs_trl):
        p.error(f"--vs_trl: {args.vs_trl!r} is not a Python executable that can be run")
    if args.vs_trl and (args.lora_rank or args.freeze_vision):
        p.error("--vs_trl compares full fine-tuning steps: drop --lora_rank and --freeze_vision")
    if args.steps < 1:
        p.error(f"--steps must be at least 1 (got {args.steps})")
    if args.decode_table and not re.fullmatch(r"\d+(,\d+)*:\d+(,\d+)*", args.decode_table.replace(" ", "")):
        p.error(f"--decode_table takes ROWS:LENGTHS, comma-separated whole numbers such as 1,4,8:64,256 "
                f"(got {args.decode_table!r})")
    if args.decode_table and 0 in [int(n) for n in re.split("[,:]", args.decode_table.replace(" ", ""))]:
        p.error(f"--decode_table: rows and lengths must be at least 1 (got {args.decode_table!r})")
    args.decode_table = args.decode_table and args.decode_table.replace(" ", "")
    return args


def random_2b(out_dir):
    """The Qwen2-VL-2B architecture with random weights, saved once in bf16 so train.setup loads it as any model."""
    path = os.path.join(out_dir, "qwen2-vl-2b")
    if not os.path.exists(os.path.join(path, "config.json")):
        _, tokenizer, image_processor = tiny.load_tiny()   # its tokenizer, with the paper's pixel range
        M.set_pixel_range(image_processor, M.MIN_TOKENS, M.MAX_TOKENS)
        net = families.random_init(tokenizer, image_processor, model_vocab=151936).to(torch.bfloat16)  # 2B: the defaults
        for part in (net, tokenizer, image_processor):
            part.save_pretrained(path)
    return path


def samples(n, size):
    """Bench prompts: a coloured square and a number drawn on white, and a question about it."""
    out = []
    for i in range(n):
        image = Image.new("RGB", size, "white")
        draw = ImageDraw.Draw(image)
        draw.rectangle([4, 4, size[0] // 2, size[1] // 2], fill=(37 * i % 255, 80, 160))
        draw.text((size[0] // 2, size[1] // 2), str(i), fill="black")
        out.append(dict(id=f"bench-{i}", image=image, problem=f"What number is shown? ({i})", solution=str(i),
                        key_steps={"Steps": [[str(i)]]}))
    return out


def timed(fn):
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t


def memory_bandwidth(device):
    """Achievable device memory bandwidth (bytes/s) from a large copy: the roofline for decoding."""
    x = torch.empty(2 ** 28, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    return 2 * x.numel() * 20 / timed(lambda: [y.copy_(x) for _ in range(20)])[1]


def decode_step_bytes(net, rows, slots):
    """The bytes one decode step of `rows` samples must read at the end of `slots` cache slots: the text decoder's
    weights, the LM head as the step reads it (cast to fp32: model.fp32_head) and the attended bf16 KV cache. The
    embedding table is not read whole (a row per token), and is the LM head itself where the two are tied."""
    text = net.config.get_text_config()
    weights = sum(q.numel() * q.element_size() for n, q in net.named_parameters()
                  if not n.startswith(("model.visual", "lm_head")) and "embed_tokens" not in n)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv = 2 * text.num_hidden_layers * rollout.padded_rows(rows) * text.num_key_value_heads * rollout.rounded(slots) * head_dim * 2
    return weights + 4 * net.lm_head.weight.numel() + kv


def fast_paths(run, batch):
    """Each fast path against its plain alternative, on the same inputs."""
    ro, chunk_rows = batch.rollout, list(range(min(4, len(batch.rewards))))
    first = [batch.samples[i] for i in range(0, len(batch.samples), run.args.num_generations)]
    images, questions, m = [s["image"] for s in first], [s["problem"] for s in first], run.args.num_generations
    gen = lambda ims, qs, k: rollout.generate(run.sampler, run.tokenizer, run.image_processor, ims, qs,  # noqa: E731
                                              num_samples=k, max_new_tokens=run.args.max_new_tokens, ignore_eos=True)
    with run.amp:
        out = {"generate_s_shared_prefill": timed(lambda: gen(images, questions, m))[1],
               "generate_s_prefill_per_sample": timed(lambda: gen([x for x in images for _ in range(m)],
                                                                  [q for q in questions for _ in range(m)], 1))[1]}
    prompt, ids, _ = ro.rows(chunk_rows)
    for name, chunk in (("chunked", 256), ("one_block", 10 ** 9)):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        with run.amp:
            out[f"score_backward_s_{name}"] = timed(lambda: M.completion_logprobs(
                run.policy, prompt, ids, 1.0, ro.suppress_ids, chunk_size=chunk).sum().backward())[1]
        run.policy.zero_grad(set_to_none=True)
        if torch.cuda.is_available():
            out[f"score_backward_peak_gib_{name}"] = torch.cuda.max_memory_allocated() / 2 ** 30
    return out


def decode_table(run, rows_list, lengths, compile=False):
    """ms per decode step for `rows` samples of one prompt at each completion length, EOS off:
    (time for `length` tokens - time for 1 token) / (length - 1), so the prefill and fixed costs drop
    out. On CUDA also the fraction of the bandwidth roofline: the bytes a step must read (text decoder
    weights and LM head, plus the whole static KV cache it attends over) at the measured bandwidth."""
    sampler, cuda = run.sampler, run.device.type == "cuda"
    s = samples(1, (112, 112))[0]
    bandwidth = memory_bandwidth(run.device) if cuda else None

    def generate(rows, length):
        with run.amp:
            return rollout.generate(sampler, run.tokenizer, run.image_processor, [s["image"]], [s["problem"]],
                                    num_samples=rows, max_new_tokens=length, seeds=[0], ignore_eos=True, compile=compile)
    table = []
    for rows in rows_list:
        generate(rows, 2)
        base = min(timed(lambda: generate(rows, 1))[1] for _ in range(3))
        for length in lengths:
            if compile:
                generate(rows, length)                    # compiles this row bucket, records this length
            ro, secs = min((timed(lambda: generate(rows, length)) for _ in range(2)), key=lambda r: r[1])
            step_s = (secs - base) / (length - 1)
            row = dict(rows=rows, tokens=length, ms_per_step=round(1000 * step_s, 3))
            if cuda:
                step_bytes = decode_step_bytes(sampler, rows, ro.prompt["input_ids"].shape[1] + length)
                row["roofline_frac"] = round(step_bytes / bandwidth / step_s, 3)
            table.append(row)
    for row in table:                                     # per rows: time per step relative to the shortest
        first = next(r for r in table if r["rows"] == row["rows"])
        row["vs_shortest"] = round(row["ms_per_step"] / first["ms_per_step"], 2)
    return table


@torch.no_grad()
def compile_vs_eager(run, rows, slots, steps=16):
    """ms per decode step, eager and compiled, for `rows` samples of one prompt at the end of a cache of
    `slots` slots: the median of `steps` single steps attending over the whole cache, after 3 warm-up steps."""
    s, cuda, net = samples(1, (112, 112))[0], run.device.type == "cuda", run.sampler
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    batch = M.build_inputs(run.tokenizer, run.image_processor, [s["image"]], [s["problem"]])
    batch = {k: v.to(run.device) for k, v in batch.items() if k != "kept" and v is not None}
    batch.setdefault("pixel_values", None), batch.setdefault("image_grid_thw", None)
    prompt_len, was_training, out = batch["input_ids"].shape[1], net.training, {}
    net.eval()
    for name, compiled in (("eager", False), ("compiled", True)):
        step = rollout.compiled_decode_step(cuda) if compiled else rollout.decode_step
        with run.amp:
            cache, _, positions = rollout.prefill(net, batch, torch.zeros(rows, dtype=torch.long, device=run.device),
                                                  slots - prompt_len, keep=compiled)
            tokens, last, times = torch.zeros(positions.shape[1], 1, dtype=torch.long, device=run.device), slots - 1, []
            for slot in range(last - steps - 3, last):
                sync()
                t = time.perf_counter()
                step(net, rollout.window(cache, slot, compiled), tokens, positions, torch.tensor([slot], device=run.device))
                sync()
                times.append(time.perf_counter() - t)
        out[f"{name}_ms_per_step"] = round(1000 * statistics.median(times[3:]), 3)
    net.train(was_training)
    return dict(rows=rows, slots=slots, **out, compiled_vs_eager=round(out["compiled_ms_per_step"] / out["eager_ms_per_step"], 2))


def position_profile(run, rows, length, window=64, compile=False):
    """ms per decode step at the start and at the end of one `length`-token generation (the first and the
    last `window` steps, at most a quarter each, timed one by one, fastest of two runs): a static cache
    makes them equal, however the step's cost compares with that of a shorter generation's."""
    s, sync = samples(1, (112, 112))[0], (torch.cuda.synchronize if run.device.type == "cuda" else lambda: None)
    cuda = run.device.type == "cuda"
    times, inner = [], rollout.compiled_decode_step(cuda) if compile else rollout.decode_step

    def step(*args):
        sync()
        t = time.perf_counter()
        out = inner(*args)
        sync()
        times.append(time.perf_counter() - t)
        return out
    patched = ("compiled_decode_step", lambda cuda=True: step) if compile else ("decode_step", step)
    original = getattr(rollout, patched[0])
    setattr(rollout, patched[0], patched[1])
    runs = []
    try:
        with run.amp:
            for _ in range(3):                          # the first run compiles / allocates
                times.clear()
                rollout.generate(run.sampler, run.tokenizer, run.image_processor, [s["image"]], [s["problem"]],
                                 num_samples=rows, max_new_tokens=length, seeds=[0], ignore_eos=True, compile=compile)
                runs.append(list(times))
    finally:
        setattr(rollout, patched[0], original)
    best = [min(ts) for ts in zip(*runs[1:])]           # each step's fastest of two runs: less machine noise
    window = max(1, min(window, len(best) // 4))         # short generations: a quarter at each end
    first, last = (1000 * statistics.median(t) for t in (best[:window], best[-window:]))
    return dict(rows=rows, tokens=length, window=window, ms_first=round(first, 3), ms_last=round(last, 3),
                last_vs_first=round(last / first, 2))


def make_run(model, workload, out_dir, steps, extra=()):
    """train.py's Run for `steps` RL steps of `workload` (train.setup from the same flags as a training run), its
    prompts the bench's, every completion max_new_tokens long, with its reference loaded."""
    w = WORKLOADS[workload]
    argv = ["--model", model, "--data", "toy", "--stage", "rl", "--out_dir", out_dir, "--overwrite", "--eval_n", "0",
            "--max_steps", str(steps), "--num_generations", "4", "--beta", "0.04", "--lr", "1e-6",
            *[f"--{k}={v}" for k, v in w.items() if k != "image"], *extra]
    run = train.setup(train.parse_args(argv))
    run.train_set, run.fixed_length = samples(64, w["image"]), True
    run.reference = train.load_reference(run)
    return run


def time_steps(run, steps):
    """Run steps + 1 RL steps (collect, update), the first a warm-up (allocations, kernels; on CUDA the peak memory
    is reset after it). Returns (median seconds by phase over the timed steps, the last batch, the update results)."""
    optimizer, scheduler = train.make_optimizer(run, run.args.lr, 0.0, steps + 1, 0.0, False)
    times, results = [], []
    for step in range(steps + 1):
        if step == 1 and run.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        batch, seconds = timed(lambda: train.collect(run, step))
        result, update_s = timed(lambda: train.update(run, batch, optimizer, scheduler))
        times.append(dict(batch.seconds, step=seconds + update_s))
        results.append(result)
    timed_steps = times[1:] or times                       # steps=0: the one step, untimed warm-up included
    return {k: statistics.median(t[k] for t in timed_steps) for k in timed_steps[0]}, batch, results


def peer_command(python, run, model, steps):
    """The command that times TRL's step (scripts/trl_step.py) on this run's model and workload: a model directory
    as it is, else the run's model saved to <out_dir>/peer-model (for a tiny model the very weights just timed)."""
    a, size = run.args, run.image_processor.size
    if not os.path.isdir(model):
        train.save_pretrained(run, "peer-model")
        model = os.path.join(a.out_dir, "peer-model")
    return [python, os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts", "trl_step.py"),
            "--model", model, "--prompts_per_step", str(a.prompts_per_step * a.grad_accum),
            "--num_generations", str(a.num_generations), "--micro_batch", str(a.micro_batch),
            "--max_new_tokens", str(a.max_new_tokens), "--image", "{}x{}".format(*run.train_set[0]["image"].size),
            "--min_pixels", str(size["shortest_edge"]), "--max_pixels", str(size["longest_edge"]),
            "--instruction", M.R1VL_INSTRUCTION, "--beta", str(a.beta), "--temperature", str(a.temperature),
            "--lr", str(a.lr), "--steps", str(steps), *(["--gradient_checkpointing"] * a.gradient_checkpointing)]


def peer_step(command, out_dir):
    """Run the peer's command with this process's thread count; its JSON line, or one line saying why not (its
    whole output is kept in <out_dir>/trl_step.log)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env)
    except OSError as e:
        raise SystemExit(f"error: --vs_trl: cannot run {command[0]}: {e.strerror or e}")
    log = os.path.join(out_dir, "trl_step.log")
    with open(log, "w") as f:
        f.write(done.stdout + done.stderr)
    found = [line for line in done.stdout.splitlines() if line.startswith('{"peer"')]
    if done.returncode or not found:
        last = ([s.strip() for s in (done.stdout + done.stderr).splitlines() if s.strip()] or ["no output"])[-1]
        why = f"exited with {done.returncode}" if done.returncode else "printed no result"
        raise SystemExit(f"error: --vs_trl: the TRL step {why} ({last[:300]}); its whole output: {log}")
    return json.loads(found[-1])


def main():
    sys.stdout.reconfigure(line_buffering=True)   # each table line shows as soon as it is measured
    args = parse_args()
    if args.memory:
        tables = {name: memory.table(name) for name in memory.ARCHITECTURES}
        for lines, _ in tables.values():
            print("\n".join(lines) + "\n")
        print("CUDA peak: python bench.py --model qwen2-vl-2b --workload paper --steps 1 [--lora_rank 64 | --freeze_vision]"
              " [--gradient_checkpointing] reports peak_memory_gib on a GPU (one process: the data-parallel columns)")
        print(json.dumps({name: dict(columns) for name, (_, columns) in tables.items()}))
        return
    model = random_2b(args.out_dir) if args.model == "qwen2-vl-2b" else args.model
    run = make_run(model, args.workload, args.out_dir, args.steps + 1,
                   [*(["--gradient_checkpointing"] if args.gradient_checkpointing else []),
                    *(["--compile"] if args.compile else []), "--lora_rank", str(args.lora_rank),
                    *(["--freeze_vision"] if args.freeze_vision else [])])
    cuda = run.device.type == "cuda"
    n_params = sum(q.numel() for q in run.policy.parameters())
    med, batch, _ = time_steps(run, args.steps)
    ro = batch.rollout
    tokens, prompt_tokens = ro.completion_ids.numel(), int(ro.prompt["attention_mask"].sum())
    out = dict(model=args.model, workload=args.workload,
               device=torch.cuda.get_device_name() if cuda else f"CPU x{torch.get_num_threads()} threads",
               params=n_params, rows=ro.completion_ids.shape[0], completion_tokens=ro.completion_ids.shape[1],
               steps=args.steps, **{f"{k}_s_median": round(v, 4) for k, v in med.items()},
               rollout_tokens_per_s=round(tokens / med["generate"], 1),
               decode_ms_per_step=round(1000 * med["generate"] / ro.completion_ids.shape[1], 3),
               scoring_tokens_per_s=round(tokens / med["reference"], 1))
    if cuda:
        out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
        peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in torch.cuda.get_device_name()), None)
        flops = 6 * n_params * (tokens + prompt_tokens)   # forward + backward over prompt and completion tokens
        out["update_mfu"] = round(flops / med["update"] / peak, 3) if peak else None
    else:
        out["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2)
    out.update({k: round(v, 4) for k, v in fast_paths(run, batch).items()})
    print(f"{'phase':<12}{'median s':>10}")
    for k in ("generate", "reward", "reference", "update", "step"):
        print(f"{k:<12}{med[k]:>10.4f}")
    for k, v in out.items():
        if not k.endswith("_s_median"):
            print(f"{k:<34}{v}")
    if args.decode_table:
        rows_spec, lengths_spec = args.decode_table.split(":")
        out["decode_compile"] = args.compile
        out["decode_table"] = table = decode_table(run, [int(r) for r in rows_spec.split(",")],
                                                   [int(n) for n in lengths_spec.split(",")], args.compile)
        print(f"{'rows':>6}{'tokens':>8}{'ms/step':>10}{'vs shortest':>13}" + (f"{'roofline':>10}" if cuda else ""))
        for r in table:
            print(f"{r['rows']:>6}{r['tokens']:>8}{r['ms_per_step']:>10.3f}{r['vs_shortest']:>13.2f}"
                  + (f"{r['roofline_frac']:>10.3f}" if cuda else ""))
        longest = max(int(n) for n in lengths_spec.split(","))
        static = rollout.static_cache_fits(run.sampler)     # else the model's own cache: no single step to time
        out["decode_positions"] = profile = [position_profile(run, int(r), longest, compile=args.compile)
                                             for r in rows_spec.split(",")] if static else []
        if profile:
            print(f"within one {longest}-token generation: ms per step over the first and the last "
                  f"{profile[0]['window']} steps")
            print(f"{'rows':>6}{'first':>10}{'last':>10}{'last/first':>12}")
        for r in profile:
            print(f"{r['rows']:>6}{r['ms_first']:>10.3f}{r['ms_last']:>10.3f}{r['last_vs_first']:>12.2f}")
    if args.compile_vs_eager:
        rows, slots = (int(x) for x in args.compile_vs_eager.split(":"))
        out["compile_vs_eager"] = r = compile_vs_eager(run, rows, slots)
        print(f"decode step, {rows} rows x {slots} slots: eager {r['eager_ms_per_step']:.3f} ms, "
              f"compiled {r['compiled_ms_per_step']:.3f} ms ({r['compiled_vs_eager']:.2f}x)")
    if args.vs_trl:
        command = peer_command(args.vs_trl, run, model, args.steps)
        del run, batch, ro, _                                # the peer gets the device's memory to itself
        gc.collect()
        torch._dynamo.reset()
        torch.cuda.empty_cache()
        peer = peer_step(command, args.out_dir)
        out.update(trl_version=peer.get("trl_version"), trl_step_s_median=peer["step_s_median"],
                   vs_trl_ratio=round(out["step_s_median"] / peer["step_s_median"], 3))
        print(f"{'trl step s':<34}{peer['step_s_median']:.4f}  (TRL {peer.get('trl_version')}, {peer.get('device')})")
        print(f"{'ours step s':<34}{out['step_s_median']:.4f}")
        print(f"{'ratio (ours / trl)':<34}{out['vs_trl_ratio']:.3f}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()

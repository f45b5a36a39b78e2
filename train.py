"""train.py: SFT warm-up, then StepGRPO (R1-VL, arXiv 2503.12937), in one readable loop.

    python train.py                                   # tiny Qwen2-VL, toy task, CPU: warm-up then StepGRPO
    python train.py --model Qwen/Qwen2-VL-2B-Instruct --stage sft --data mulberry_260k.json --image_root imgs/
    torchrun --nproc_per_node 4 train.py --model out/sft/final --stage rl --data r1vl_10k.jsonl --image_root imgs/
    torchrun --nproc_per_node 8 train.py --model out/sft-7b/final --stage rl --fsdp ...     # 7B: sharded

What one RL step does, and the choices made (METHOD.md §6):
1. Sample M completions for each of `prompts_per_step` image-questions per rank (one prefill per
   prompt, sampling seeded per prompt, so the same global batch gives the same samples on any
   number of ranks and after a resume).
2. Reward each with StepRAR + StepRVR (rewards.py); advantages are group z-scores (Eq. 4).
3. One gradient step per rollout (official), so the PPO ratio is 1 and the loss is policy
   gradient + β·k3-KL to the frozen starting model (Eq. 5); `--clip_eps` acts only with `--ppo_epochs > 1`.
4. Whole groups stay on one rank; gradients are averaged by an explicit all-reduce (parallel.py),
   and the loss is divided by the global count, so any number of ranks gives the same update.
Weights stay fp32 (the paper's lr of 1e-6 is below bf16's resolution); on CUDA forward passes run
under bf16 autocast.
"""
import argparse, json, math, os, random, time, types

import torch
import torch.distributed as dist
import transformers

import checkpoint, data, model as M, parallel, rewards, rollout, toy
from stepgrpo import group_advantages, policy_loss

# ----------------------------------------------------------------------------- config
# Defaults are the paper's (METHOD.md §1, §7) for real data; TOY is the embedded CPU preset, applied
# with `--data toy` to every option not given on the command line.
PAPER = dict(stage="rl", lr=1e-6, sft_lr=2e-5, sft_steps=1000, sft_batch=8, weight_decay_sft=0.05,
             max_steps=1000, prompts_per_step=1, grad_accum=4, num_generations=4, temperature=1.2, top_p=1.0,
             max_new_tokens=1024, max_prompt_len=1024, micro_batch=4, beta=0.04, alpha=0.1, clip_eps=0.2,
             eval_every=0, eval_n=0, save_every=100, log_rollouts_every=10, difficulty=2, teacher_noise=0.0)
TOY = dict(stage="both", lr=5e-5, sft_lr=2e-3, sft_steps=600, sft_batch=32, max_steps=150, prompts_per_step=8,
           grad_accum=1, temperature=1.0, max_new_tokens=160, micro_batch=16, eval_n=500, save_every=50,
           teacher_noise=0.5)

p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
g = p.add_argument_group("run")
g.add_argument("--model", default="tiny", help="hub id, local directory, or 'tiny'")
g.add_argument("--data", default="toy", help="'toy', or a JSON/JSONL file (R1-VL-10K for RL, Mulberry messages for SFT)")
g.add_argument("--image_root", default=None, help="folder image paths in --data are relative to")
g.add_argument("--stage", choices=["sft", "rl", "both"])
g.add_argument("--out_dir", default="out")
g.add_argument("--seed", type=int, default=0)
g.add_argument("--resume", action="store_true", help="continue from out_dir/checkpoint exactly")
g.add_argument("--stop_after", type=int, default=0, help="end this run after N steps of a stage (continue with --resume)")
g.add_argument("--dtype", default=None, help="autocast dtype on CUDA (bf16) or fp32")
g.add_argument("--fsdp", action="store_true", help="shard blocks, gradients and optimizer state over ranks (FSDP2)")
g.add_argument("--gradient_checkpointing", action="store_true")
g.add_argument("--wandb", default=None, help="wandb project name (only if wandb is installed)")
g = p.add_argument_group("StepGRPO (paper defaults)")
for name, kind in [("max_steps", int), ("prompts_per_step", int), ("grad_accum", int), ("num_generations", int),
                   ("temperature", float), ("top_p", float), ("max_new_tokens", int), ("max_prompt_len", int),
                   ("micro_batch", int), ("lr", float), ("beta", float), ("alpha", float), ("clip_eps", float)]:
    g.add_argument(f"--{name}", type=kind)
g.add_argument("--ppo_epochs", type=int, default=1, help="updates per rollout (>1 makes the clip act)")
g.add_argument("--reward", default="step", choices=["step", "outcome", "steprar", "steprvr"])
g.add_argument("--loss_norm", default="seq", choices=["seq", "token"])
g = p.add_argument_group("SFT warm-up, evaluation, logging")
for name, kind in [("sft_steps", int), ("sft_batch", int), ("sft_lr", float), ("eval_every", int), ("eval_n", int),
                   ("save_every", int), ("log_rollouts_every", int), ("difficulty", int), ("teacher_noise", float)]:
    g.add_argument(f"--{name}", type=kind)
args = p.parse_args()
preset = {**PAPER, **(TOY if args.data == "toy" else {})}
for k, v in preset.items():
    if getattr(args, k, None) is None:
        setattr(args, k, v)
config = vars(args)

# ----------------------------------------------------------------------------- init
transformers.utils.logging.disable_progress_bar()
ddp, rank, world, device = parallel.setup()
master = rank == 0
bf16 = device.type == "cuda" and args.dtype != "fp32"
amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16)
ckpt_path = os.path.join(args.out_dir, "checkpoint", "ckpt.pt")
os.makedirs(os.path.dirname(ckpt_path), exist_ok=True)
random.seed(args.seed), torch.manual_seed(args.seed)


def load_model(name):
    net = M.load(name, device=device, dtype=torch.float32)
    if args.gradient_checkpointing:
        net[0].gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return (parallel.shard(net[0]), *net[1:]) if args.fsdp else net


policy, tokenizer, image_processor = load_model(args.model)
suppress_ids, _ = M.special_ids(tokenizer)
max_pixels = image_processor.size["longest_edge"]

if args.data == "toy":
    # SFT imitates the teacher's paths (some miscount with --teacher_noise); RL is rewarded by the truth
    train_set = toy.dataset("train", n=4000, seed=args.seed, difficulty=args.difficulty, teacher_noise=args.teacher_noise)
    eval_set = toy.dataset("test", n=args.eval_n, seed=args.seed, difficulty=args.difficulty) if args.eval_n else []
    sft_set = [{**s, "response": s["teacher_solution"]} for s in train_set]
else:
    # Bad records are counted and logged by the loaders; a file with nothing usable is an error.
    sft_set = data.load_sft_data(args.data, args.image_root) if args.stage != "rl" else []
    train_set = data.load_rl_data(args.data, args.image_root) if args.stage != "sft" else []
    eval_set = []
skipped = {"bad_image": 0, "long_prompt": 0, "nonfinite_loss": 0}


run = types.SimpleNamespace(log=lambda *a, **k: None, finish=lambda: None)   # stands in for wandb when off
if args.wandb and master:
    import wandb
    run = wandb.init(project=args.wandb, config=config)


def log_jsonl(name, record):
    if master:
        with open(os.path.join(args.out_dir, name), "a") as f:
            f.write(json.dumps(record) + "\n")


def images_of(samples):
    """Open each sample's image; an unreadable one is logged, counted and its sample dropped.
    Returns (samples kept, their images, their indices in `samples`)."""
    good, images, keep = [], [], []
    for i, s in enumerate(samples):
        try:
            images.append(data.load_image(s.get("image") or s.get("image_path"), max_pixels)), good.append(s), keep.append(i)
        except ValueError as e:
            skipped["bad_image"] += 1
            print(f"[rank {rank}] skipping sample {s.get('id')}: {e}")
    return good, images, keep


def sample(net, samples, images, **kw):
    with amp, parallel.gathered(net, args.fsdp):
        return rollout.generate(net, tokenizer, image_processor, images, [s["problem"] for s in samples],
                                max_new_tokens=args.max_new_tokens, max_prompt_len=args.max_prompt_len, **kw)


def heldout_accuracy(net, samples, step, batch=32):
    """Greedy answers on held-out samples, split over ranks: (accuracy, format validity = mean StepRVR),
    also logged as an "eval" row at `step` of the RL stage (0: the warm-up)."""
    correct, valid = [], []
    mine = samples[rank::world]
    for i in range(0, math.ceil(len(samples) / world), batch):   # the same number of calls on every rank
        chunk, images, _ = images_of(mine[i:i + batch])
        ro = sample(net, chunk, images, num_samples=1, greedy=True)
        for text, g in zip(ro.texts if ro else [], ro.group.tolist() if ro else []):
            r = rewards.reward(text, chunk[ro.kept[g]], kind="step", alpha=args.alpha)
            correct.append(float(r["correct"])), valid.append(r["step_rvr"])
    missing = [0.0] * (len(mine) - len(correct))         # skipped samples count as wrong
    m = parallel.global_means(dict(accuracy=correct + missing, format_valid=valid + missing), device, ddp)
    log_jsonl("metrics.jsonl", dict(stage="eval", step=step, **m))
    return m["accuracy"], m["format_valid"]


def save_checkpoint(stage, step, optimizer, scheduler):
    checkpoint.save(ckpt_path, stage, step, policy, optimizer, scheduler, dict(skipped=skipped, config=config),
                    args.fsdp, ddp, master)


def load_checkpoint(stage, optimizer, scheduler):
    """Restore a checkpoint of `stage` when resuming; returns the step to continue from (0 if none)."""
    state = checkpoint.load(ckpt_path, stage, policy, optimizer, scheduler, args.fsdp, rank) if args.resume else None
    if state is None:
        return 0
    skipped.update(state["skipped"])
    if master:
        checkpoint.trim_log(os.path.join(args.out_dir, "metrics.jsonl"), stage, state["step"])
        print(f"resumed {stage} at step {state['step']}")
    return state["step"]


def save_pretrained(name):
    checkpoint.save_pretrained(os.path.join(args.out_dir, name), policy, tokenizer, image_processor, args.fsdp,
                               ddp, master)


def make_optimizer(lr, weight_decay, steps, warmup_frac, cosine):
    opt = torch.optim.AdamW([q for q in policy.parameters() if q.requires_grad], lr=lr, weight_decay=weight_decay)
    warm = max(1, int(warmup_frac * steps))

    def factor(s):  # SFT: warm-up then cosine (paper); RL: linear decay, no warm-up (official)
        if s < warm and warmup_frac > 0:
            return (s + 1) / warm
        frac = min(1.0, s / max(1, steps))
        return 0.5 * (1 + math.cos(math.pi * frac)) if cosine else 1.0 - frac
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def optimizer_step(optimizer, scheduler, loss_value):
    """Sync, clip and step, unless the loss was not finite on some rank (then skip and log)."""
    bad = torch.tensor(float(not math.isfinite(loss_value)), device=device)
    if ddp:
        dist.all_reduce(bad)
    params = [q for q in policy.parameters() if q.requires_grad]
    parallel.sync_gradients(params, world)
    norm = parallel.clip_gradients(params, 1.0)
    if bad:
        skipped["nonfinite_loss"] += 1
        print(f"non-finite loss {loss_value}: update skipped")
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    return norm


def end_of_step(stage, step, start, last, optimizer, scheduler):
    if (step + 1) % args.save_every == 0 or step + 1 == last:
        save_checkpoint(stage, step + 1, optimizer, scheduler)
    if args.stop_after and step + 1 - start == args.stop_after:
        raise SystemExit(f"stopped after {args.stop_after} steps; continue with --resume")


# ----------------------------------------------------------------------------- stage 1: SFT warm-up
def sft():
    """Token NLL on the assistant turn (the response plus its closing <|im_end|>)."""
    optimizer, scheduler = make_optimizer(args.sft_lr, preset["weight_decay_sft"], args.sft_steps, 0.03, True)
    start = load_checkpoint("sft", optimizer, scheduler)
    policy.train()
    for step in range(start, args.sft_steps):
        t0 = time.time()
        samples, images, _ = images_of(data.batch_at(sft_set, step, args.sft_batch, rank, world, args.seed + 7)[0])
        batch = M.build_inputs(tokenizer, image_processor, images, [s["problem"] for s in samples],
                               max_prompt_len=args.max_prompt_len)
        kept = batch.pop("kept") if batch else []
        skipped["long_prompt"] += len(samples) - len(kept)
        loss = torch.zeros((), device=device)
        if kept:
            targets = [tokenizer(samples[i]["response"] + "<|im_end|>", add_special_tokens=False)["input_ids"]
                       [:args.max_new_tokens] for i in kept]
            ids = torch.full((len(kept), max(map(len, targets))), tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros(ids.shape, device=device)
            for r, t in enumerate(targets):
                ids[r, :len(t)], mask[r, :len(t)] = torch.tensor(t), 1
            with amp:
                logp = M.completion_logprobs(policy, {k: v.to(device) if v is not None else None
                                                      for k, v in batch.items()}, ids.to(device))
            count = mask.sum()                      # the global token count: ranks add up to the global mean
            if ddp:
                dist.all_reduce(count)
            loss = -(logp * mask).sum() / (count / world)
            loss.backward()
        norm = optimizer_step(optimizer, scheduler, loss.item())
        loss = loss.detach()
        if ddp:                                     # log the global mean, not this rank's share
            dist.all_reduce(loss)
            loss /= world
        record = dict(stage="sft", step=step + 1, loss=loss.item(), grad_norm=norm,
                      lr=scheduler.get_last_lr()[0], seconds=time.time() - t0)
        log_jsonl("metrics.jsonl", record), run.log(record)
        if master and (step + 1) % 50 == 0:
            print(f"sft step {step + 1}/{args.sft_steps} loss {loss.item():.4f}")
        end_of_step("sft", step, start, args.sft_steps, optimizer, scheduler)


# ----------------------------------------------------------------------------- stage 2: StepGRPO
def rl(reference, bar):
    optimizer, scheduler = make_optimizer(args.lr, 0.0, args.max_steps * args.ppo_epochs, 0.0, False)
    start = load_checkpoint("rl", optimizer, scheduler)
    m = args.num_generations
    for step in range(start, args.max_steps):
        t0, times, parts = time.time(), {"generate": 0.0, "reward": 0.0, "reference": 0.0, "update": 0.0}, []
        for accum in range(args.grad_accum):
            # --- rollout: M samples per prompt, each prompt's sampling seeded by its global position
            t = time.time()
            samples, positions = data.batch_at(train_set, step * args.grad_accum + accum, args.prompts_per_step, rank, world, args.seed)
            samples, images, keep = images_of(samples)
            ro = sample(policy, samples, images, num_samples=m, temperature=args.temperature, top_p=args.top_p,
                        seeds=[args.seed * 1_000_003 + positions[i] for i in keep])
            times["generate"] += time.time() - t
            skipped["long_prompt"] += len(samples) - (len(ro.kept) if ro else 0)
            if ro is None:
                continue
            # --- rewards (Eqs. 2-3) and group advantages (Eq. 4)
            t = time.time()
            rs = [rewards.reward(text, samples[ro.kept[g]], kind=args.reward, alpha=args.alpha)
                  for text, g in zip(ro.texts, ro.group.tolist())]
            adv, frac_zero = group_advantages(torch.tensor([r["total"] for r in rs]), m)
            parts.append(dict(ro=ro, samples=samples, rs=rs, adv=adv.to(device), frac_zero=frac_zero))
            times["reward"] += time.time() - t
        # --- micro-batches of rows; reference log-probs once, without keeping activations
        t = time.time()
        by_length = [(p, p["ro"].completion_mask.sum(1).argsort().tolist()) for p in parts]   # less padding
        jobs = parallel.lockstep([(p, order[s:s + args.micro_batch]) for p, order in by_length
                                  for s in range(0, len(order), args.micro_batch)], args.fsdp, ddp)
        with torch.no_grad(), amp:
            ref = [M.completion_logprobs(reference, *p["ro"].rows(rows)[:2], args.temperature, suppress_ids)
                   if args.beta else None for (p, rows), _ in jobs]
        times["reference"] += time.time() - t
        # --- update: the loss is divided by the global count of completions (or tokens), so
        # micro-batches, accumulation and ranks add up to exactly the mean over the global batch.
        t = time.time()
        count = torch.tensor(float(sum(p["ro"].completion_mask.sum() if args.loss_norm == "token" else len(p["rs"])
                                       for p in parts)), device=device)
        if ddp:
            dist.all_reduce(count)
        old = [None] * len(jobs)
        for epoch in range(args.ppo_epochs):
            stats = []
            for j, ((p, rows), weight) in enumerate(jobs):
                prompt, ids, cmask = p["ro"].rows(rows)
                with amp:
                    lp = M.completion_logprobs(policy, prompt, ids, args.temperature, suppress_ids)
                loss, st = policy_loss(lp, old[j], ref[j], p["adv"][rows], cmask, args.beta, args.clip_eps,
                                       args.loss_norm, denom=count.clamp(min=1) / world)
                (loss * weight).backward()
                if epoch == 0 and args.ppo_epochs > 1:   # π_old for the later epochs (PPO clipping acts)
                    old[j] = lp.detach()
                if weight:
                    stats.append(dict(st, loss=loss.item(), rows=len(rows)))
            loss_value = sum(x["loss"] for x in stats)
            norm = optimizer_step(optimizer, scheduler, loss_value)   # every rank steps, even with no samples
        times["update"] += time.time() - t
        # --- log: per-sample figures are averaged over all ranks' samples
        rs = [r for part in parts for r in part["rs"]]
        lens = [float(x) for part in parts for x in part["ro"].completion_mask.sum(1)]
        per_sample = dict(reward=[r["total"] for r in rs], step_rar=[r["step_rar"] for r in rs],
                          step_rvr=[r["step_rvr"] for r in rs], accuracy=[float(r["correct"]) for r in rs],
                          key_step_match=[r["k"] for r in rs], completion_len=lens,
                          truncated=[float(x) for part in parts for x in part["ro"].truncated],
                          frac_reward_zero_std=[part["frac_zero"] for part in parts],
                          kl=[x["kl"] for x in stats for _ in range(x["rows"])],   # micro-batch means, by rows
                          clip_frac=[x["clip_frac"] for x in stats for _ in range(x["rows"])])
        record = dict(stage="rl", step=step + 1, **parallel.global_means(per_sample, device, ddp),
                      loss=loss_value, grad_norm=norm, lr=scheduler.get_last_lr()[0], seconds=time.time() - t0,
                      tokens_per_s=sum(lens) * world / max(times["generate"], 1e-9),
                      **{f"time_{k}": v for k, v in times.items()})
        log_jsonl("metrics.jsonl", record), run.log(record)
        if args.log_rollouts_every and (step + 1) % args.log_rollouts_every == 0:
            for part in parts:
                for text, r, g in zip(part["ro"].texts, part["rs"], part["ro"].group.tolist()):
                    log_jsonl("rollouts.jsonl", dict(step=step + 1, id=part["samples"][part["ro"].kept[g]].get("id"),
                                                     completion=text, **r))
        bar.update(1), bar.set_postfix(reward=f"{record['reward']:.3f}", acc=f"{record['accuracy']:.2f}",
                                       kl=f"{record['kl']:.4f}")
        if args.eval_every and (step + 1) % args.eval_every == 0 and eval_set:
            heldout_accuracy(policy, eval_set, step + 1)
        end_of_step("rl", step, start, args.max_steps, optimizer, scheduler)


def plot_curves():
    """metrics.jsonl → training_curves.png (reward components, accuracy, KL, length, SFT loss)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [json.loads(line) for line in open(os.path.join(args.out_dir, "metrics.jsonl"))]
    panels = [("sft", ["loss"]), ("rl", ["reward", "step_rar", "step_rvr"]), ("rl", ["accuracy", "key_step_match"]),
              ("rl", ["kl"]), ("rl", ["completion_len"])]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
    for ax, (stage, keys) in zip(axes, panels):
        for k in keys:   # faint: every step; solid: trailing mean of 10 (one RL step sees only 8 prompts)
            pts = [(r["step"], r[k]) for r in rows if r["stage"] == stage and k in r]
            x, y = zip(*pts) if pts else ((), ())
            if w := min(10, len(y)):
                line, = ax.plot(x, y, lw=0.6, alpha=0.35)
                ax.plot(x[w - 1:], [sum(y[i + 1 - w:i + 1]) / w for i in range(w - 1, len(y))], color=line.get_color(), label=k)
        held = [(r["step"], r["accuracy"]) for r in rows if r["stage"] == "eval"]
        if "accuracy" in keys and held:
            ax.plot(*zip(*held), "ko-", ms=4, label="held-out, greedy")
        ax.set_title(f"{stage}: {', '.join(keys)}", fontsize=9), ax.set_xlabel("step")
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out_dir, "training_curves.png"), dpi=110)


# ----------------------------------------------------------------------------- main
t_start, summary = time.time(), {}
if not args.resume and master:
    for name in ("metrics.jsonl", "rollouts.jsonl"):
        if os.path.exists(os.path.join(args.out_dir, name)):
            os.remove(os.path.join(args.out_dir, name))
ran_sft = args.stage in ("sft", "both") and not (args.resume and checkpoint.stage_of(ckpt_path) == "rl")
if ran_sft:
    sft()
    if args.stage == "both":
        save_pretrained("warmup")
    if eval_set:
        summary["accuracy_warmup"], summary["format_warmup"] = heldout_accuracy(policy, eval_set, 0)
        if master:
            print(f"held-out accuracy after warm-up: {summary['accuracy_warmup']:.3f}")
if args.stage in ("rl", "both"):
    # The reference is the frozen starting model of the RL stage: --model, or the warm-up result.
    reference = load_model(os.path.join(args.out_dir, "warmup") if args.stage == "both" else args.model)[0]
    reference.eval().requires_grad_(False)
    if bf16 and not args.fsdp:   # frozen: the compute dtype is enough
        reference.to(torch.bfloat16)
    from tqdm import tqdm
    bar = tqdm(total=args.max_steps, desc="StepGRPO", disable=not master)
    rl(reference, bar)
    bar.close()
    if eval_set:
        summary["accuracy_rl"], summary["format_rl"] = heldout_accuracy(policy, eval_set, args.max_steps)
        if master:
            print(f"held-out accuracy after StepGRPO: {summary['accuracy_rl']:.3f}")
save_pretrained("final")
if master:
    rl_rows = [json.loads(line) for line in open(os.path.join(args.out_dir, "metrics.jsonl")) if '"stage": "rl"' in line]
    if rl_rows:
        mean = lambda rs: sum(r["reward"] for r in rs) / len(rs)
        summary.update(reward_first=mean(rl_rows[:10]), reward_last=mean(rl_rows[-10:]))   # 10-step means
    plot_curves()
    summary.update(seconds=round(time.time() - t_start, 1), skipped=skipped, out_dir=args.out_dir)
    run.finish()
    print(json.dumps(summary))
if ddp:
    dist.destroy_process_group()

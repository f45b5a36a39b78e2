"""train.py: SFT warm-up, then StepGRPO (R1-VL, arXiv 2503.12937), in one readable loop.

    python train.py                                   # tiny Qwen2-VL, toy task, CPU: warm-up then StepGRPO
    python train.py --model Qwen/Qwen2-VL-2B-Instruct --stage sft --data mulberry_260k.json --image_root imgs/
    torchrun --nproc_per_node 4 train.py --model out/sft/final --stage rl --data r1vl_10k.jsonl --image_root imgs/

What one RL step does, and the choices made (METHOD.md §6):
1. Sample M completions for each of `prompts_per_step` image-questions per rank (one prefill per
   prompt, sampling seeded per prompt, so the same global batch gives the same samples on any
   number of ranks and after a resume).
2. Reward each with StepRAR + StepRVR (rewards.py); advantages are group z-scores (Eq. 4).
3. One gradient step per rollout (official), so the PPO ratio is 1 and the loss is policy
   gradient + β·k3-KL to the frozen starting model (Eq. 5); `--clip_eps` acts only with `--ppo_epochs > 1`.
4. Data parallel by an explicit all-reduce of gradients after the backward passes: whole groups stay
   on one rank, and parameters without gradients on a rank (no image there) count as zeros.
Weights stay fp32 (the paper's lr of 1e-6 is below bf16's resolution); on CUDA forward passes run
under bf16 autocast.
"""
import argparse, copy, json, math, os, random, time

import torch
import torch.distributed as dist

import transformers

import data, model as M, rewards, rollout
from stepgrpo import group_advantages, policy_loss

# ----------------------------------------------------------------------------- config
# Defaults are the paper's (METHOD.md §1, §7) for real data; TOY is the embedded CPU preset, applied
# with `--data toy` to every option not given on the command line.
PAPER = dict(stage="rl", lr=1e-6, sft_lr=2e-5, sft_steps=1000, sft_batch=8, weight_decay_sft=0.05,
             max_steps=1000, prompts_per_step=1, grad_accum=4, num_generations=4, temperature=1.2, top_p=1.0,
             max_new_tokens=1024, max_prompt_len=1024, micro_batch=4, beta=0.04, alpha=0.1, clip_eps=0.2,
             eval_every=0, eval_n=0, save_every=100, log_rollouts_every=10, difficulty=2)
TOY = dict(stage="both", lr=1e-5, sft_lr=2e-3, sft_steps=800, sft_batch=32, max_steps=150, prompts_per_step=8,
           grad_accum=1, temperature=1.0, max_new_tokens=160, micro_batch=16, eval_n=200, save_every=50)

p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
g = p.add_argument_group("run")
g.add_argument("--model", default="tiny", help="hub id, local directory, or 'tiny'")
g.add_argument("--data", default="toy", help="'toy', or a JSON/JSONL file (R1-VL-10K for RL, Mulberry messages for SFT)")
g.add_argument("--image_root", default=None, help="folder image paths in --data are relative to")
g.add_argument("--stage", choices=["sft", "rl", "both"])
g.add_argument("--out_dir", default="out")
g.add_argument("--seed", type=int, default=0)
g.add_argument("--resume", action="store_true", help="continue from out_dir/checkpoint exactly")
g.add_argument("--dtype", default=None, help="autocast dtype on CUDA (bf16) or fp32")
g.add_argument("--gradient_checkpointing", action="store_true")
g.add_argument("--wandb", default=None, help="wandb project name (only if wandb is installed)")
g.add_argument("--stop_after", type=int, default=0, help="end this run after N steps of a stage (continue with --resume)")
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
                   ("save_every", int), ("log_rollouts_every", int), ("difficulty", int)]:
    g.add_argument(f"--{name}", type=kind)
args = p.parse_args()
preset = {**PAPER, **(TOY if args.data == "toy" else {})}
for k, v in preset.items():
    if getattr(args, k, None) is None:
        setattr(args, k, v)
config = vars(args)

# ----------------------------------------------------------------------------- init
transformers.utils.logging.disable_progress_bar()
ddp = int(os.environ.get("RANK", -1)) != -1
if ddp:
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
master = rank == 0
device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
if device.type == "cuda":
    torch.cuda.set_device(device)
amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda" and args.dtype != "fp32")
ckpt_path = os.path.join(args.out_dir, "checkpoint", "ckpt.pt")
os.makedirs(os.path.dirname(ckpt_path), exist_ok=True)
random.seed(args.seed), torch.manual_seed(args.seed)

policy, tokenizer, image_processor = M.load(args.model, device=device, dtype=torch.float32)
if args.gradient_checkpointing:
    policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
suppress_ids, _ = M.special_ids(tokenizer)
max_pixels = image_processor.size["longest_edge"]

if args.data == "toy":
    train_set = data.toy_dataset("train", n=4000, seed=args.seed, difficulty=args.difficulty)
    eval_set = data.toy_dataset("test", n=args.eval_n, seed=args.seed, difficulty=args.difficulty) if args.eval_n else []
    sft_set = [{**s, "response": s["solution"]} for s in train_set]
else:
    # Bad records are counted and logged by the loaders; a file with nothing usable is an error.
    sft_set = data.load_sft_data(args.data, args.image_root) if args.stage != "rl" else []
    train_set = data.load_rl_data(args.data, args.image_root) if args.stage != "sft" else []
    eval_set = []
skipped = {"bad_image": 0, "long_prompt": 0, "nonfinite_loss": 0}


class NoLog:  # stands in for wandb when it is off
    def log(self, *a, **k): pass
    def finish(self): pass


run = NoLog()
if args.wandb and master:
    import wandb
    run = wandb.init(project=args.wandb, config=config)


def log_jsonl(name, record):
    if master:
        with open(os.path.join(args.out_dir, name), "a") as f:
            f.write(json.dumps(record) + "\n")


def images_of(samples):
    """Open each sample's image; an unreadable one is logged, counted and its sample dropped."""
    good, images = [], []
    for s in samples:
        try:
            images.append(M.load_image(s.get("image") or s.get("image_path"), max_pixels)), good.append(s)
        except ValueError as e:
            skipped["bad_image"] += 1
            print(f"[rank {rank}] skipping sample {s.get('id')}: {e}")
    return good, images


def global_batch(dataset, step, per_rank, salt):
    """This rank's slice of step `step`'s global batch, from a per-epoch shuffle seeded by the run seed.

    The position in the data is a function of the step, so a resumed run reads exactly what the
    uninterrupted one would have; returns (samples, their global stream positions)."""
    size = per_rank * world
    positions = range(step * size + rank * per_rank, step * size + (rank + 1) * per_rank)
    out = []
    for pos in positions:
        epoch, i = divmod(pos, len(dataset))
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(args.seed * 1000 + epoch + salt))
        out.append(dataset[int(order[i])])
    return out, list(positions)


def sync_gradients(params):
    """Average gradients over ranks; a parameter unused on a rank contributes zeros (METHOD.md §9.9)."""
    if not ddp:
        return
    for q in params:
        if q.grad is None:
            q.grad = torch.zeros_like(q)
        dist.all_reduce(q.grad)
        q.grad /= world


def heldout_accuracy(net, samples, batch=32):
    """Greedy answers on held-out samples: (accuracy, format validity = mean StepRVR)."""
    if not samples:
        return None, None
    correct, valid = 0, 0
    for i in range(0, len(samples), batch):
        chunk, images = images_of(samples[i:i + batch])
        with amp:
            ro = rollout.generate(net, tokenizer, image_processor, images, [s["problem"] for s in chunk],
                                  num_samples=1, greedy=True, max_new_tokens=args.max_new_tokens,
                                  max_prompt_len=args.max_prompt_len)
        for text, g in zip(ro.texts if ro else [], ro.group.tolist() if ro else []):
            r = rewards.reward(text, chunk[ro.kept[g]], kind="step", alpha=args.alpha)
            correct, valid = correct + r["correct"], valid + r["step_rvr"]
    return correct / len(samples), valid / len(samples)


def save_checkpoint(stage, step, optimizer, scheduler):
    """Everything an exact resume needs, written to a temp file and renamed (atomic)."""
    rng = {"torch": torch.get_rng_state(), "python": random.getstate(),
           "cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None}
    all_rng = [None] * world
    dist.all_gather_object(all_rng, rng) if ddp else all_rng.__setitem__(0, rng)
    if master:
        state = dict(stage=stage, step=step, model=policy.state_dict(), optimizer=optimizer.state_dict(),
                     scheduler=scheduler.state_dict(), rng=all_rng, skipped=skipped, config=config)
        torch.save(state, ckpt_path + ".tmp")
        os.replace(ckpt_path + ".tmp", ckpt_path)
    if ddp:
        dist.barrier()


def load_checkpoint(stage, optimizer, scheduler):
    """Restore a checkpoint of `stage`; returns the step to continue from (0 if there is none)."""
    if not (args.resume and os.path.exists(ckpt_path)):
        return 0
    state = torch.load(ckpt_path, map_location=device, weights_only=False)
    if state["stage"] != stage:
        return 0
    policy.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"]), scheduler.load_state_dict(state["scheduler"])
    rng = state["rng"][rank]
    torch.set_rng_state(rng["torch"].cpu()), random.setstate(rng["python"])
    if rng["cuda"] is not None:
        torch.cuda.set_rng_state(rng["cuda"].cpu())
    skipped.update(state["skipped"])
    path = os.path.join(args.out_dir, "metrics.jsonl")
    if master and os.path.exists(path):   # the resumed run logs the steps after the checkpoint again
        order = {"sft": 0, "rl": 1, "eval": 1}
        rows = [json.loads(line) for line in open(path)]
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows
                         if (order[r["stage"]], r["step"]) <= (order[stage], state["step"]))
    print(f"resumed {stage} at step {state['step']}")
    return state["step"]


def finished_stage(stage):
    """True when the checkpoint shows this stage is already complete (a resume past it)."""
    if not (args.resume and os.path.exists(ckpt_path)):
        return False
    state = torch.load(ckpt_path, map_location="cpu", weights_only=False, mmap=True)   # mmap: weights not read
    return stage == "sft" and state["stage"] == "rl"


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
    sync_gradients(params)
    norm = torch.nn.utils.clip_grad_norm_(params, 1.0).item() if not bad else float("nan")
    if bad:
        skipped["nonfinite_loss"] += 1
        print(f"non-finite loss {loss_value}: update skipped")
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    return norm


# ----------------------------------------------------------------------------- stage 1: SFT warm-up
def sft():
    """Token NLL on the assistant turn (the response plus its closing <|im_end|>)."""
    optimizer, scheduler = make_optimizer(args.sft_lr, preset["weight_decay_sft"], args.sft_steps, 0.03, True)
    start = load_checkpoint("sft", optimizer, scheduler)
    policy.train()
    for step in range(start, args.sft_steps):
        t0 = time.time()
        samples, images = images_of(global_batch(sft_set, step, args.sft_batch, salt=7)[0])
        batch = M.build_inputs(tokenizer, image_processor, images, [s["problem"] for s in samples],
                               max_prompt_len=args.max_prompt_len)
        if batch is None:
            continue
        kept = batch.pop("kept")
        skipped["long_prompt"] += len(samples) - len(kept)
        targets = [tokenizer(samples[i]["response"] + "<|im_end|>", add_special_tokens=False)["input_ids"]
                   [:args.max_new_tokens] for i in kept]
        length = max(map(len, targets))
        ids = torch.full((len(targets), length), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(targets), length)
        for r, t in enumerate(targets):
            ids[r, :len(t)], mask[r, :len(t)] = torch.tensor(t), 1
        batch = {k: v.to(device) if v is not None else None for k, v in batch.items()}
        with amp:
            logp = M.completion_logprobs(policy, batch, ids.to(device))
        mask = mask.to(device)
        count = mask.sum()                      # the global token count: ranks add up to the global mean
        if ddp:
            dist.all_reduce(count)
        loss = -(logp * mask).sum() / (count / world)
        loss.backward()
        norm = optimizer_step(optimizer, scheduler, loss.item())
        record = dict(stage="sft", step=step + 1, loss=loss.item(), grad_norm=norm,
                      lr=scheduler.get_last_lr()[0], seconds=time.time() - t0)
        log_jsonl("metrics.jsonl", record), run.log(record)
        if master and (step + 1) % 50 == 0:
            print(f"sft step {step + 1}/{args.sft_steps} loss {loss.item():.4f}")
        if (step + 1) % args.save_every == 0 or step + 1 == args.sft_steps:
            save_checkpoint("sft", step + 1, optimizer, scheduler)
        if args.stop_after and step + 1 - start == args.stop_after:
            raise SystemExit(f"stopped after {args.stop_after} steps; continue with --resume")


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
            samples, positions = global_batch(train_set, step * args.grad_accum + accum, args.prompts_per_step, 0)
            samples, images = images_of(samples)
            with amp:
                ro = rollout.generate(policy, tokenizer, image_processor, images, [s["problem"] for s in samples],
                                      num_samples=m, temperature=args.temperature, top_p=args.top_p,
                                      max_new_tokens=args.max_new_tokens, max_prompt_len=args.max_prompt_len,
                                      seeds=[args.seed * 1_000_003 + pos for pos in positions])
            times["generate"] += time.time() - t
            skipped["long_prompt"] += len(samples) - (len(ro.kept) if ro else 0)
            if ro is None:
                continue
            # --- rewards (Eqs. 2-3), group advantages (Eq. 4), reference log-probs (no activations kept)
            t = time.time()
            rs = [rewards.reward(text, samples[ro.kept[g]], kind=args.reward, alpha=args.alpha)
                  for text, g in zip(ro.texts, ro.group.tolist())]
            adv, frac_zero = group_advantages(torch.tensor([r["total"] for r in rs]), m)
            times["reward"] += time.time() - t
            t = time.time()
            batches = [list(range(s, min(s + args.micro_batch, len(rs)))) for s in range(0, len(rs), args.micro_batch)]
            with torch.no_grad(), amp:
                ref = [M.completion_logprobs(reference, *ro.rows(b)[:2], args.temperature, suppress_ids)
                       if args.beta else None for b in batches]
            times["reference"] += time.time() - t
            parts.append(dict(ro=ro, samples=samples, rs=rs, adv=adv.to(device), frac_zero=frac_zero, batches=batches,
                              ref=ref, old=[None] * len(batches)))
        # --- update: the loss is divided by the global count of completions (or tokens), so
        # micro-batches, accumulation and ranks add up to exactly the mean over the global batch.
        t = time.time()
        count = torch.tensor(float(sum(p["ro"].completion_mask.sum() if args.loss_norm == "token" else len(p["rs"])
                                       for p in parts)), device=device)
        if ddp:
            dist.all_reduce(count)
        for epoch in range(args.ppo_epochs):
            stats = []
            for part in parts:
                for i, rows in enumerate(part["batches"]):
                    prompt, ids, cmask = part["ro"].rows(rows)
                    with amp:
                        lp = M.completion_logprobs(policy, prompt, ids, args.temperature, suppress_ids)
                    loss, st = policy_loss(lp, part["old"][i], part["ref"][i], part["adv"][rows], cmask, args.beta,
                                           args.clip_eps, args.loss_norm, denom=count.clamp(min=1) / world)
                    loss.backward()
                    if epoch == 0 and args.ppo_epochs > 1:   # π_old for the later epochs (PPO clipping acts)
                        part["old"][i] = lp.detach()
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
        record = dict(stage="rl", step=step + 1, **global_means(per_sample),
                      loss=loss_value, grad_norm=norm,
                      lr=scheduler.get_last_lr()[0], seconds=time.time() - t0,
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
        if args.eval_every and (step + 1) % args.eval_every == 0 and master and eval_set:
            acc, valid = heldout_accuracy(policy, eval_set)
            log_jsonl("metrics.jsonl", dict(stage="eval", step=step + 1, accuracy=acc, format_valid=valid))
        if (step + 1) % args.save_every == 0 or step + 1 == args.max_steps:
            save_checkpoint("rl", step + 1, optimizer, scheduler)
        if args.stop_after and step + 1 - start == args.stop_after:
            raise SystemExit(f"stopped after {args.stop_after} steps; continue with --resume")


def global_means(lists):
    """{name: mean over every rank's values} for a dict of per-sample value lists."""
    sums = torch.tensor([[sum(v), len(v)] for v in lists.values()], dtype=torch.float64, device=device)
    if ddp:
        dist.all_reduce(sums)
    return {k: (s / n).item() if n else float("nan") for k, (s, n) in zip(lists, sums)}


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
        for k in keys:
            pts = [(r["step"], r[k]) for r in rows if r["stage"] == stage and k in r]
            if pts:
                ax.plot(*zip(*pts), label=k)
        ax.set_title(f"{stage}: {', '.join(keys)}", fontsize=9), ax.set_xlabel("step")
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out_dir, "training_curves.png"), dpi=110)


# ----------------------------------------------------------------------------- main
t_start, summary = time.time(), {}
if not args.resume and master and os.path.exists(os.path.join(args.out_dir, "metrics.jsonl")):
    for name in ("metrics.jsonl", "rollouts.jsonl"):
        if os.path.exists(os.path.join(args.out_dir, name)):
            os.remove(os.path.join(args.out_dir, name))
ran_sft = args.stage in ("sft", "both") and not finished_stage("sft")
if ran_sft:
    sft()
    if master and args.stage == "both":
        for part in (policy, tokenizer, image_processor):
            part.save_pretrained(os.path.join(args.out_dir, "warmup"))
    if eval_set and master:
        summary["accuracy_warmup"], summary["format_warmup"] = heldout_accuracy(policy, eval_set)
        print(f"held-out accuracy after warm-up: {summary['accuracy_warmup']:.3f}")
if args.stage in ("rl", "both"):
    # The reference is the frozen starting model of the RL stage: the warm-up result for "both"
    # (read back from out_dir/warmup when a resumed run skipped the warm-up), else --model.
    if args.stage == "both" and not ran_sft:
        reference = M.load(os.path.join(args.out_dir, "warmup"), device=device, dtype=torch.float32)[0]
    else:
        reference = copy.deepcopy(policy)
    reference.eval().requires_grad_(False).to(torch.bfloat16 if amp.enabled else torch.float32)
    from tqdm import tqdm
    bar = tqdm(total=args.max_steps, desc="StepGRPO", disable=not master)
    rl(reference, bar)
    bar.close()
    if eval_set and master:
        summary["accuracy_rl"], summary["format_rl"] = heldout_accuracy(policy, eval_set)
        print(f"held-out accuracy after StepGRPO: {summary['accuracy_rl']:.3f}")
if master:
    for part in (policy, tokenizer, image_processor):
        part.save_pretrained(os.path.join(args.out_dir, "final"))
    rl_rows = [json.loads(line) for line in open(os.path.join(args.out_dir, "metrics.jsonl")) if '"stage": "rl"' in line]
    if rl_rows:
        last = [r["reward"] for r in rl_rows[-10:]]
        summary.update(reward_first=rl_rows[0]["reward"], reward_last=sum(last) / len(last))
    plot_curves()
    summary.update(seconds=round(time.time() - t_start, 1), skipped=skipped, out_dir=args.out_dir)
    run.finish()
    print(json.dumps(summary))
if ddp:
    dist.destroy_process_group()

"""train.py: SFT warm-up, then StepGRPO (R1-VL, arXiv 2503.12937), in one readable loop.

    python train.py                                   # toy task, tiny Qwen2-VL, CPU: warm-up then StepGRPO
    python train.py --model Qwen/Qwen2-VL-2B-Instruct --stage sft --data mulberry.json --image_root imgs/ --out_dir out/sft-2b
    torchrun --nproc_per_node 4 train.py --model out/sft-2b/final --stage rl --data r1vl_10k.jsonl --image_root imgs/
    torchrun --nproc_per_node 8 train.py --model out/sft-7b/final --stage rl --fsdp ...     # 7B: sharded

One StepGRPO step is `batch = collect(run, step)` then `update(run, batch, ...)`:
1. collect: sample M completions for each of this rank's prompts in one batch (seeded per prompt, so the
   samples do not depend on batching, ranks or resumes); reward each with StepRAR + StepRVR (Eqs. 2-3);
   advantages are group z-scores (Eq. 4).
2. update: reference log-probs once, without gradients; then the loss of Eq. 5 (policy gradient −
   β·k3-KL to the frozen starting model) over micro-batches and one optimizer step. One step per rollout,
   as the official code, so the ratio is 1 and the clip never acts (`--ppo_epochs > 1` makes it act).
3. Whole groups stay on one rank; the loss is divided by the global count and gradients are summed by an
   explicit all-reduce (training/parallel.py), so any number of ranks gives the same update.
Weights stay fp32 (the paper's lr of 1e-6 is below bf16's resolution); on CUDA forward passes run under
bf16 autocast and rollouts are sampled from a bf16 copy of the weights, refreshed after every step.
"""
import argparse, dataclasses, json, os, signal, sys, time

import torch
from tqdm import tqdm

import model as M, rewards
from stepgrpo import policy_loss, sampling_mismatch, scaled_advantages
from grading import official_rewards
from qwen.tiny import is_tiny
from benchmarks import harness
from toy import task as toy
from training import checkpoint, credit, data, dynamic, flags, heldout, logs, lora, parallel, sampling_copy
from training.optim import make_optimizer, optimizer_step
from training.setup import all_skips, compute_dtype, generate, load_model, lora_reference, open_images, placeholder_rollout, setup


# ----------------------------------------------------------------------------- config
def parse_args(argv=None):
    """Every flag's default is the paper's (its implementation details and official code); `--data toy` applies
    toy.PRESETS (one for the tiny models, one for any other) to the flags not given, and `--lora_rank` LoRA's
    learning rates (lora.RATES; toy.LORA_PRESET for the tiny models on the toy task). `--help` shows them."""
    show = lambda preset: " ".join(f"--{k} {v}" for k, v in preset.items())   # noqa: E731
    presets = "; ".join(f"{kind}: {show(preset)}" for kind, preset in toy.PRESETS.items())
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=flags.ShowDefaults,
                                epilog=f"--data toy (the default) sets, unless given: {presets}. --lora_rank sets, "
                                f"unless given: {show(lora.RATES)}, and a warm-up lr {lora.SFT_LR_FACTOR:g}x the paper's; "
                                f"with --data toy on a tiny model instead: {show(toy.LORA_PRESET)}")
    g = p.add_argument_group("run")
    g.add_argument("--model", default="tiny", help="hub id, local directory (start it with ./ or /), or a tiny model: "
                   "'tiny' (Qwen2-VL), 'tiny-qwen2.5-vl', 'tiny-qwen3-vl', 'tiny-qwen3.5'")
    g.add_argument("--data", default="toy", help="'toy', or a JSON/JSONL file (R1-VL-10K for RL, Mulberry for SFT)")
    g.add_argument("--image_root", default=None, help="folder the image paths in --data are relative to")
    g.add_argument("--stage", default="rl", choices=["sft", "rl", "both"], help="warm-up, StepGRPO, or one then the other")
    g.add_argument("--out_dir", default="out", help="logs, checkpoint, warmup/ and final/ models")
    g.add_argument("--seed", type=int, default=0, help="data order, sampling and the toy task")
    g.add_argument("--resume", action="store_true", help="continue from out_dir/checkpoint exactly")
    g.add_argument("--overwrite", action="store_true", help="start afresh in an out_dir that holds a checkpoint")
    g.add_argument("--stop_after", type=int, default=0, help="save and end after N steps of a stage (continue with --resume)")
    g.add_argument("--dtype", default=None, choices=["bf16", "fp32"], help="autocast dtype (default: bf16 on CUDA)")
    g.add_argument("--fsdp", action="store_true", help="shard blocks, gradients and optimizer state over ranks (FSDP2)")
    g.add_argument("--gradient_checkpointing", action="store_true", help="recompute activations in backward")
    g.add_argument("--compile", action="store_true", help="decode with CUDA graphs (rollout.py; CUDA only)")
    g.add_argument("--wandb", default=None, help="wandb project name (needs `pip install wandb`)")
    g = p.add_argument_group("StepGRPO")
    g.add_argument("--max_steps", type=int, default=1000, help="RL steps (optimizer updates)")
    g.add_argument("--prompts_per_step", type=int, default=1, help="prompts per rank per accumulation step")
    g.add_argument("--grad_accum", type=int, default=4, help="accumulation steps; a rank samples all its prompts at once")
    g.add_argument("--num_generations", type=int, default=4, help="M, completions per prompt")
    g.add_argument("--temperature", type=float, default=1.2, help="sampling temperature")
    g.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling (evaluation only: RL needs 1.0)")
    g.add_argument("--max_new_tokens", type=int, default=1024, help="completion length limit")
    g.add_argument("--max_prompt_len", type=int, default=1024, help="longer prompts are skipped, never cut")
    g.add_argument("--micro_batch", type=int, default=4, help="rows per forward/backward in the update")
    g.add_argument("--lr", type=float, default=1e-6, help="AdamW, linear decay, no warm-up")
    g.add_argument("--beta", type=float, default=0.04, help="β, weight of the KL to the reference (Eq. 5)")
    g.add_argument("--alpha", type=float, default=0.1, help="α, weight of the key-step match in StepRAR (Eq. 2)")
    g.add_argument("--reward", default="step", choices=rewards.KINDS,
                   help="step = StepRAR + StepRVR; outcome = answer only (GRPO); or one of the two")
    g.add_argument("--reward_impl", default="paper", choices=["paper", "official"],
                   help="the paper's Eqs. 2-3, or the released code's reward functions, quirks included")
    g.add_argument("--loss_norm", default="seq", choices=["seq", "token"], help="mean per completion, or per token")
    g.add_argument("--ppo_epochs", type=int, default=1, help="updates per rollout (>1 makes the clip act)")
    g.add_argument("--clip_eps", type=float, default=0.2, help="PPO clip range, with --ppo_epochs > 1")
    g.add_argument("--clip_eps_high", type=float, default=None, help="upper clip range (clip-higher, DAPO); default: --clip_eps")
    g.add_argument("--adv_scale", default="group_std", choices=["group_std", "none", "per_reward"],
                   help="Eq. 4; mean-centred only (Dr. GRPO); StepRAR and StepRVR z-scored apart, then summed (GDPO)")
    g.add_argument("--dynamic_sampling", action="store_true", help="refill groups all right or all wrong with fresh prompts (DAPO)")
    g.add_argument("--max_extra_batches", type=int, default=3, help="dynamic sampling's bound on extra prompts, in steps' worth")
    g.add_argument("--step_credit", type=float, default=0.0, help="weight of per-step credit on matched key steps' tokens; 0 = off")
    g.add_argument("--tis_cap", type=float, default=0.0,
                   help="truncated importance sampling: weight tokens by min(π_θ/π_sampler, cap); 0 = off")
    flags.add_warmup_data_eval_flags(p, levels=sorted(toy.LEVELS), benches=harness.BENCHES)
    lora.add_flags(p)
    known, _ = p.parse_known_args(argv)
    if known.data == "toy":
        p.set_defaults(**(toy.PRESET if is_tiny(known.model) else toy.PRETRAINED))   # a tiny model's folder too
    if known.lora_rank:                             # LoRA's learning rates (training/lora.py, toy/task.py)
        p.set_defaults(**(toy.LORA_PRESET if known.data == "toy" and is_tiny(known.model) else lora.RATES))
    args = p.parse_args(argv)
    flags.check(p, args)
    return args


# ----------------------------------------------------------------------------- checkpoints
class Stop(Exception):
    """--stop_after: the stage saved its checkpoint and the run ends here, as asked (exit 0)."""


def end_of_step(run, stage, step, start, last, optimizer, scheduler):
    """Save every --save_every steps (not on a skipped update: the last good checkpoint stays the one before it),
    at the stage's end, and where --stop_after stops the run (a stage with steps left)."""
    stop = run.args.stop_after and step + 1 - start == run.args.stop_after and step + 1 < last
    if ((step + 1) % run.args.save_every == 0 and not run.skipped_in_a_row) or step + 1 == last or stop:
        skipped, bad_images = all_skips(run)
        checkpoint.save(run.ckpt_path, stage, step + 1, run.policy, optimizer, scheduler, dict(
            skipped=skipped, bad_images=bad_images, config=vars(run.args)), run.args.fsdp, run.ddp, run.master)
    if stop:
        raise Stop(f"stopped after {run.args.stop_after} steps of the {stage} stage (checkpoint at step {step + 1})")


# ----------------------------------------------------------------------------- stage 1: SFT warm-up
def sft_loss(run, samples, images):
    """Token NLL of the assistant turn (the response and its closing <|im_end|>), divided by the global token
    count so ranks add up to the global mean. Every rank runs the same collectives whatever it skipped; under
    FSDP a rank with nothing left runs a placeholder with weight 0, since sharded forwards go in lockstep."""
    a = run.args
    batch = M.build_inputs(run.tokenizer, run.image_processor, images, [s["problem"] for s in samples],
                           max_prompt_len=a.max_prompt_len) if samples else None
    kept = batch.pop("kept") if batch else []
    run.skipped["long_prompt"] += len(samples) - len(kept)
    responses = [samples[i]["response"] for i in kept]
    weight = 1.0
    if not kept and a.fsdp:
        batch = M.build_inputs(run.tokenizer, run.image_processor, [parallel.placeholder_image()], [""])
        batch.pop("kept")
        responses, weight = [""], 0.0
    targets = [run.tokenizer(r + "<|im_end|>", add_special_tokens=False)["input_ids"][:a.max_new_tokens] for r in responses]
    count = parallel.all_reduce(float(sum(map(len, targets))) * weight, run.device, run.ddp).float()
    if not targets:
        return torch.zeros((), device=run.device)
    ids = torch.full((len(targets), max(map(len, targets))), run.tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros(ids.shape, device=run.device)
    for r, t in enumerate(targets):
        ids[r, :len(t)], mask[r, :len(t)] = torch.tensor(t), 1
    with run.amp:
        logp = M.completion_logprobs(run.policy, {k: v.to(run.device) if v is not None else None for k, v in batch.items()},
                                     ids.to(run.device))
    return -(logp * mask).sum() * weight / (count.clamp(min=1) / run.world)


def sft(run):
    a = run.args
    optimizer, scheduler = make_optimizer(run, a.sft_lr, a.sft_weight_decay, a.sft_steps, 0.03, True)
    start = checkpoint.restore(run, "sft", optimizer, scheduler)
    run.policy.train()
    if start == 0:
        heldout.at(run, "sft", 0)                       # the starting model, with --eval_every
    for step in tqdm(range(start, a.sft_steps), desc="SFT warm-up", initial=start, total=a.sft_steps, disable=not run.master):
        t0 = time.time()
        samples, images, _ = open_images(run, data.batch_at(run.sft_set, step, a.sft_batch, run.rank, run.world, a.seed + 7)[0])
        skipped = run.skipped["long_prompt"]
        loss = sft_loss(run, samples, images)
        if step == start:                                # nothing kept now: every step would skip alike
            flags.require_kept(run, len(samples) > run.skipped["long_prompt"] - skipped)
        if loss.requires_grad:
            loss.backward()
        loss = loss.item()
        norm = optimizer_step(run, optimizer, scheduler, loss)
        checkpoint.stop_if_diverged(run, "sft", step)
        loss = parallel.all_reduce(loss, run.device, run.ddp).item() / run.world   # the global mean, not this rank's share
        run.log.write("metrics.jsonl", dict(stage="sft", step=step + 1, loss=loss, grad_norm=norm,
                                            lr=scheduler.get_last_lr()[0], seconds=time.time() - t0))
        heldout.at(run, "sft", step + 1)                # every --eval_every steps, and the last
        end_of_step(run, "sft", step, start, a.sft_steps, optimizer, scheduler)


# ----------------------------------------------------------------------------- stage 2: StepGRPO
@dataclasses.dataclass
class Batch:
    """One RL step's experience on this rank: rows of a prompt's group are consecutive."""
    rollout: object                   # rollout.Rollout: the completions (None: every prompt skipped)
    samples: list                     # the sample each row answers
    rewards: list                     # per row: {"total", "step_rar", "step_rvr", "correct", "k", ...}
    advantages: torch.Tensor          # per row, Eq. 4 (or --adv_scale's)
    frac_zero_std: float              # share of groups whose rewards are all equal (no policy gradient)
    seconds: logs.Timer
    token_advantages: object = None   # [rows, T] with --step_credit (stepgrpo.step_credit), else None
    dynamic: object = None            # --dynamic_sampling's counts of the step (training/dynamic.py)


def collect(run, step):
    """Rollouts for this rank's prompts of `step` (each seeded by its position in the data stream), their rewards
    (StepRAR + StepRVR, Eqs. 2-3) and group advantages (Eq. 4); options: --dynamic_sampling, --adv_scale, --step_credit."""
    a, timer, group_size = run.args, logs.Timer(), run.args.num_generations
    first = sample_groups(run, *data.batch_at(run.train_set, step, a.prompts_per_step * a.grad_accum, run.rank, run.world,
                                              a.seed), timer)
    ro, answered, rs, counts = (dynamic.fill(run, step, first, lambda s, p: sample_groups(run, s, p, timer))
                                if a.dynamic_sampling else (*first, None))   # refill groups all right or all wrong
    if ro is None:
        return Batch(None, [], [], torch.zeros(0), 0.0, timer, dynamic=counts)
    with timer("reward"):
        advantages, frac_zero = scaled_advantages(torch.tensor([r["total"] for r in rs]), group_size, a.adv_scale,
                                                  torch.tensor([[r["step_rar"], r["step_rvr"]] for r in rs]))
        per_token = credit.token_advantages(run, ro, rs, advantages) if a.step_credit else None
    return Batch(ro, answered, rs, advantages.to(run.device), frac_zero, timer, per_token, counts)


def sample_groups(run, samples, positions, timer):
    """(rollout, the sample each row answers, its rewards): M completions of each prompt, seeded by its stream
    position; (None, [], []) when every prompt was skipped."""
    a = run.args
    samples, images, index = open_images(run, samples)
    with timer("generate"):
        ro = generate(run, samples, images, num_samples=a.num_generations, temperature=a.temperature,
                      ignore_eos=run.fixed_length, seeds=[a.seed * 1_000_003 + positions[i] for i in index])
    run.skipped["long_prompt"] += len(samples) - (len(ro.kept) if ro else 0)
    if ro is None:
        return None, [], []
    with timer("reward"):
        answered = [samples[ro.kept[g]] for g in ro.group.tolist()]
        judge = official_rewards.reward if a.reward_impl == "official" else rewards.reward
        return ro, answered, [judge(text, s, kind=a.reward, alpha=a.alpha) for text, s in zip(ro.texts, answered)]


def update(run, batch, optimizer, scheduler):
    """Reference log-probs, the loss of Eq. 5 over micro-batches of rows, one optimizer step. The loss is divided
    by the global count of completions (or tokens), so micro-batches and ranks add up to the global mean."""
    a, ro, timer = run.args, batch.rollout, batch.seconds
    adv = batch.advantages if batch.token_advantages is None else batch.token_advantages
    jobs = micro_batches(run, batch)
    if jobs and ro is None:                   # FSDP, every prompt of this rank skipped: weight-0 rows in lockstep
        ro, adv = placeholder_rollout(run), torch.zeros(1, device=run.device)
    with timer("reference"), torch.no_grad(), run.amp, lora.adapters_off(run.reference):
        ref = [M.completion_logprobs(run.reference, *ro.rows(rows)[:2], a.temperature, ro.suppress_ids)
               if a.beta else None for rows, _ in jobs]
    with timer("update"):
        n = 0 if not batch.rewards else float(ro.completion_mask.sum()) if a.loss_norm == "token" else len(batch.rewards)
        count = parallel.all_reduce(float(n), run.device, run.ddp).float()
        old, stats = [None] * len(jobs), []
        for epoch in range(a.ppo_epochs):
            for j, (rows, weight) in enumerate(jobs):
                prompt, ids, mask = ro.rows(rows)
                sampled = ro.logprobs[rows, :ids.shape[1]]
                with run.amp:
                    logp = M.completion_logprobs(run.policy, prompt, ids, a.temperature, ro.suppress_ids)
                loss, st = policy_loss(logp, old[j], ref[j], adv[rows], mask, a.beta, a.clip_eps,
                                       a.loss_norm, denom=count.clamp(min=1) / run.world,
                                       sampler_logp=sampled if a.tis_cap else None, tis_cap=a.tis_cap,
                                       clip_eps_high=a.clip_eps_high)
                (loss * weight).backward()
                if epoch == 0 and a.ppo_epochs > 1:   # π_old for the later epochs
                    old[j] = logp.detach()
                if weight and epoch == 0:
                    stats.append(dict(st, **sampling_mismatch(logp.detach(), sampled, mask), loss=loss.item(), rows=len(rows)))
                elif weight:                          # the clip acts from the second epoch: its shares from the last
                    stats[j].update({k: st[k] for k in ("clip_frac", "clip_low_frac", "clip_high_frac")})
            loss_value = sum(s["loss"] for s in stats)
            norm = optimizer_step(run, optimizer, scheduler, loss_value)   # every rank steps, even with no rows
    return dict(loss=loss_value, grad_norm=norm, micro=stats)


def micro_batches(run, batch):
    """[(rows, weight)]: rows in chunks of --micro_batch, a group's rows together (their prompt then runs once:
    model.score_tokens) and groups sorted by their longest completion (less padding); padded across ranks under
    FSDP with weight-0 repeats so every rank runs the same number of sharded forwards."""
    group, length = (batch.rollout.group.tolist(), batch.rollout.completion_mask.sum(1).tolist()) if batch.rollout else ([], [])
    longest = {}
    for g, n in zip(group, length):
        longest[g] = max(longest.get(g, 0), n)
    order = sorted(range(len(group)), key=lambda r: (longest[group[r]], group[r]))
    jobs = [order[s:s + run.args.micro_batch] for s in range(0, len(order), run.args.micro_batch)]
    return parallel.lockstep(jobs, run.args.fsdp, run.ddp, run.device)


def load_reference(run):
    """The frozen starting model of the RL stage (--model, or the warm-up's result), in the policy's own dtype
    and sharding, so that the two agree bitwise until the first update (KL exactly 0 at step 0); with LoRA the
    policy itself, whose adapters update() turns off for it."""
    start = os.path.join(run.args.out_dir, "warmup") if run.args.stage == "both" else run.args.model
    if run.args.lora_rank:
        return lora_reference(run, start)
    net = load_model(run.args, start, run.device)[0]
    if compute_dtype(run.args, run.device) == torch.bfloat16 and not run.args.fsdp:
        # autocast casts every matmul weight to bf16 anyway: kept cast (the sampling copy's layout), the
        # reference computes the same bits in half the memory; under FSDP it stays sharded in fp32 instead.
        net = sampling_copy.inference_copy(net, torch.bfloat16)
    return net.eval().requires_grad_(False)


def rl(run):
    a = run.args
    optimizer, scheduler = make_optimizer(run, a.lr, 0.0, a.max_steps * a.ppo_epochs, 0.0, False)
    start = checkpoint.restore(run, "rl", optimizer, scheduler)
    run.policy.train()        # gradient checkpointing acts only in train mode; the model has no dropout
    if start == 0:
        heldout.at(run, "rl", 0)                        # with --stage both, the warm-up's last score is step 0
    bar = tqdm(range(start, a.max_steps), desc="StepGRPO", initial=start, total=a.max_steps, disable=not run.master)
    for step in bar:
        t0 = time.time()
        batch = collect(run, step)                             # rollouts, rewards, advantages
        if step == start:
            flags.require_kept(run, batch.rollout is not None)
        result = update(run, batch, optimizer, scheduler)      # reference log-probs, loss, optimizer step
        checkpoint.stop_if_diverged(run, "rl", step)
        record = logs.log_rl_step(run, step, batch, result, time.time() - t0)  # metrics.jsonl, rollouts.jsonl
        bar.set_postfix(reward=f"{record['reward']:.3f}", acc=f"{record['accuracy']:.2f}", kl=f"{record['kl']:.4f}")
        heldout.at(run, "rl", step + 1)
        end_of_step(run, "rl", step, start, a.max_steps, optimizer, scheduler)


# ----------------------------------------------------------------------------- main
def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    run, t_start, summary = setup(args), time.time(), {}
    if not args.resume and run.master:
        for name in ("metrics.jsonl", "rollouts.jsonl"):
            if os.path.exists(os.path.join(args.out_dir, name)):
                os.remove(os.path.join(args.out_dir, name))
    before = signal.signal(signal.SIGTERM, signal.default_int_handler)   # a scheduler's stop, `kill`: as Ctrl-C
    try:
        if args.stage in ("sft", "both") and not (args.resume and checkpoint.stage_of(run.ckpt_path) == "rl"):
            sft(run)
            summary["sft_records"] = len(run.sft_set)
            if args.stage == "both":
                save_pretrained(run, "warmup")
        if args.stage in ("rl", "both"):
            run.reference = load_reference(run)
            rl(run)
            summary["rl_records"] = len(run.train_set)
    except Stop as stop:
        if run.master:
            print(f"\n{stop}; continue with: {checkpoint.resume_command(argv)}", file=sys.stderr)
        return finish(run)
    except KeyboardInterrupt:
        raise SystemExit(f"\ninterrupted: {checkpoint.last_good(run.ckpt_path)}; continue with: {checkpoint.resume_command(argv)}"
                         if run.master else 1)
    finally:
        signal.signal(signal.SIGTERM, before)
    save_pretrained(run, "final")
    skipped = all_skips(run)[0]
    if run.master:
        logs.plot_curves(args.out_dir)
        summary.update(logs.reward_summary(args.out_dir), seconds=round(time.time() - t_start, 1),
                       skipped=skipped, out_dir=args.out_dir)
        print(json.dumps(logs.finite(summary)))
    finish(run)


def finish(run):
    run.log.finish()
    parallel.close(finished=True)


def save_pretrained(run, name):
    checkpoint.save_pretrained(os.path.join(run.args.out_dir, name), run.policy, run.tokenizer, run.image_processor,
                               run.args.fsdp, run.ddp, run.master)


if __name__ == "__main__":
    main()

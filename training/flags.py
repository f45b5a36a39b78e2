"""training/flags.py: the settings train.py refuses, each in one line (argparse's error: usage, the line, exit 2).

A setting is refused when it crashes later, or when the run would end "successfully" having trained
nothing: a group of one completion has no spread, so Eq. 4 gives every advantage 0; temperature 0
divides the logits by zero; zero steps, prompts or accumulation steps leave nothing to update.
"""
import argparse
import os


class ShowDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """Every flag's help ends with its default, unless the help already says what the default is (or the flag is
    required: it has none)."""
    def _get_help_string(self, action):
        shown = "default" in (action.help or "") or action.required
        return action.help if shown else super()._get_help_string(action)



def add_warmup_data_eval_flags(p, levels, benches):
    """train.py's flags of the SFT warm-up, the data, held-out evaluation and logging (`levels`: the toy task's
    difficulty levels; `benches`: what --eval_bench accepts)."""
    g = p.add_argument_group("SFT warm-up, data, evaluation, logging")
    g.add_argument("--sft_steps", type=int, default=1000, help="warm-up steps")
    g.add_argument("--sft_batch", type=int, default=8, help="warm-up samples per rank per step")
    g.add_argument("--sft_lr", type=float, default=None, help="warm-up peak lr (3%% warm-up, cosine); "
                   "the paper's by model size: 2e-5, or 5e-6 from 5B parameters (7B)")
    g.add_argument("--sft_weight_decay", type=float, default=0.05, help="warm-up AdamW weight decay")
    g.add_argument("--drop_reflective", action="store_true", help="drop SFT samples with a self-correction step")
    g.add_argument("--derive_key_steps", action="store_true", help="derive missing key steps from the solution")
    g.add_argument("--eval_bench", default=None, choices=benches, help="held-out benchmark, scored greedily "
                   "at each stage's end (training/heldout.py; toy: the default with --data toy and --eval_n > 0)")
    g.add_argument("--eval_data", default=None, help="its file or folder, as evaluate.py --data")
    g.add_argument("--eval_image_root", default=None, help="its image folder, as evaluate.py --image_root")
    g.add_argument("--eval_limit", type=int, default=0, help="a fixed seeded subset of N records; 0 = all")
    g.add_argument("--eval_every", type=int, default=0, help="also score it at each stage's start and every N steps")
    g.add_argument("--eval_n", type=int, default=0, help="held-out questions of --eval_bench toy")
    g.add_argument("--save_every", type=int, default=100, help="checkpoint every N steps")
    g.add_argument("--log_rollouts_every", type=int, default=10, help="write completions to rollouts.jsonl")
    g.add_argument("--difficulty", type=int, default=2, choices=levels, help="toy task level")
    g.add_argument("--teacher_noise", type=float, default=0.0, help="toy warm-up paths that slip")
    g.add_argument("--teacher_slip", default="count", choices=["count", "late"],
                   help="where a toy warm-up path slips: one count one low, or the last operation one off")


def check(p, a):
    """Ranges of the numbers and contradictions between flags; p.error exits with one line."""
    rl, sft = a.stage != "sft", a.stage != "rl"
    for name in ("save_every", "micro_batch", "max_new_tokens", "max_prompt_len", "ppo_epochs", "prompts_per_step",
                 "grad_accum", "sft_batch", *(["max_steps"] if rl else []), *(["sft_steps"] if sft else [])):
        if getattr(a, name) < 1:
            p.error(f"--{name} must be at least 1 (got {getattr(a, name)})")
    for name in ("stop_after", "eval_every", "eval_n", "log_rollouts_every", "max_steps", "sft_steps"):
        if getattr(a, name) < 0:
            p.error(f"--{name} must be 0 or more (got {getattr(a, name)})")
    for name in ("lr", "sft_lr", "temperature", "clip_eps"):          # sft_lr None: chosen by model size
        if getattr(a, name) is not None and not getattr(a, name) > 0:
            p.error(f"--{name} must be above 0 (got {getattr(a, name)})")
    for name in ("beta", "alpha", "sft_weight_decay"):
        if not getattr(a, name) >= 0:
            p.error(f"--{name} must be 0 or more (got {getattr(a, name)})")
    if rl and a.num_generations < 2:
        p.error(f"--num_generations must be at least 2: a group of {a.num_generations} has no reward spread, "
                "so every advantage (Eq. 4) is 0 and nothing is learnt")
    if not 0 < a.top_p <= 1:
        p.error(f"--top_p must be in (0, 1] (got {a.top_p})")
    if a.top_p < 1 and rl:
        p.error("--top_p < 1 samples from the nucleus, but the loss scores the full distribution: use --top_p 1 in RL")
    if a.tis_cap != 0 and not a.tis_cap >= 1:
        p.error(f"--tis_cap must be 0 (off) or at least 1: a cap below 1 scales down on-policy tokens too (got {a.tis_cap})")
    if not 0 <= a.teacher_noise <= 1:
        p.error(f"--teacher_noise is a share of the warm-up paths: it must be in [0, 1] (got {a.teacher_noise})")
    if a.clip_eps_high is not None and not a.clip_eps_high > 0:
        p.error(f"--clip_eps_high must be above 0 (got {a.clip_eps_high})")
    if a.clip_eps_high is not None and a.ppo_epochs == 1:
        p.error("--clip_eps_high acts only when the ratio moves: with --ppo_epochs 1 it is always 1; give --ppo_epochs > 1")
    if a.adv_scale == "per_reward" and a.reward != "step":
        p.error(f"--adv_scale per_reward z-scores StepRAR and StepRVR apart: it needs --reward step (got {a.reward})")
    if not a.step_credit >= 0 or a.max_extra_batches < 1:
        p.error(f"--step_credit must be 0 or more and --max_extra_batches at least 1 "
                f"(got {a.step_credit}, {a.max_extra_batches})")
    if a.max_extra_batches != p.get_default("max_extra_batches") and not a.dynamic_sampling:
        p.error("--max_extra_batches bounds --dynamic_sampling's extra prompts: add --dynamic_sampling or drop it")
    rl_only = [f"--{k}" for k in ("adv_scale", "dynamic_sampling", "step_credit", "clip_eps_high") if getattr(a, k) != p.get_default(k)]
    if not rl and rl_only:
        p.error(f"{', '.join(rl_only)} change the RL stage; --stage sft has none: drop them or use --stage both")
    if a.resume and a.overwrite:
        p.error("--resume continues the checkpoint that --overwrite would replace: pass one of them")
    if not rl and (a.reward, a.reward_impl) != (p.get_default("reward"), p.get_default("reward_impl")):
        p.error("--reward and --reward_impl choose the RL reward; --stage sft has none: drop them or use --stage both")
    if a.eval_every and a.data != "toy" and not getattr(a, "eval_data", None):
        p.error("--eval_every scores a held-out set, and only --data toy has one (--eval_n): drop --eval_every")
    given_eval_every = a.eval_every != p.get_default("eval_every")      # a preset's with --eval_n 0 is just off
    if a.eval_every and a.data == "toy" and not a.eval_n and given_eval_every:
        p.error("--eval_every scores --eval_n held-out questions: give --eval_n > 0, or drop --eval_every")
    if a.fsdp and "RANK" not in os.environ:
        p.error("--fsdp shards over processes started by torchrun: torchrun --nproc_per_node N train.py --fsdp ...")


def require_kept(run, kept):
    """Stop at a run's first step if no rank kept a sample: every later step would skip the same way."""
    from training import parallel    # here, so that the scripts' --help does not wait for torch
    flag = parallel.all_reduce(float(kept), run.device, run.ddp, "max")
    if not flag:
        a, s = run.args, run.skipped
        raise SystemExit(f"error: the first step kept no sample ({s['long_prompt']} prompts longer than --max_prompt_len "
                         f"{a.max_prompt_len}, {len(run.bad_images)} unreadable images): raise --max_prompt_len, or check "
                         "--data and --image_root")

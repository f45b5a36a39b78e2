"""training/setup.py: everything a training run starts from, built by `setup(args)` from train.py's flags.

    run = setup(train.parse_args(argv))      # checks the inputs, loads the data, starts the processes, loads the model

`Run` holds the config, the processes (rank, world), the policy and the copy rollouts are sampled
from, the tokenizer and image processor, the data and the log. Mistakes a person can fix (a missing
model directory or data file, a file for the other stage, an out_dir with a checkpoint) stop with one
line before any model is loaded or anything is written.
"""
import argparse
import dataclasses
import os
import random

import torch
import torch.distributed as dist
import transformers
from tqdm import tqdm

import model as M
import rollout
from qwen import tiny
from toy import task as toy
from training import checkpoint, data, heldout, lora, logs, parallel, sampling_copy


@dataclasses.dataclass
class Run:
    """Everything a stage needs: the config, the processes, the models and the data."""
    args: argparse.Namespace
    ddp: bool
    rank: int
    world: int
    device: torch.device
    amp: object                 # autocast context (bf16 on CUDA), or a no-op
    policy: torch.nn.Module     # fp32 master weights, trained
    sampler: torch.nn.Module    # what rollouts are sampled from: the policy, or its inference copy
    tokenizer: object
    image_processor: object
    sft_set: list
    train_set: list
    eval_set: list
    log: logs.Log
    reference: torch.nn.Module = None   # frozen starting model of the RL stage
    fixed_length: bool = False          # benchmarks: every completion max_new_tokens long (stop tokens ignored)
    skipped: dict = dataclasses.field(default_factory=lambda: {"long_prompt": 0, "nonfinite_loss": 0})
    bad_images: set = dataclasses.field(default_factory=set)   # ids of records whose image failed to open
    data_skipped: dict = dataclasses.field(default_factory=dict)   # load-time skips by reason, per data file read
    skipped_in_a_row: int = 0           # updates skipped one after another (non-finite loss or gradient norm)

    @property
    def master(self):
        return self.rank == 0

    @property
    def ckpt_path(self):
        return os.path.join(self.args.out_dir, "checkpoint", "ckpt.pt")


def load_data(args, stats=None):
    """(sft_set, train_set, eval_set). For the toy task SFT imitates the teacher's paths (some miscount with
    --teacher_noise) while RL is rewarded by the truth. Real files: bad records are counted and logged by
    the loaders (their skips by reason into stats["sft_data"], stats["rl_data"]); a file with nothing usable
    is an error."""
    if args.data == "toy":
        train = toy.dataset("train", n=4000, seed=args.seed, difficulty=args.difficulty, teacher_noise=args.teacher_noise,
                            teacher_slip=args.teacher_slip)
        return [{**s, "response": s["teacher_solution"]} for s in train], train, heldout.records(args)
    stats = {} if stats is None else stats
    sft = data.load_sft_data(args.data, args.image_root, stats.setdefault("sft_data", {}),
                             drop_reflective=args.drop_reflective) if args.stage != "rl" else []
    rl = data.load_rl_data(args.data, args.image_root, stats.setdefault("rl_data", {}),
                           derive_key_steps=args.derive_key_steps) if args.stage != "sft" else []
    return sft, rl, heldout.records(args)


def compute_dtype(args, device):
    """What forward passes compute in: bf16 autocast on CUDA (M.cuda_config) unless --dtype says otherwise."""
    return torch.bfloat16 if args.dtype == "bf16" or (M.cuda_config(device) and args.dtype is None) else torch.float32


def load_model(args, name, device):
    """The model in fp32 (master weights), FSDP-sharded with --fsdp; with --lora_rank a frozen base with fp32
    adapters, with --freeze_vision a frozen vision tower (training/lora.py). A user's mistake gives one line.
    Under --fsdp the model is read into CPU memory and sharded there; each unit's shard then moves to the
    GPU (FSDP moves one whole unit at a time), so no GPU ever holds the whole fp32 model."""
    try:
        net, tokenizer, image_processor = M.load(name, device="cpu" if args.fsdp else device, dtype=torch.float32,
                                                 build=tiny.builder(name))
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: cannot load model {name!r}: {str(e).splitlines()[0]}")
    if args.freeze_vision:
        lora.freeze_vision(net)
    if args.lora_rank:
        net = lora.add_adapters(net, args, compute_dtype(args, device))
    if args.gradient_checkpointing:   # transformers >= 5.24 names it activation checkpointing
        enable = getattr(net, "activation_checkpointing_enable", None) or net.gradient_checkpointing_enable
        enable({"use_reentrant": False})
    if args.fsdp:   # bf16 runs gather their blocks' matmul weights in bf16 (FSDP's mixed precision)
        bf16 = compute_dtype(args, device) == torch.bfloat16
        net = parallel.shard(net, torch.bfloat16 if bf16 else None)
    return net, tokenizer, image_processor


def check_inputs(args):
    """Mistakes a person can fix, found before any model is loaded or out_dir is touched. Returns the lines
    saying which flags a --resume changes (checkpoint.check_resume)."""
    name = args.model
    if name not in tiny.TINY_MODELS and not os.path.isdir(name) and (name.startswith((".", "/", "~")) or name.count("/") != 1):
        raise SystemExit(f"error: model directory {name!r} does not exist (a hub id looks like 'Qwen/Qwen2-VL-2B-Instruct')")
    if args.fsdp and args.lora_rank:
        raise SystemExit("error: --fsdp with --lora_rank: LoRA's trained state is small, use data parallel (torchrun without --fsdp)")
    if args.data != "toy" and not os.path.isfile(args.data):
        raise SystemExit(f"error: data file {args.data!r} not found")
    checkpoint.record_inputs(args)                 # absolute paths and the data file's fingerprint, for --resume
    if args.wandb:
        try:
            import wandb  # noqa: F401  (checked here; logs.py uses it)
        except ImportError:
            raise SystemExit("error: --wandb needs wandb: pip install wandb")
    if args.overwrite and not args.resume:
        return []                                   # whatever is in out_dir, damaged or not, is replaced
    try:
        saved = checkpoint.read(os.path.join(args.out_dir, "checkpoint", "ckpt.pt"))
    except ValueError as e:
        raise SystemExit(f"error: {e}: start afresh with --overwrite, or use another --out_dir")
    if args.resume and saved is None:
        raise SystemExit(f"error: --resume, but {args.out_dir}/checkpoint holds no checkpoint: run without --resume")
    if not args.resume and saved is not None:
        raise SystemExit(f"error: {args.out_dir} holds a {saved['stage']} checkpoint: add --resume to continue it, "
                         "--overwrite to start afresh, or use another --out_dir")
    return checkpoint.check_resume(args, saved, int(os.environ.get("WORLD_SIZE", 1))) if saved else []


def setup(args):
    transformers.utils.logging.disable_progress_bar()
    changes, stats = check_inputs(args), {}
    try:
        sft_set, train_set, eval_set = load_data(args, stats)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    ddp, rank, world, device = parallel.setup()
    if args.compile and not M.cuda_config(device):
        raise SystemExit("error: --compile captures the decode step as CUDA graphs: it needs a CUDA device")
    checkpoint.claim(args.out_dir, rank == 0, ddp)    # writable, and no other run in it
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    policy, tokenizer, image_processor = load_model(args, args.model, device)
    factor = lora.SFT_LR_FACTOR if args.lora_rank else 1
    args.sft_lr = args.sft_lr or factor * paper_sft_lr(sum(q.numel() for q in policy.parameters()))
    bf16 = compute_dtype(args, device) == torch.bfloat16
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    # Sampling reads a plain copy in the compute dtype: no autocast casts per token, no FSDP gathers. LoRA samples
    # from the policy itself: its base is in that layout already, its adapters unmerged (training/lora.py).
    own_copy = (bf16 or args.fsdp) and not args.lora_rank
    sampler = sampling_copy.inference_copy(policy, torch.bfloat16 if bf16 else torch.float32) if own_copy else policy
    run = Run(args, ddp, rank, world, device, amp, policy, sampler, tokenizer, image_processor, sft_set, train_set,
              eval_set, logs.Log(args, rank == 0), data_skipped={k: v["skipped"] for k, v in stats.items() if v})
    for line in changes:
        run.log.print(line)
    return run


def paper_sft_lr(n_params):
    """The paper's warm-up lr: 2e-5 for Qwen2-VL-2B, 5e-6 for the 7B; from 5B parameters a model counts as the 7B."""
    return 5e-6 if n_params >= 5e9 else 2e-5


def lora_reference(run, start):
    """With LoRA the RL reference is the policy with its adapters off. After a warm-up the policy (which is also
    the sampler) is rebuilt from `start` (the warm-up's merged model) with fresh adapters, so that its base, the
    reference, is the warm-up's model; the warm-up's adapters are kept (lora.chain_warmup) for final/adapter."""
    if run.args.stage == "both":
        run.policy = run.sampler = load_model(run.args, start, run.device)[0]
        lora.chain_warmup(run.policy, start, run.args.model)
    return run.policy


def open_images(run, samples):
    """(samples kept, their images, their indices). An image that cannot be opened, or that the image processor
    would refuse (data.load_images), drops its sample; each such record is counted once and logged by its rank."""
    kept, images, index = [], [], []
    for i, s in enumerate(samples):
        try:
            images.append(data.load_images(s.get("image") or s.get("image_path"), run.image_processor.size["longest_edge"]))
            kept.append(s)
            index.append(i)
        except ValueError as e:
            key = s.get("id") or s.get("image_path")
            if key not in run.bad_images:
                run.bad_images.add(key)
                tqdm.write(f"[rank {run.rank}] skipping sample {s.get('id')}: {e}")
    return kept, images, index


def all_skips(run):
    """Every rank's skips, by reason, for the checkpoint and the summary (a collective: every rank calls it):
    counts summed over ranks; nonfinite_loss once (every rank skips the same update); bad_image as the number of
    distinct records; then the load-time skips of each data file. Returns (counts, bad image ids)."""
    mine = [dict(run.skipped), sorted(map(str, run.bad_images))]
    every = [mine] * run.world
    if run.ddp:
        every = [None] * run.world
        dist.all_gather_object(every, mine)
    counts, ids = {}, set()
    for skipped, bad in every:
        ids.update(bad)
        for k, v in skipped.items():
            counts[k] = max(counts.get(k, 0), v) if k == "nonfinite_loss" else counts.get(k, 0) + v
    return {**counts, "bad_image": len(ids), **run.data_skipped}, sorted(ids)


def placeholder_rollout(run):
    """A one-row rollout of a blank image and a one-token completion, for weight-0 forwards: under FSDP a rank
    whose prompts were all skipped still takes part in every block's gather (parallel.lockstep)."""
    batch = M.build_inputs(run.tokenizer, run.image_processor, [parallel.placeholder_image()], [""])
    batch.pop("kept")
    one = torch.ones(1, 1, device=run.device)
    return rollout.Rollout({k: v.to(run.device) if v is not None else None for k, v in batch.items()},
                           torch.full((1, 1), run.tokenizer.pad_token_id, device=run.device), one, 0 * one,
                           torch.zeros(1, dtype=torch.bool), [""], torch.zeros(1, dtype=torch.long), [0],
                           torch.zeros(0, dtype=torch.long, device=run.device))


def generate(run, samples, images, **kw):
    with run.amp:
        return rollout.generate(run.sampler, run.tokenizer, run.image_processor, images, [s["problem"] for s in samples],
                                max_new_tokens=run.args.max_new_tokens, max_prompt_len=run.args.max_prompt_len,
                                compile=run.args.compile, **kw)

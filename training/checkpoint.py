"""training/checkpoint.py: save and restore training state so that `--resume` continues exactly.

A checkpoint is one file, `out_dir/checkpoint/ckpt.pt`: weights, optimizer, scheduler, stage and
step, the RNG state of every rank, skip counters and the config. The data position needs no
entry: it is a function of the step (data.batch_at). It is written to a temporary file and
renamed, so a run killed mid-write keeps the previous checkpoint. Under FSDP the shards are
gathered into whole tensors first, so a checkpoint does not depend on the number of ranks: a run
may continue on more or fewer.

`--resume` continues a run as it was started: the flags in MAY_CHANGE may differ (how long it goes,
what it logs and evaluates, how the work is spread), every other flag must equal the checkpoint's
config (`check_resume`), its paths absolute and the data file by content (`record_inputs`); a stopped
run prints the command that continues it (`resume_command`). A run holds a lock on out_dir (`claim`),
so a second run into the same folder stops. A failed save (disk full) removes its partial file and
stops, naming the last good checkpoint; final/ and warmup/ are written whole or not at all, and
weights that are not finite are never written.
"""
import contextlib
import errno
import fcntl
import hashlib
import json
import math
import os
import random
import shlex
import shutil
import sys

import torch
import torch.distributed as dist
from safetensors import SafetensorError

from qwen.tiny import TINY_MODELS
from training import lora, parallel, sampling_copy


# Flags that --resume may change: none of them changes what a step computes. Every flag not listed (one added
# later included) must equal the checkpoint's: the data, the seed, the model, the method's hyper-parameters.
MAY_CHANGE = {
    "resume", "overwrite", "out_dir",                                    # how this invocation starts
    "max_steps", "sft_steps", "stop_after", "save_every",                # how long it goes (not below the checkpoint)
    "log_rollouts_every", "wandb",                                       # logging
    "eval_every", "eval_n", "eval_bench", "eval_data", "eval_image_root", "eval_limit",   # held-out evaluation
    "fsdp", "gradient_checkpointing", "compile", "micro_batch",          # how the same update is computed
    "prompts_per_step", "grad_accum", "sft_batch",                       # if the global batch stays the same
}
GLOBAL_BATCH = {"rl": ("prompts_per_step", "grad_accum"), "sft": ("sft_batch",)}   # × ranks, of the stages to come


def read(path):
    """The checkpoint at `path` (mmap: the weights are not read), None if there is none; ValueError if it
    cannot be read (a file cut short, or empty)."""
    if not os.path.exists(path):
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:   # torch raises RuntimeError, EOFError, ValueError, UnpicklingError, ... by damage
        raise ValueError(f"checkpoint {path} is damaged ({(str(e).splitlines() or [type(e).__name__])[0]})") from e


def last_good(path):
    """Where the last good checkpoint is, in words, for the line a stopped run ends with."""
    try:
        state = read(path)
    except ValueError:
        state = None
    return f"the last good checkpoint ({state['stage']}, step {state['step']}) is {path}" if state else "no checkpoint was saved"


def _same(a, b):
    if a == b:
        return True
    paths = isinstance(a, str) and isinstance(b, str) and os.path.exists(a) and os.path.exists(b)
    return paths and os.path.samefile(a, b)


def check_resume(args, state, world):
    """Refuse (one line) a --resume whose flags change the meaning of the checkpoint's run; returns the lines
    saying which changeable flags differ (they apply from here on)."""
    saved, stage, step, where = state["config"], state["stage"], state["step"], os.path.join(args.out_dir, "checkpoint")
    started = saved["stage"]
    if not (stage == "sft" and args.stage in ("sft", "both")) and not (stage == "rl" and args.stage == started):
        why = ("RL would start from --model, dropping the warm-up" if stage == "sft" else
               "nothing would train and final/ would be rewritten" if args.stage == "sft" else
               "RL would continue against another reference model")
        allowed = "--stage sft or --stage both" if stage == "sft" else f"--stage {started}"
        raise SystemExit(f"error: {where} holds the {stage} stage of a --stage {started} run; --stage {args.stage} "
                         f"would not continue it ({why}): resume with {allowed}")
    given = vars(args)
    for k in [k for k in given if given[k] is None and saved.get(k) is not None and k != "data_fingerprint"]:
        given[k] = saved[k]           # a flag left to be chosen when the model loads (--sft_lr) keeps the run's choice
    by_content = {"data_fingerprint"} | ({"data"} if saved.get("data_fingerprint") and given.get("data_fingerprint") else set())
    fixed = [k for k in given if k not in MAY_CHANGE | by_content | {"stage"} and k in saved and not _same(saved[k], given[k])]
    problems = [", ".join(f"--{k} is {given[k]!r} (checkpoint: {saved[k]!r})" for k in fixed)] if fixed else []
    if "data" in by_content and saved["data_fingerprint"] != given["data_fingerprint"]:
        problems.append(f"--data {given['data']} ({_short(given['data_fingerprint'])}) is not the file the run trained on, "
                        f"{saved['data']} ({_short(saved['data_fingerprint'])})")
    ranks = len(state["rng"])
    for flags in [GLOBAL_BATCH[s] for s in ("sft", "rl") if s == stage or (s == "rl" and args.stage == "both")]:
        before, now = ranks * math.prod(saved.get(f, 1) for f in flags), world * math.prod(given[f] for f in flags)
        if before != now:
            problems.append(f"it must keep the global batch ({' × '.join(flags)} × ranks): the checkpoint's is {before} "
                            f"on {ranks} rank(s), this run's {now} on {world}")
    length = "sft_steps" if stage == "sft" else "max_steps"
    if given[length] < step:
        problems.append(f"--{length} {given[length]} is below the checkpoint's step {step}: give at least {step}")
    if problems:                      # every flag to change, in one line
        raise SystemExit("error: --resume continues a run as it was started, but " + "; ".join(problems) +
                         ". Use another --out_dir, or --overwrite to start afresh" * bool(fixed or "data" in by_content))
    return [f"--resume: --{k} {saved[k]!r} -> {given[k]!r}" for k in sorted(MAY_CHANGE | {"stage"} | by_content - {"data_fingerprint"})
            if k in saved and k in given and k not in ("resume", "overwrite") and not _same(saved[k], given[k])]


def resume_command(argv):
    """The command that continues this run, to paste back as it is: its arguments (quoted where needed) with
    --resume in place of --overwrite; under torchrun a torchrun command with as many processes per node."""
    drop = lambda a: len(a) > 3 and ("--resume".startswith(a) or "--overwrite".startswith(a))   # noqa: E731 (prefixes)
    script = sys.argv[0] if os.path.basename(sys.argv[0]) == "train.py" else os.path.relpath(
        os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train.py"))
    launcher = ["python"]
    if "LOCAL_WORLD_SIZE" in os.environ:          # started by torchrun
        nodes = int(os.environ["WORLD_SIZE"]) // int(os.environ["LOCAL_WORLD_SIZE"])
        launcher = ["torchrun", *(["--nnodes", str(nodes)] if nodes > 1 else []),
                    "--nproc_per_node", os.environ["LOCAL_WORLD_SIZE"]]
    return shlex.join([*launcher, script, *[a for a in argv if not drop(a)], "--resume"])


def record_inputs(args):
    """Resolve the paths a run reads (--data, --image_root, a local --model) to absolute ones and add the data file's
    fingerprint (args.data_fingerprint: its size and sha256), so that the config a checkpoint saves names what the
    run read, and a --resume from another folder, or on a file changed since, is refused."""
    for k in ("data", "image_root", "model"):
        value = getattr(args, k)
        if value and (k != "data" or value != "toy") and (k != "model" or (value not in TINY_MODELS and os.path.isdir(value))):
            setattr(args, k, os.path.abspath(os.path.expanduser(value)))
    args.data_fingerprint = fingerprint(args.data) if args.data != "toy" else None


def fingerprint(path):
    """"<size> bytes, sha256 <hex>" of a file, read in 1 MiB blocks (300 MB: 0.45 s on a 2-core CPU, file cached)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return f"{os.path.getsize(path)} bytes, sha256 {digest.hexdigest()}"


def _short(fingerprint):
    return fingerprint[:fingerprint.index("sha256 ") + 19] + "…"


def why(error, directory):
    """Why a write into `directory` failed, in words: "no space left on device" when that is the cause (torch's zip
    writer and safetensors do not say so: then the disk is found full), else the error's first line."""
    full = getattr(error, "errno", None) == errno.ENOSPC or "No space left" in str(error)
    with contextlib.suppress(OSError):
        full = full or shutil.disk_usage(directory).free < 1 << 20
    return "no space left on device" if full else (str(error).splitlines() or [type(error).__name__])[0]


_held = {}   # out_dir lock files held by this process (a run set up twice in one process takes its lock once)


def claim(out_dir, master, distributed):
    """Check out_dir is writable and hold an exclusive lock on it (out_dir/run.lock) until this process ends:
    a second run into the same folder stops with one line. Only rank 0 locks; every rank gets its verdict."""
    error = None
    path = os.path.realpath(os.path.join(out_dir, "run.lock"))
    if master and path not in _held:
        try:
            os.makedirs(os.path.join(out_dir, "checkpoint"), exist_ok=True)
            f = open(path, "a+")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                error = (f"error: another run (pid {f.read().strip() or '?'}) is writing to {out_dir}: "
                         "wait for it to end, or use another --out_dir")
            else:
                f.truncate(0)
                f.write(str(os.getpid()))
                f.flush()
                os.fsync(f.fileno())   # a full disk fails here, before the model is loaded
                _held[path] = f
        except OSError as e:
            error = f"error: cannot write to --out_dir {out_dir}: {e.strerror or e}"
    _agree(error, master, distributed)


def _agree(error, master, distributed):
    """Rank 0's verdict to every rank: all stop (rank 0 says why) or all go on."""
    if distributed:
        box = [error]
        dist.broadcast_object_list(box, 0)
        error = box[0]
    if error:
        raise SystemExit(error if master else 1)


def save(path, stage, step, policy, optimizer, scheduler, extra, fsdp, distributed, master):
    rng = {"torch": torch.get_rng_state(), "python": random.getstate(),
           "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    all_rng = [rng]
    if distributed:
        all_rng = [None] * dist.get_world_size()
        dist.all_gather_object(all_rng, rng)
    model_state, optimizer_state = parallel.full_state(policy, optimizer, fsdp)
    model_state = {k: v for k, v in model_state.items() if k in trained(policy)}   # frozen: the starting model's
    error = None
    if master and not all(torch.isfinite(v).all() for v in model_state.values()):
        error = (f"error: the weights at {stage} step {step} hold NaN or infinite values: not saved; {last_good(path)}")
    elif master:
        state = dict(stage=stage, step=step, model=model_state, optimizer=optimizer_state,
                     scheduler=scheduler.state_dict(), rng=all_rng, **extra)
        try:
            torch.save(state, path + ".tmp")
            os.replace(path + ".tmp", path)
        except (OSError, RuntimeError) as e:    # disk full: OSError, or RuntimeError from torch's zip writer
            reason = why(e, os.path.dirname(path))
            with contextlib.suppress(OSError):
                os.remove(path + ".tmp")
            error = (f"error: cannot save the {stage} checkpoint of step {step} ({reason}); "
                     f"{last_good(path)}: free space, then continue with --resume")
    _agree(error, master, distributed)


def stage_of(path):
    """The stage of the checkpoint at `path`, or None; ValueError if it is damaged."""
    state = read(path)
    return state and state["stage"]


def load(path, stage, policy, optimizer, scheduler, fsdp, rank, world):
    """Restore a checkpoint of `stage` into policy, optimizer, scheduler and this rank's RNG.
    Returns the checkpoint dict (its "step" is where to continue), or None if there is none.

    On another number of ranks the weights, optimizer and data position carry over unchanged (every
    prompt is sampled from its own seed); only the global RNG streams, saved per rank, cannot, and
    are seeded afresh from the step."""
    state = read(path)   # mmap: pages shared by ranks
    if state is None or state["stage"] != stage:
        return None
    if set(state["model"]) != trained(policy):
        raise SystemExit(f"error: {path} trained other parameters (--lora_rank, --lora_targets or --freeze_vision differ)")
    try:
        parallel.load_full_state(policy, optimizer, state["model"], state["optimizer"], fsdp)
    except (RuntimeError, KeyError, ValueError) as e:
        raise SystemExit(f"error: checkpoint {path} does not fit this model ({str(e).splitlines()[0]})")
    scheduler.load_state_dict(state["scheduler"])
    if len(state["rng"]) == world:
        rng = state["rng"][rank]
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    else:
        torch.manual_seed(state["step"] * 1000 + rank)
        random.seed(state["step"] * 1000 + rank)
    return state


def restore(run, stage, optimizer, scheduler):
    """With --resume, continue a checkpoint of `stage`: its weights into the policy (and the sampler's copy),
    the logs cut back to its step. Returns the step to continue from (0 if not resuming this stage)."""
    state = load(run.ckpt_path, stage, run.policy, optimizer, scheduler, run.args.fsdp, run.rank,
                 run.world) if run.args.resume else None
    if state is None:
        return 0
    if run.master:   # the saved counts are every rank's: rank 0 carries them on, the others count afresh
        run.skipped.update({k: v for k, v in state["skipped"].items() if isinstance(v, int) and k != "bad_image"})
        run.bad_images.update(state.get("bad_images", ()))
    if run.sampler is not run.policy:
        sampling_copy.refresh_inference_copy(run.sampler, run.policy)
    if run.master:
        for name in ("metrics.jsonl", "rollouts.jsonl"):
            if torn := trim_log(os.path.join(run.args.out_dir, name), stage, state["step"]):
                run.log.print(f"{name}: dropped {torn} unreadable line(s) (a write cut short)")
    run.log.print(f"resumed {stage} at step {state['step']} of a run on {len(state['rng'])} rank(s)")
    return state["step"]


def trim_log(path, stage, step):
    """Drop log lines written after the checkpoint: the resumed run writes those steps again. Lines that are not
    a JSON row (the last one, cut short by a kill) are dropped too; returns how many."""
    if not os.path.exists(path):
        return 0
    order = {"sft": 0, "eval_sft": 0, "rl": 1, "eval": 1}
    rows, torn = [], 0
    for line in open(path, encoding="utf-8"):
        try:
            row = json.loads(line)
            rows.append((row, (order[row.get("stage", "rl")], row["step"])))   # rollouts.jsonl rows are RL rows
        except (ValueError, KeyError, TypeError, AttributeError):
            torn += bool(line.strip())
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r, key in rows if key <= (order[stage], step))
    return torn


def trained(policy):
    """Names of the parameters that train (tied ones under every name): a checkpoint holds only these."""
    return {n for n, q in policy.named_parameters(remove_duplicate=False) if q.requires_grad}


def save_pretrained(directory, policy, tokenizer, image_processor, fsdp, distributed, master):
    """Hugging Face format (model, tokenizer, image processor): plain transformers loads it back. With LoRA the
    model is the merged one, and directory/adapter holds the adapters for peft. Written whole or not at all: into
    directory.partial, renamed to directory at the end (a failed write removes it and leaves what was there)."""
    state, error = parallel.full_state(policy, None, fsdp)[0] if not lora.layers(policy) else None, None
    weights = state.values() if state is not None else [q.detach() for q in policy.parameters() if q.requires_grad]
    if master and not all(torch.isfinite(v).all() for v in weights):
        error = f"error: the weights hold NaN or infinite values: {directory} not written"
    elif master:
        partial = directory.rstrip("/") + ".partial"
        try:
            shutil.rmtree(partial, ignore_errors=True)
            for part in (tokenizer, image_processor):
                part.save_pretrained(partial)
            if state is None:
                lora.save(partial, policy)
            else:
                policy.save_pretrained(partial, state_dict=state)
            _swap(partial, directory)
        except (OSError, RuntimeError, SafetensorError) as e:
            reason = why(e, os.path.dirname(os.path.abspath(directory)))
            shutil.rmtree(partial, ignore_errors=True)
            ckpt = os.path.join(os.path.dirname(directory), "checkpoint", "ckpt.pt")
            error = (f"error: cannot write {directory} ({reason}); {last_good(ckpt)}: free space, "
                     "then run again with --resume to write it")
    _agree(error, master, distributed)


def _swap(new, directory):
    """Put the folder `new` in place of `directory` (if there is one, it is removed only once `new` is in place)."""
    if os.path.exists(directory):
        old = directory.rstrip("/") + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(directory, old)
        os.replace(new, directory)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, directory)


DIVERGED = 5   # updates skipped in a row (non-finite loss or gradient norm) that stop a run: it has diverged


def stop_if_diverged(run, stage, step):
    """DIVERGED updates skipped in a row: the run has diverged; stop with one line (no later step would update)."""
    if run.skipped_in_a_row < DIVERGED:
        return
    lr = "--sft_lr" if stage == "sft" else "--lr"
    raise SystemExit(f"error: the {stage} stage diverged: the updates of steps {step + 2 - DIVERGED}-{step + 1} had a "
                     f"non-finite loss or gradient norm with {lr} {getattr(run.args, lr[2:])}; "
                     f"{last_good(run.ckpt_path)}: lower {lr} and start afresh (--overwrite)"
                     if run.master else 1)

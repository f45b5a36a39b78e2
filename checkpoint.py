"""checkpoint.py: save and restore training state so that `--resume` continues exactly.

A checkpoint is one file, `out_dir/checkpoint/ckpt.pt`: weights, optimizer, scheduler, stage and
step, the RNG state of every rank, skip counters and the config. The data position needs no
entry: it is a function of the step (data.batch_at). It is written to a temporary file and
renamed, so a run killed mid-write keeps the previous checkpoint. Under FSDP the shards are
gathered into whole tensors first, so a checkpoint does not depend on the number of ranks.
"""
import json
import os
import random

import torch
import torch.distributed as dist

import parallel


def save(path, stage, step, policy, optimizer, scheduler, extra, fsdp, distributed, master):
    rng = {"torch": torch.get_rng_state(), "python": random.getstate(),
           "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    all_rng = [rng]
    if distributed:
        all_rng = [None] * dist.get_world_size()
        dist.all_gather_object(all_rng, rng)
    model_state, optimizer_state = parallel.full_state(policy, optimizer, fsdp)
    if master:
        state = dict(stage=stage, step=step, model=model_state, optimizer=optimizer_state,
                     scheduler=scheduler.state_dict(), rng=all_rng, **extra)
        torch.save(state, path + ".tmp")
        os.replace(path + ".tmp", path)
    if distributed:
        dist.barrier()


def stage_of(path):
    """The stage of the checkpoint at `path`, or None; mmap, so the weights are not read."""
    if not os.path.exists(path):
        return None
    return torch.load(path, map_location="cpu", weights_only=False, mmap=True)["stage"]


def load(path, stage, policy, optimizer, scheduler, fsdp, rank):
    """Restore a checkpoint of `stage` into policy, optimizer, scheduler and this rank's RNG.
    Returns the checkpoint dict (its "step" is where to continue), or None if there is none."""
    if stage_of(path) != stage:
        return None
    state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)   # pages shared by ranks
    parallel.load_full_state(policy, optimizer, state["model"], state["optimizer"], fsdp)
    scheduler.load_state_dict(state["scheduler"])
    rng = state["rng"][rank]
    torch.set_rng_state(rng["torch"]), random.setstate(rng["python"])
    if rng["cuda"] is not None:
        torch.cuda.set_rng_state(rng["cuda"])
    return state


def trim_log(path, stage, step):
    """Drop log lines written after the checkpoint: the resumed run writes those steps again."""
    if not os.path.exists(path):
        return
    order = {"sft": 0, "rl": 1, "eval": 1}
    rows = [json.loads(line) for line in open(path)]
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows if (order[r["stage"]], r["step"]) <= (order[stage], step))


def save_pretrained(directory, policy, tokenizer, image_processor, fsdp, distributed, master):
    """Hugging Face format (model, tokenizer, image processor): plain transformers loads it back."""
    state, _ = parallel.full_state(policy, None, fsdp)
    if master:
        for part in (tokenizer, image_processor):
            part.save_pretrained(directory)
        policy.save_pretrained(directory, state_dict=state)
    if distributed:
        dist.barrier()

"""training/checkpoint.py: save and restore training state so that `--resume` continues exactly.

A checkpoint is one file, `out_dir/checkpoint/ckpt.pt`: weights, optimizer, scheduler, stage and
step, the RNG state of every rank, skip counters and the config. The data position needs no
entry: it is a function of the step (data.batch_at). It is written to a temporary file and
renamed, so a run killed mid-write keeps the previous checkpoint. Under FSDP the shards are
gathered into whole tensors first, so a checkpoint does not depend on the number of ranks: a run
may continue on more or fewer.
"""
import json
import os
import random

import torch
import torch.distributed as dist

import model
from training import lora, parallel


def save(path, stage, step, policy, optimizer, scheduler, extra, fsdp, distributed, master):
    rng = {"torch": torch.get_rng_state(), "python": random.getstate(),
           "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    all_rng = [rng]
    if distributed:
        all_rng = [None] * dist.get_world_size()
        dist.all_gather_object(all_rng, rng)
    model_state, optimizer_state = parallel.full_state(policy, optimizer, fsdp)
    model_state = {k: v for k, v in model_state.items() if k in trained(policy)}   # frozen: the starting model's
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


def load(path, stage, policy, optimizer, scheduler, fsdp, rank, world):
    """Restore a checkpoint of `stage` into policy, optimizer, scheduler and this rank's RNG.
    Returns the checkpoint dict (its "step" is where to continue), or None if there is none.

    On another number of ranks the weights, optimizer and data position carry over unchanged (every
    prompt is sampled from its own seed); only the global RNG streams, saved per rank, cannot, and
    are seeded afresh from the step."""
    if stage_of(path) != stage:
        return None
    state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)   # pages shared by ranks
    if set(state["model"]) != trained(policy):
        raise SystemExit(f"error: {path} trained other parameters (--lora_rank, --lora_targets or --freeze_vision differ)")
    parallel.load_full_state(policy, optimizer, state["model"], state["optimizer"], fsdp)
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
    run.skipped.update(state["skipped"])
    if run.sampler is not run.policy:
        model.refresh_inference_copy(run.sampler, run.policy)
    if run.master:
        for name in ("metrics.jsonl", "rollouts.jsonl"):
            trim_log(os.path.join(run.args.out_dir, name), stage, state["step"])
    run.log.print(f"resumed {stage} at step {state['step']} of a run on {len(state['rng'])} rank(s)")
    return state["step"]


def trim_log(path, stage, step):
    """Drop log lines written after the checkpoint: the resumed run writes those steps again."""
    if not os.path.exists(path):
        return
    order = {"sft": 0, "eval_sft": 0, "rl": 1, "eval": 1}
    rows = [json.loads(line) for line in open(path)]
    key = lambda r: (order[r.get("stage", "rl")], r["step"])   # rollouts.jsonl rows are RL rows  # noqa: E731
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows if key(r) <= (order[stage], step))


def trained(policy):
    """Names of the parameters that train (tied ones under every name): a checkpoint holds only these."""
    return {n for n, q in policy.named_parameters(remove_duplicate=False) if q.requires_grad}


def save_pretrained(directory, policy, tokenizer, image_processor, fsdp, distributed, master):
    """Hugging Face format (model, tokenizer, image processor): plain transformers loads it back. With LoRA the
    model is the merged one, and directory/adapter holds the adapters for peft."""
    state, _ = parallel.full_state(policy, None, fsdp) if not lora.layers(policy) else (None, None)
    if master:
        for part in (tokenizer, image_processor):
            part.save_pretrained(directory)
        if state is None:
            lora.save(directory, policy)
        else:
            policy.save_pretrained(directory, state_dict=state)
    if distributed:
        dist.barrier()

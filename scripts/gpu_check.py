"""scripts/gpu_check.py: the acceptance check of a GPU, one command, a few minutes, one process.

    python -m scripts.gpu_check                  # the Qwen2-VL-2B architecture, random weights, on the CUDA device

Runs what a training run on this device will run and prints one line per check with its figure, its target
and a verdict, then one JSON line; both are written to OUT_DIR/gpu_check.txt and gpu_check.json:
  decode      ms per decode step, eager and compiled (CUDA graphs), against the floor the device's measured
              copy bandwidth sets (the bytes one step must read: text weights, the fp32 LM head, the KV cache)
  rl step     train.py's RL step on the paper's workload (16 rows x 1,024 tokens), phase by phase, compiled
  memory      that step's peak against `bench.py --memory`'s counted figure for the same configuration
  kl at 0     the KL to the reference at the first step: exactly 0 (the reference computes the same bits)
  mismatch    sampling vs scoring log-probs of the same tokens (bf16 sampling copy vs the fp32 policy)
  lora        one LoRA step (--lora_rank 64): runs, its sampler agrees with its scorer
  fsdp        one --fsdp step on one rank (FSDP2 over a one-process group): runs, KL exactly 0
Without a GPU (tests) it runs the tiny model and the small workload: the mechanics, with no speed or memory
verdict. Run it with STEPGRPO_CUDA_STANDIN=1 there to take the CUDA configuration (bf16, compiled decoding).
A failing check exits 1.
"""
import argparse
import gc
import json
import math
import os
import socket

import torch

import bench
import model as M
from training import memory

MISMATCH_MEAN = 0.05     # mean |log p_sampler - log p_scorer| per token; bf16 measured 0.016 (GPU-FACTS-style figure)
DECODE_FLOOR_X = 4.0     # compiled decode step within this multiple of the bandwidth floor
MEMORY_SLACK = 1.05      # measured peak within 5 % of the counted one


def decode_floor_ms(run, rows, slots, bandwidth):
    """The bandwidth floor of one decode step: the bytes it must read (bench.decode_step_bytes) over the measured
    copy bandwidth."""
    return 1000 * bench.decode_step_bytes(run.sampler, rows, slots) / bandwidth


def free(run):
    """Drop a Run's models before the next one is built (one 2B run at a time fits the device)."""
    for name in ("policy", "sampler", "reference"):
        setattr(run, name, None)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def first_step_figures(results):
    """(KL at the first step, max over its micro-batches; mean sampling-vs-scoring |Δ log p|)."""
    micro = results[0]["micro"]
    return max(m["kl"] for m in micro), sum(m["logp_diff_mean"] * m["rows"] for m in micro) / sum(m["rows"] for m in micro)


def verdict(ok, measured=True):
    return "n/a" if not measured else "PASS" if ok else "FAIL"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="'qwen2-vl-2b' (random weights), 'tiny' or a model directory "
                   "(default: qwen2-vl-2b on CUDA, else tiny)")
    p.add_argument("--workload", default=None, choices=sorted(bench.WORKLOADS),
                   help="bench.py's workloads (default: paper on CUDA, else small)")
    p.add_argument("--out_dir", default="out/gpu_check", help="the runs' folders, the random 2B and the report")
    return p.parse_args(argv)


def main(argv=None):
    return check(parse_args(argv))


def check(args):
    cuda = torch.cuda.is_available()
    compiled = M.cuda_config("cuda" if cuda else "cpu")
    model = args.model or ("qwen2-vl-2b" if cuda else "tiny")
    workload = args.workload or ("paper" if cuda else "small")
    path = bench.random_2b(args.out_dir) if model == "qwen2-vl-2b" else model
    lines, out = [], dict(model=model, workload=workload, device=torch.cuda.get_device_name() if cuda else "CPU")

    def row(name, figure, target, result):
        lines.append(f"{name:<10}{figure:<64}{target:<32}{result}")
        print(lines[-1], flush=True)
        out.setdefault("verdicts", {})[name] = result
    print(f"gpu check: {model}, workload {workload}, {out['device']}")
    print(f"{'check':<10}{'measured':<64}{'target':<32}verdict")

    # the paper's step, compiled where the configuration compiles; decoding on its sampler
    run = bench.make_run(path, workload, os.path.join(args.out_dir, "step"), 2, ["--compile"] if compiled else [])
    rows, slots = (16, 2048) if workload == "paper" else (4, 320)
    speed = bench.compile_vs_eager(run, rows, slots) if compiled else None
    if speed:
        floor = decode_floor_ms(run, rows, slots, bench.memory_bandwidth(run.device)) if cuda else None
        out["decode"] = dict(speed, floor_ms=floor and round(floor, 3))
        figure = f"eager {speed['eager_ms_per_step']:.2f} ms, compiled {speed['compiled_ms_per_step']:.2f} ms" + \
            (f", floor {floor:.2f} ms" if floor else "")
        row("decode", figure, f"compiled <= {DECODE_FLOOR_X:g}x floor",
            verdict(floor and speed["compiled_ms_per_step"] <= DECODE_FLOOR_X * floor, cuda))
    else:
        row("decode", "eager only (not the CUDA configuration)", "", "n/a")
    med, batch, results = bench.time_steps(run, 1)
    tokens = batch.rollout.completion_ids.shape[1]
    out["rl_step"] = {k: round(v, 4) for k, v in med.items()}
    phases = ", ".join(f"{k} {med[k]:.2f}" for k in ("generate", "reward", "reference", "update"))
    per_token = 1000 * med["generate"] / tokens       # prefill, sampling and the stop checks included
    row("rl step", f"{med['step']:.2f} s: {phases}", "generate <= 2x compiled steps",
        verdict(bool(speed) and per_token <= 2 * speed["compiled_ms_per_step"], cuda and bool(speed)))
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2 ** 30
        counted = memory.account("Qwen2-VL-2B")["peak"] / 2 ** 30 if model == "qwen2-vl-2b" else None
        out["memory"] = dict(peak_gib=round(peak, 2), counted_gib=counted and round(counted, 2))
        row("memory", f"peak {peak:.2f} GiB, counted {counted:.2f} GiB" if counted else f"peak {peak:.2f} GiB",
            f"peak <= counted x {MEMORY_SLACK}", verdict(counted and peak <= MEMORY_SLACK * counted, bool(counted)))
    else:
        row("memory", "no CUDA device", "", "n/a")
    kl, mismatch = first_step_figures(results)
    out.update(kl_step0=kl, logp_diff_mean=mismatch)
    row("kl at 0", f"{kl:.3g}", "exactly 0", verdict(kl == 0))
    row("mismatch", f"mean |dlogp| {mismatch:.4f}", f"<= {MISMATCH_MEAN}", verdict(mismatch <= MISMATCH_MEAN))
    free(run)

    run = bench.make_run(path, workload, os.path.join(args.out_dir, "lora"), 1, ["--lora_rank", "64" if cuda else "8"])
    _, _, results = bench.time_steps(run, 0)
    kl, mismatch = first_step_figures(results)
    out["lora"] = dict(loss=results[0]["loss"], kl_step0=kl, logp_diff_mean=mismatch)
    row("lora", f"loss {results[0]['loss']:.4g}, kl {kl:.3g}, mean |dlogp| {mismatch:.4f}",
        f"finite, kl 0, <= {MISMATCH_MEAN}", verdict(math.isfinite(results[0]["loss"]) and kl == 0 and mismatch <= MISMATCH_MEAN))
    free(run)

    # one rank of torchrun, by its environment: parallel.setup starts the process group (NCCL on CUDA)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    run = bench.make_run(path, workload, os.path.join(args.out_dir, "fsdp"), 1, ["--fsdp"])
    _, _, results = bench.time_steps(run, 0)
    kl, _ = first_step_figures(results)
    out["fsdp"] = dict(loss=results[0]["loss"], kl_step0=kl)
    row("fsdp", f"loss {results[0]['loss']:.4g}, kl {kl:.3g}", "finite, kl exactly 0",
        verdict(math.isfinite(results[0]["loss"]) and kl == 0))
    free(run)

    failed = [k for k, v in out["verdicts"].items() if v == "FAIL"]
    out["passed"] = not failed
    summary = f"{'all checks passed' if not failed else 'FAILED: ' + ', '.join(failed)}"
    print(summary)
    print(json.dumps(out))
    with open(os.path.join(args.out_dir, "gpu_check.txt"), "w") as f:
        f.write("\n".join(lines + [summary]) + "\n")
    with open(os.path.join(args.out_dir, "gpu_check.json"), "w") as f:
        f.write(json.dumps(out) + "\n")
    if failed:
        raise SystemExit(1)
    return out


if __name__ == "__main__":
    main()

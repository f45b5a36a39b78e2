"""The CUDA configuration, run on the CPU. STEPGRPO_CUDA_STANDIN=1 (model.cuda_config) gives a CPU run what a GPU
run gets: bf16 autocast and a bf16 sampling copy, the compiled decode step (inductor; CUDA graphs need a GPU),
AdamW's fused step, and, under torchrun, the same collectives. NCCL serves only tensors on the run's device;
on a CPU every tensor is on the host, so the collectives are checked with the host made the wrong place to be:
under `torch.device("meta")` a tensor made without naming its device is a meta tensor, and a group that serves
only the run's device (NCCL's device map, here over gloo) refuses it as NCCL refuses a host tensor. Every GPU command of README.md and docs/ runs here, on the tiny model, to its last line."""
import concurrent.futures
import glob
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile

import pytest
import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STANDIN = {**os.environ, "STEPGRPO_CUDA_STANDIN": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


# ----------------------------------------------------------------------------- collectives on the run's device
@pytest.fixture
def one_rank_group(tmp_path, monkeypatch):
    """A one-process gloo group in this process whose tensor collective serves only the run's device (the CPU), as
    NCCL serves only CUDA tensors: anything else raises NCCL's error."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    real = dist.all_reduce

    def all_reduce(tensor, *args, **kw):
        if tensor.device != torch.device("cpu"):
            raise RuntimeError(f"No backend type associated with device type {tensor.device.type}")
        return real(tensor, *args, **kw)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    yield
    dist.destroy_process_group()


def test_every_collective_helper_makes_its_tensor_on_the_run_device(one_rank_group):
    """lockstep once reduced a tensor made without a device: a host tensor, which NCCL refuses ("No backend type
    associated with device type cpu"), so every --fsdp RL step died on a GPU. Here such a tensor is a meta tensor,
    which gloo refuses the same way."""
    from training import flags, parallel
    cpu = torch.device("cpu")
    run = type("Run", (), dict(device=cpu, ddp=True, args=None, skipped={}, bad_images=set()))()
    with torch.device("meta"):
        assert parallel.lockstep([[0, 1], [2]], True, True, cpu) == [([0, 1], 1.0), ([2], 1.0)]
        assert parallel.all_reduce([[1, 2], [3, 4]], cpu, True).tolist() == [[1, 2], [3, 4]]
        assert parallel.all_reduce(5, cpu, True, "max").item() == 5
        assert parallel.global_means({"a": [1.0, 3.0], "b": []}, cpu, True)["a"] == 2.0
        assert parallel.global_max({"a": [1.0, 3.0]}, cpu, True) == {"a": 3.0}
        flags.require_kept(run, True)
        with pytest.raises(RuntimeError, match="device type meta"):   # the check itself: a tensor made without
            dist.all_reduce(torch.tensor(1.0))                         # naming its device is refused


def test_tensor_collectives_live_in_training_parallel_only():
    """So that the test above sees every one of them (object collectives pick their own device)."""
    tensor_collectives = re.compile(r"\bdist\.(all_reduce|all_gather|all_gather_into_tensor|broadcast|reduce|"
                                    r"reduce_scatter|reduce_scatter_tensor|all_to_all|send|recv)\(")
    sources = [p for p in glob.glob(os.path.join(ROOT, "**", "*.py"), recursive=True)
               if "/tests/" not in p and "/.venv" not in p]
    found = [os.path.relpath(p, ROOT) for p in sources if tensor_collectives.search(open(p).read())]
    assert found == ["training/parallel.py"]


# ----------------------------------------------------------------------------- the documented GPU commands
def documented_commands():
    """(file, command) for every command line in README.md and docs/*.md: continuation lines joined, comments cut,
    a shell variable a block sets (R="torchrun ... train.py ...") expanded where a line starts with it ($R ...)."""
    for path in ["README.md", *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]:
        command, variables = "", {}
        for line in open(os.path.join(ROOT, path)).read().splitlines():
            text = line.strip()
            if m := re.fullmatch(r'([A-Z_]+)="([^"]*)"', text):
                variables[m[1]] = m[2]
                continue
            if m := re.match(r"\$([A-Z_]+)\s", text):
                text = variables.get(m[1], m[0]) + text[len(m[0]) - 1:]
            if command:
                command += " " + text
            elif re.match(r"(python \S+\.py|python -m |torchrun )", text):
                command = text
            else:
                continue
            if command.endswith("\\"):
                command = command[:-1].rstrip()
                continue
            yield os.path.basename(path), re.split(r"\s#\s", command)[0].strip()
            command = ""


def needs_gpu(command):
    """Commands a user runs on a GPU: torchrun, a real model (a hub id, a trained folder, the random 2B), --compile."""
    words = shlex.split(command)
    if "scripts.gpu_check" in words:
        return True
    if not any(w in ("train.py", "evaluate.py", "bench.py") for w in words[:6]):
        return False
    if any(w in words for w in ("--help", "--memory", "--predictions")):
        return False
    model = words[words.index("--model") + 1] if "--model" in words else "tiny"
    return words[0] == "torchrun" or "--compile" in words or not model.startswith("tiny")


DROP_WITH_VALUE = {"--model", "--data", "--image_root", "--eval_bench", "--eval_data", "--eval_limit", "--eval_every",
                   "--out_dir", "--out", "--workload", "--nproc_per_node", "--bench", "--limit"}
SHORT = {"train.py": ["--sft_steps", "1", "--max_steps", "1", "--sft_batch", "4", "--prompts_per_step", "2",
                      "--grad_accum", "1", "--max_new_tokens", "24", "--eval_n", "0", "--overwrite"],
         "bench.py": ["--steps", "1"],
         "scripts.gpu_check": [],
         "evaluate.py": ["--bench", "toy", "--limit", "2", "--max_new_tokens", "16"]}


def on_tiny(command, out):
    """The command on the tiny model and the toy task, a few steps long: the same script, launcher and switches
    (FSDP, LoRA, checkpointing, compile, stage), every file and size argument replaced."""
    words = [w for w in shlex.split(command) if w != "..."]
    script = next(w for w in words if w.endswith(".py") or w == "scripts.gpu_check")
    launcher = [sys.executable]
    if words[0] == "torchrun":   # FSDP on two ranks (lockstep, sharded steps); otherwise one torchrun rank
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2" if "--fsdp" in words else "1"]
    rest, kept = words[words.index(script) + 1:], []
    for i, w in enumerate(rest):
        if w in DROP_WITH_VALUE or (i and rest[i - 1] in DROP_WITH_VALUE and not w.startswith("--")):
            continue
        if w == "--drop_reflective":
            continue
        kept.append(w)
        if w == "--decode_table" and (i + 1 == len(rest) or rest[i + 1].startswith("--")):
            kept.append("1:8,16")
    short = SHORT[script]
    if "--eval_every" in words:          # held-out evaluation during training: on the toy task, at every step
        short = [*short[:short.index("--eval_n")], "--eval_n", "2", "--eval_every", "1", "--overwrite"]
    where = ["--out", os.path.join(out, "eval.jsonl")] if script == "evaluate.py" else ["--out_dir", out]
    path = ["-m", script] if script == "scripts.gpu_check" else [os.path.join(ROOT, script)]
    return launcher + [*path, "--model", "tiny", *kept, *short, *where]


GPU_COMMANDS = sorted({(f, c) for f, c in documented_commands() if needs_gpu(c)})


def test_the_documents_name_the_gpu_commands_this_file_runs():
    names = {w for _, c in GPU_COMMANDS for w in shlex.split(c) if w.endswith(".py")}
    assert {"train.py", "evaluate.py", "bench.py"} <= names
    assert any("--fsdp" in c for _, c in GPU_COMMANDS) and any("--compile" in c for _, c in GPU_COMMANDS)
    assert any("scripts.gpu_check" in c for _, c in GPU_COMMANDS)


def test_every_documented_gpu_command_runs_in_the_cuda_configuration():
    """Each command of README.md and docs/ meant for a GPU, on the tiny model under the stand-in, to its last line
    (the JSON summary); two at a time. One failure names its document and command."""
    unique = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (doc, command) in enumerate(GPU_COMMANDS):
            argv = on_tiny(command, os.path.join(tmp, str(i)))
            # one run per script and switches; torchrun with one rank stands for plain python too (it adds the process group)
            key = (argv[argv.index("--model") - 1], tuple(sorted(argv[argv.index("--model"):-1])))
            if key not in unique or "torch.distributed.run" in argv:
                unique[key] = (doc, command, argv)

        def run(job):
            doc, command, argv = job
            res = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, env=STANDIN, timeout=400)
            return doc, command, argv, res
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            for doc, command, argv, res in pool.map(run, unique.values()):
                where = f"{doc}: {command}\n  ran as: {shlex.join(argv)}"
                assert res.returncode == 0, f"{where}\n{res.stderr[-2500:]}"
                last = res.stdout.strip().splitlines()[-1]
                assert isinstance(json.loads(last), dict), f"{where}\n  last line: {last}"
                assert json.loads(last).get("passed", True), f"{where}\n{res.stdout[-2500:]}"   # scripts.gpu_check

"""What a run does when something goes wrong: it diverges, is stopped (--stop_after, SIGTERM, Ctrl-C), the disk fills,
or a resume is given other data. Each ends in one line, and the last good checkpoint and final/ stay whole."""
import errno
import json
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import train as T
from training import checkpoint, logs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_RL = ["--model", "tiny", "--stage", "rl", "--data", "toy", "--prompts_per_step", "1", "--grad_accum", "1",
           "--num_generations", "2", "--max_new_tokens", "4", "--micro_batch", "2", "--eval_n", "0"]
TINY_SFT = ["--model", "tiny", "--stage", "sft", "--data", "toy", "--sft_batch", "2", "--eval_n", "0"]


def steps(out, stage="rl"):
    return [r["step"] for r in map(json.loads, open(os.path.join(out, "metrics.jsonl"))) if r["stage"] == stage]


def finite(tensors):
    return all(torch.isfinite(v).all() for v in tensors.values())


def error_of(argv):
    with pytest.raises(SystemExit) as err:
        T.main(argv)
    assert "\n" not in str(err.value).strip()
    return str(err.value)


# ---------------------------------------------------------------------------- a diverging run
def test_a_diverging_warmup_skips_nan_gradients_and_stops_naming_the_lr_and_the_last_good_checkpoint(tmp_path):
    """--sft_lr 100 on the tiny model: step 2's loss is finite but its gradient norm is NaN, and so is every later one."""
    out = tmp_path / "run"
    message = error_of(["--out_dir", str(out), *TINY_SFT, "--sft_steps", "20", "--sft_lr", "100", "--save_every", "1"])
    ckpt = out / "checkpoint" / "ckpt.pt"
    assert message == (f"error: the sft stage diverged: the updates of steps 2-{1 + checkpoint.DIVERGED} had a non-finite loss or "
                       f"gradient norm with --sft_lr 100.0; the last good checkpoint (sft, step 1) is {ckpt}: lower "
                       "--sft_lr and start afresh (--overwrite)")
    state = checkpoint.read(str(ckpt))
    assert state["step"] == 1 and finite(state["model"]) and not (out / "final").exists()


def test_an_rl_update_with_a_nan_gradient_norm_is_skipped_and_the_run_stops_after_several(tmp_path, monkeypatch):
    from training import parallel
    real = parallel.clip_gradients
    monkeypatch.setattr(parallel, "clip_gradients", lambda params, most: real(params, most) * float("nan"))
    run = T.setup(T.parse_args(["--out_dir", str(tmp_path), *TINY_RL, "--max_steps", "20", "--lr", "1e-2"]))
    run.reference = T.load_reference(run)
    start = {n: q.detach().clone() for n, q in run.policy.named_parameters()}
    with pytest.raises(SystemExit, match=rf"rl stage diverged: the updates of steps 1-{checkpoint.DIVERGED} .* --lr 0.01; no "
                                         "checkpoint was saved"):
        T.rl(run)
    assert all(torch.equal(start[n], q) for n, q in run.policy.named_parameters())
    assert run.skipped["nonfinite_loss"] == checkpoint.DIVERGED


def test_weights_that_are_not_finite_are_never_saved(tmp_path):
    run = T.setup(T.parse_args(["--out_dir", str(tmp_path), *TINY_RL, "--max_steps", "2"]))
    optimizer, scheduler = T.make_optimizer(run, 1e-3, 0.0, 2, 0.0, False)
    with torch.no_grad():
        next(run.policy.parameters())[0] = float("nan")
    with pytest.raises(SystemExit, match="hold NaN or infinite values: not saved; no checkpoint was saved"):
        checkpoint.save(run.ckpt_path, "rl", 1, run.policy, optimizer, scheduler, {}, False, False, True)
    with pytest.raises(SystemExit, match="hold NaN or infinite values"):
        T.save_pretrained(run, "final")
    assert os.listdir(tmp_path / "checkpoint") == [] and not (tmp_path / "final").exists()


# ---------------------------------------------------------------------------- stops
def test_stop_after_saves_where_it_stops_exits_0_and_the_printed_command_continues_exactly(tmp_path, capsys, monkeypatch):
    """The stop falls between --save_every steps: it saves there all the same, so the resume repeats no step and
    ends bitwise equal to the uninterrupted run."""
    flags = [*TINY_RL, "--max_new_tokens", "8", "--lr", "1e-2", "--max_steps", "4", "--save_every", "3"]
    T.main(["--out_dir", str(tmp_path / "full"), *flags])
    out = tmp_path / "a folder"                                  # a space: the command must quote it
    T.main(["--out_dir", str(out), *flags, "--stop_after", "2"])   # returns: exit 0
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("stopped after 2 steps of the rl stage (checkpoint at step 2); continue with: python ")
    assert checkpoint.read(str(out / "checkpoint" / "ckpt.pt"))["step"] == 2 and not (out / "final").exists()
    command = shlex.split(line.split("continue with: ")[1])
    assert command[-1] == "--resume" and command[command.index("--out_dir") + 1] == str(out)
    T.main(command[2:])
    assert steps(out) == [1, 2, 3, 4]
    a, b = load_file(tmp_path / "full" / "final" / "model.safetensors"), load_file(out / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_stop_after_in_the_warmup_of_stage_both_saves_and_the_resume_goes_on_through_rl(tmp_path):
    flags = ["--out_dir", str(tmp_path), *TINY_RL[:2], "--stage", "both", *TINY_RL[6:], "--sft_steps", "3",
             "--sft_batch", "2", "--max_steps", "1"]
    T.main([*flags, "--stop_after", "2"])
    assert checkpoint.read(str(tmp_path / "checkpoint" / "ckpt.pt"))["stage"] == "sft" and steps(tmp_path, "sft") == [1, 2]
    T.main([*flags, "--resume"])
    assert steps(tmp_path, "sft") == [1, 2, 3] and steps(tmp_path) == [1]
    assert (tmp_path / "warmup" / "model.safetensors").exists() and (tmp_path / "final" / "model.safetensors").exists()


def test_sigterm_ends_as_ctrl_c_with_a_command_that_pastes_back(tmp_path):
    out = tmp_path / "a run"
    argv = [os.path.join(ROOT, "train.py"), "--out_dir", str(out), *TINY_RL, "--max_steps", "500", "--save_every", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env=env)
    deadline = time.time() + 120
    while not (out / "checkpoint" / "ckpt.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    line = err.strip().splitlines()[-1]
    assert proc.returncode == 1 and "Traceback" not in err, err[-2000:]
    assert line.startswith("interrupted: the last good checkpoint (rl, step ") and " is " + str(out / "checkpoint") in line
    command = shlex.split(line.split("continue with: ")[1])
    assert command[:2] == ["python", argv[0]] and command[2:] == [*argv[1:], "--resume"]


@pytest.mark.parametrize("env, launcher", [({}, ["python"]),
                                           ({"LOCAL_WORLD_SIZE": "2", "WORLD_SIZE": "2"}, ["torchrun", "--nproc_per_node", "2"]),
                                           ({"LOCAL_WORLD_SIZE": "8", "WORLD_SIZE": "16"},
                                            ["torchrun", "--nnodes", "2", "--nproc_per_node", "8"])])
def test_the_resume_command_quotes_its_arguments_and_uses_the_launcher_the_run_had(env, launcher, monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(sys, "argv", ["train.py"])
    command = checkpoint.resume_command(["--out_dir", "my runs/a", "--overwrite", "--data", "it's.jsonl", "--lr", "1e-5"])
    assert shlex.split(command) == [*launcher, "train.py", "--out_dir", "my runs/a", "--data", "it's.jsonl", "--lr", "1e-5",
                                    "--resume"]


# ---------------------------------------------------------------------------- a full disk
def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("fault", ["oserror", "safetensors"])
def test_a_full_disk_while_writing_final_leaves_no_final_and_resume_writes_it_whole(tmp_path, monkeypatch, fault):
    import transformers.modeling_utils
    from safetensors import SafetensorError
    real = transformers.modeling_utils.safe_save_file

    def disk_full(state, filename, metadata=None):
        open(filename, "wb").write(b"partial")
        if fault == "oserror":
            no_space()
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space '
                              'left on device" })')
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", disk_full)
    out, flags = tmp_path / "run", [*TINY_RL, "--max_steps", "1"]
    message = error_of(["--out_dir", str(out), *flags])
    assert message == (f"error: cannot write {out}/final (no space left on device); the last good checkpoint (rl, step 1) "
                       f"is {out}/checkpoint/ckpt.pt: free space, then run again with --resume to write it")
    assert not (out / "final").exists() and not (out / "final.partial").exists()
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", real)
    T.main(["--out_dir", str(out), *flags, "--resume"])
    assert finite(load_file(out / "final" / "model.safetensors")) and (out / "final" / "tokenizer_config.json").exists()


def test_a_full_disk_while_rewriting_final_keeps_the_final_there_was(tmp_path, monkeypatch):
    out, flags = tmp_path / "run", [*TINY_RL, "--max_steps", "1"]
    T.main(["--out_dir", str(out), *flags])
    before = (out / "final" / "model.safetensors").read_bytes()
    import transformers.modeling_utils
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", no_space)
    assert "no space left on device" in error_of(["--out_dir", str(out), *flags, "--resume"])
    assert (out / "final" / "model.safetensors").read_bytes() == before and not (out / "final.partial").exists()


def test_a_full_disk_while_logging_is_one_line_naming_the_last_good_checkpoint_and_leaves_no_torn_line(tmp_path, monkeypatch):
    real, calls = logs.append, []

    def full_on_the_fifth_line(fd, data):        # a step writes a metrics line, then 2 rollouts
        calls.append(data)
        if len(calls) < 5:
            return real(fd, data)
        real(fd, data[:len(data) // 2])                   # half the line reached the disk
        no_space()
    monkeypatch.setattr(logs, "append", full_on_the_fifth_line)
    out = tmp_path / "run"
    message = error_of(["--out_dir", str(out), *TINY_RL, "--max_steps", "4", "--save_every", "1", "--log_rollouts_every", "1"])
    assert message == (f"error: cannot write {out}/rollouts.jsonl (no space left on device); the last good checkpoint "
                       f"(rl, step 1) is {out}/checkpoint/ckpt.pt: free space, then continue with --resume")
    assert [json.loads(line)["step"] for line in open(out / "rollouts.jsonl")] == [1, 1]     # every line whole


def test_a_full_disk_while_saving_a_checkpoint_says_so_rather_than_quoting_the_zip_writer(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple
    real_save = torch.save

    def zip_writer_fails(obj, path):
        open(path, "wb").write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(torch, "save", zip_writer_fails)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 << 30, 10 << 30, 4096))   # the disk is full
    message = error_of(["--out_dir", str(tmp_path), *TINY_RL, "--max_steps", "1"])
    assert "(no space left on device)" in message and "inline_container" not in message
    monkeypatch.setattr(torch, "save", real_save)
    assert os.listdir(tmp_path / "checkpoint") == []


def test_a_full_disk_while_drawing_the_curves_is_one_line_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    import matplotlib.figure
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"stage": "sft", "step": 1, "loss": 1.0}) + "\n")
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", no_space)
    logs.plot_curves(str(tmp_path))
    assert capsys.readouterr().out.strip() == f"cannot write {tmp_path}/training_curves.png (no space left on device)"


# ---------------------------------------------------------------------------- resume: what the run read
def rl_file(path, answer):
    from PIL import Image
    Image.new("RGB", (28, 28), "red").save(path.parent / "a.png")
    path.write_text(json.dumps({"image_path": "a.png", "problem": "What colour?", "solution": f"### The final answer is: {answer}",
                                "key_steps": {"Steps": [[answer]]}}) + "\n")


def test_resume_records_absolute_paths_and_refuses_other_data_in_one_line(tmp_path, monkeypatch):
    for folder, answer in (("a", "red"), ("b", "blue")):
        (tmp_path / folder).mkdir()
        rl_file(tmp_path / folder / "rl.jsonl", answer)
    out = tmp_path / "run"
    flags = ["--out_dir", str(out), *TINY_RL[:4], *TINY_RL[6:], "--data", "rl.jsonl", "--image_root", ".", "--max_steps", "2"]
    monkeypatch.chdir(tmp_path / "a")
    T.main([*flags, "--stop_after", "1"])
    config = checkpoint.read(str(out / "checkpoint" / "ckpt.pt"))["config"]
    assert config["data"] == str(tmp_path / "a" / "rl.jsonl") and config["image_root"] == str(tmp_path / "a")
    assert config["data_fingerprint"] == checkpoint.fingerprint(tmp_path / "a" / "rl.jsonl")
    monkeypatch.chdir(tmp_path / "b")                                     # the same relative paths, other files
    message = error_of([*flags, "--resume"])
    assert f"--data {tmp_path}/b/rl.jsonl (" in message and f"is not the file the run trained on, {tmp_path}/a/rl.jsonl" in message
    assert f"--image_root is '{tmp_path}/b' (checkpoint: '{tmp_path}/a')" in message
    (tmp_path / "a" / "rl.jsonl").write_text((tmp_path / "a" / "rl.jsonl").read_text().replace("red", "pink"))
    monkeypatch.chdir(tmp_path / "a")                                     # the same path, changed since
    assert "is not the file the run trained on" in error_of([*flags, "--resume"])


def test_a_refused_resume_names_every_flag_to_change_at_once():
    args = T.parse_args(["--stage", "both", "--resume", "--sft_batch", "4", "--prompts_per_step", "2", "--seed", "3"])
    saved = dict(stage="sft", step=2, rng=[None], config={**vars(T.parse_args(["--stage", "both"]))})
    with pytest.raises(SystemExit) as err:
        checkpoint.check_resume(args, saved, 1)
    message = str(err.value)
    assert "--seed is 3 (checkpoint: 0)" in message and "\n" not in message
    assert "global batch (sft_batch × ranks)" in message and "global batch (prompts_per_step × grad_accum × ranks)" in message


def test_a_resume_on_the_toy_task_of_a_run_on_a_file_is_refused():
    args = T.parse_args(["--stage", "rl", "--resume"])
    checkpoint.record_inputs(args)
    saved = dict(stage="rl", step=2, rng=[None], config={**vars(args), "data": "/a/rl.jsonl", "data_fingerprint": "9 bytes, sha256 ab"})
    with pytest.raises(SystemExit, match="--data is 'toy' \\(checkpoint: '/a/rl.jsonl'\\)"):
        checkpoint.check_resume(args, saved, 1)


def test_the_same_data_file_moved_elsewhere_resumes(tmp_path):
    rl_file(tmp_path / "rl.jsonl", "red")
    args = T.parse_args(["--stage", "rl", "--resume", "--data", str(tmp_path / "rl.jsonl")])
    checkpoint.record_inputs(args)
    saved = dict(stage="rl", step=2, rng=[None], config={**vars(args), "data": "/gone/rl.jsonl"})
    assert f"--resume: --data '/gone/rl.jsonl' -> '{tmp_path}/rl.jsonl'" in checkpoint.check_resume(args, saved, 1)

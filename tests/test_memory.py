"""training/memory.py's count (bench.py --memory) against a measured CPU peak: one micro-batch of the update
(after an earlier one left its gradients) on a scaled-down Qwen2-VL under bf16 autocast, measured with torch's
MemTracker, which follows every tensor's storage (no RSS: other processes on the machine cannot move it)."""
import pytest
import torch
from PIL import Image
from torch.distributed._tools.mem_tracker import MemTracker

import model as M
from qwen import families, tiny
from training import memory

ARCH = dict(text_layers=2, hidden=256, heads=4, kv_heads=2, mlp=1024, vision_depth=2, vision_dim=128, vision_heads=4)
TOLERANCE = 0.15     # counted within 15 % of measured (here 0.89 of it without checkpointing, 1.04 with)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient-checkpointing"])
def test_counted_update_peak_matches_the_measured_cpu_peak(checkpointing):
    _, tokenizer, image_processor = tiny.load_tiny()
    torch.manual_seed(0)
    net = families.random_init(tokenizer, image_processor, **ARCH).float().train()
    if checkpointing:
        net.activation_checkpointing_enable({"use_reentrant": False})
    rows, completion = 2, 64
    images = [Image.new("RGB", (224, 168), colour) for colour in ("white", "black")]   # distinct prompts: each row in full
    batch = M.build_inputs(tokenizer, image_processor, images, ["How many?"] * rows)
    batch.pop("kept")
    ids = torch.randint(10, 600, (rows, completion))

    def micro_batch():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logp = M.completion_logprobs(net, batch, ids)
        logp.sum().backward()
    micro_batch()
    tracker = MemTracker()
    tracker.track_external(net)
    with tracker:
        micro_batch()
    measured = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
    count = memory.account(ARCH, rows=rows, prompt=batch["input_ids"].shape[1], completion=completion,
                           patches=batch["pixel_values"].shape[0] // rows)
    by_kind = {str(k).split(".")[-1]: v for k, v in measured.items()}
    assert by_kind["PARAM"] == count["weights"] and by_kind["GRAD"] == count["gradients"]
    activations = count["activations_checkpointed" if checkpointing else "activations"] + count["autocast_casts"]
    assert activations == pytest.approx(by_kind["ACT"] + by_kind["TEMP"], rel=TOLERANCE)
    assert count["activations_checkpointed"] < 0.6 * count["activations"]
    optimizer = torch.optim.AdamW(net.parameters())
    tracker = MemTracker()
    tracker.track_external(net, optimizer)
    with tracker:
        optimizer.step()                        # AdamW's two moments appear at its first step
    state = {str(k).split(".")[-1]: v for k, v in tracker.get_tracker_snapshot()[torch.device("cpu")].items()}
    assert state["OPT"] == pytest.approx(count["optimizer"], rel=1e-3)    # + the per-tensor step counters
    # (the peak within the CPU's per-tensor AdamW step adds a few of the largest tensor's temporaries; CUDA's
    # fused kernel, which train.py uses there, adds none)


def test_fsdp_reads_the_model_into_cpu_memory_and_shards_it_there(monkeypatch):
    """Under --fsdp no GPU holds the whole fp32 model: it is read on the CPU, and FSDP moves each unit's shard
    to the GPU as it shards it; a bf16 run asks FSDP for bf16 gathers."""
    import train as T
    from training import parallel, setup
    loaded, sharded, real = [], [], M.load
    monkeypatch.setattr(M, "load", lambda name, device=None, **kw: loaded.append(str(device)) or real(name, device=device, **kw))
    monkeypatch.setattr(parallel, "shard", lambda net, dtype=None: sharded.append((next(net.parameters()).device.type, dtype)) or net)
    args = T.parse_args(["--dtype", "bf16", "--out_dir", "unused"])
    args.fsdp = True                                          # as under torchrun
    setup.load_model(args, "tiny", torch.device("cuda"))
    assert loaded == ["cpu"] and sharded == [("cpu", torch.bfloat16)]

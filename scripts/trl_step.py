"""scripts/trl_step.py: time Hugging Face TRL's GRPOTrainer step on a local Qwen2-VL (or Qwen2.5-VL) directory.

    /tmp/trl-venv/bin/python scripts/trl_step.py --model out/bench/peer-model --steps 3
    python bench.py --vs_trl /tmp/trl-venv/bin/python      # runs this on the bench's own model and workload

Standalone: it imports TRL and transformers, none of the project's modules, and runs in TRL's own virtual
environment (TRL pins its own transformers, so it cannot share the project's):
    python -m venv /tmp/trl-venv && /tmp/trl-venv/bin/pip install torch==2.13.0 trl pillow

The workload is bench.py's, given by flags: prompts per optimizer step, M samples each, every completion
exactly --max_new_tokens long (min_new_tokens = max), one drawn image per prompt, β, temperature, rows per
backward. The model trains in full as train.py's does: fp32 weights with bf16 autocast on CUDA (accelerate's
mixed precision), fp32 on CPU, SDPA attention, sampling by HF `generate` (no vLLM). The reward is cheap and
differs between samples (the share of digits in the reply), so every group has advantages. A callback times
each optimizer step (generation, reference log-probs, loss, backward, AdamW); the first is warm-up, not counted.
It prints one JSON line: {"peer": "trl", "trl_version", "step_s_median", "times", "device", ...}.

Without torchvision, transformers cannot build Qwen2VLProcessor's video processor, so the processor's class
check is relaxed; only images are used.
"""
import argparse, json, shutil, statistics, tempfile, time

import torch
import transformers
import transformers.processing_utils as processing_utils
from PIL import Image, ImageDraw

processing_utils.ProcessorMixin.check_argument_for_proper_class = lambda self, name, arg: type(arg)

import trl  # noqa: E402  (after the class-check patch)
from datasets import Dataset  # noqa: E402
from transformers import (AutoConfig, AutoModelForImageTextToText, AutoTokenizer, Qwen2_5_VLProcessor,  # noqa: E402
                          Qwen2VLProcessor, TrainerCallback)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil  # noqa: E402


PROCESSORS = {"qwen2_vl": Qwen2VLProcessor, "qwen2_5_vl": Qwen2_5_VLProcessor}   # both use Qwen2-VL's image processor


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="a local Qwen2-VL directory (model, tokenizer, image processor)")
    p.add_argument("--prompts_per_step", type=int, default=2, help="prompts per optimizer step")
    p.add_argument("--num_generations", type=int, default=4, help="M, samples per prompt")
    p.add_argument("--micro_batch", type=int, default=8, help="rows per forward/backward")
    p.add_argument("--max_new_tokens", type=int, default=64, help="every completion's length")
    p.add_argument("--image", default="112x112", help="WIDTHxHEIGHT of each prompt's image")
    p.add_argument("--min_pixels", type=int, default=None, help="the image processor's pixel range (else the model's)")
    p.add_argument("--max_pixels", type=int, default=None)
    p.add_argument("--instruction", default="{question}", help="the user text, {question} standing for the question")
    p.add_argument("--beta", type=float, default=0.04)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--steps", type=int, default=3, help="timed steps; one more runs first as warm-up")
    args = p.parse_args()
    rows = args.prompts_per_step * args.num_generations
    if rows % args.micro_batch:
        p.error(f"--micro_batch {args.micro_batch} must divide the step's {rows} rows")
    args.image = tuple(int(n) for n in args.image.lower().split("x"))
    return args


def image(i, size):
    """bench.py's picture: a coloured square and a number drawn on white."""
    im = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(im)
    draw.rectangle([4, 4, size[0] // 2, size[1] // 2], fill=(37 * i % 255, 80, 160))
    draw.text((size[0] // 2, size[1] // 2), str(i), fill="black")
    return im


def digit_share(completions, **_):
    """Reward: the share of digits in each reply (cheap, and it differs between samples)."""
    texts = [c if isinstance(c, str) else c[0]["content"] for c in completions]
    return [sum(ch.isdigit() for ch in t) / max(len(t), 1) for t in texts]


class StepTimes(TrainerCallback):
    """Wall time of every optimizer step, the device synchronised at both ends."""

    def __init__(self):
        self.times, self.start = [], None

    def _sync(self):
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_step_begin(self, args, state, control, **kwargs):
        self._sync()
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self._sync()
        self.times.append(time.perf_counter() - self.start)


def main():
    args = parse_args()
    cuda = torch.cuda.is_available()
    family = AutoConfig.from_pretrained(args.model).model_type
    if family not in PROCESSORS:
        raise SystemExit(f"error: {args.model} is a {family} model; this timing supports {', '.join(PROCESSORS)}")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(args.model)
    if args.min_pixels or args.max_pixels:
        size = image_processor.size
        image_processor.size = {"shortest_edge": args.min_pixels or size["shortest_edge"],
                                "longest_edge": args.max_pixels or size["longest_edge"]}
    processor = PROCESSORS[family](image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                                 chat_template=tokenizer.chat_template)
    net = AutoModelForImageTextToText.from_pretrained(args.model, dtype=torch.float32, attn_implementation="sdpa")

    question = "What number is shown? ({})"
    data = Dataset.from_list([
        {"prompt": [{"role": "user", "content": [
            {"type": "image"}, {"type": "text", "text": args.instruction.format(question=question.format(i))}]}],
         "image": image(i, args.image)} for i in range(args.prompts_per_step * (args.steps + 1))])
    rows = args.prompts_per_step * args.num_generations
    tmp = tempfile.mkdtemp(prefix="trl-step-")      # the trainer's output_dir: it saves nothing there
    config = trl.GRPOConfig(
        output_dir=tmp, max_steps=args.steps + 1, learning_rate=args.lr, seed=0,
        per_device_train_batch_size=args.micro_batch, gradient_accumulation_steps=rows // args.micro_batch,
        num_generations=args.num_generations, max_completion_length=args.max_new_tokens,
        generation_kwargs={"min_new_tokens": args.max_new_tokens}, temperature=args.temperature, beta=args.beta,
        use_cpu=not cuda, bf16=cuda, gradient_checkpointing=args.gradient_checkpointing,
        save_strategy="no", logging_strategy="no", report_to=[], disable_tqdm=True)
    timer = StepTimes()
    trainer = trl.GRPOTrainer(model=net, reward_funcs=digit_share, args=config, train_dataset=data,
                              processing_class=processor, callbacks=[timer])
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    shutil.rmtree(tmp, ignore_errors=True)
    counted = timer.times[1:] or timer.times
    summary = trainer.state.log_history[-1] if trainer.state.log_history else {}   # the run's means, at its end
    print(json.dumps({
        "peer": "trl", "trl_version": trl.__version__, "transformers_version": transformers.__version__,
        "step_s_median": round(statistics.median(counted), 4), "steps": len(counted),
        "times": [round(t, 4) for t in timer.times],
        "device": torch.cuda.get_device_name() if cuda else f"CPU x{torch.get_num_threads()} threads",
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if cuda else None,
        "rows": rows, "prompts_per_step": args.prompts_per_step, "num_generations": args.num_generations,
        "micro_batch": args.micro_batch, "max_new_tokens": args.max_new_tokens, "image": list(args.image),
        "beta": args.beta, "temperature": args.temperature,
        "completion_tokens_mean": summary.get("completions/mean_length"),
        "tokens_per_step": summary["num_tokens"] / len(timer.times) if "num_tokens" in summary else None}))


if __name__ == "__main__":
    main()

"""training/: what train.py builds on: the run's setup (setup.py), real data files (data.py), checkpoints
(checkpoint.py), multi-process training (parallel.py), LoRA adapters and a frozen vision tower (lora.py),
benchmark accuracy during training (heldout.py), what a run writes (logs.py), and the memory a step
needs per GPU, counted (memory.py).
"""

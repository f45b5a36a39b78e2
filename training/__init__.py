"""training/: what train.py builds on: the run's setup (setup.py), real data files (data.py), checkpoints
(checkpoint.py), multi-process training (parallel.py) and what a run writes (logs.py).
"""

"""scripts/: runs that reproduce or show results, from the repository root: `python -m scripts.ablation`
(the paper's reward ablation on the toy task), `python -m scripts.viewer OUT_DIR` (a run's rollouts as a page),
`python -m scripts.gpu_check` (a GPU's acceptance check: speed, memory and exactness, a verdict per line).
"""

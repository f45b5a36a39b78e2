"""scripts/: runs that reproduce results, from the repository root: `python -m scripts.ablation`.
"""

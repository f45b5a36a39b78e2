"""benchmarks/: the evaluation benchmarks: how each one's files are read and its judgements summed
(catalog.py), from records to verdicts and metrics, shared by evaluate.py and training (harness.py), the
rule that judges one answer (scorers.py), and MATH-V's LaTeX numbers (latex_value.py).
"""

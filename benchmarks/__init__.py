"""benchmarks/: the evaluation benchmarks evaluate.py runs: how each one's files are read and its
judgements summed (catalog.py), the rule that judges one answer (scorers.py), and MATH-V's LaTeX
numbers (latex_value.py).
"""

"""qwen/: the Qwen model families the code runs (families.py: a model of any of them with random weights)
and the tiny test models with their tokenizer (tiny.py).
"""

"""qwen/: the Qwen model families the code runs (families.py: a model of any of them with random weights)
and the tiny test models with their tokenizer (tiny.py); images.py opens an image as the image processor is
given it, for training and evaluation alike.
"""

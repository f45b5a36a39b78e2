"""toy/: the embedded default task (task.py): synthetic visual reasoning with key steps, and its preset.
"""

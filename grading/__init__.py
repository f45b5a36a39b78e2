"""grading/: judging a completion's text beyond the paper's rewards (rewards.py): reading its final answer
and comparing it with the ground truth (answers.py), and the released R1-VL code's reward functions
(official_rewards.py).
"""

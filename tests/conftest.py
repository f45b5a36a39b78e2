import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="module")
def tiny():
    """(model, tokenizer, image_processor) of the embedded tiny Qwen2-VL, fp32 on CPU."""
    import model
    from qwen.tiny import builder
    return model.load("tiny", device="cpu", build=builder("tiny"))


def with_head_bias(tiny, bias):
    """A copy of the tiny (model, tokenizer, image processor) whose LM head adds `bias` {token id: logit}."""
    import copy
    import torch
    policy = copy.deepcopy(tiny[0])
    head = torch.nn.Linear(policy.lm_head.in_features, policy.lm_head.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(policy.lm_head.weight)
        head.bias.zero_()
        for token, logit in bias.items():
            head.bias[token] = logit
    policy.lm_head = head
    return policy, tiny[1], tiny[2]

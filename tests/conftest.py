import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="module")
def tiny():
    """(model, tokenizer, image_processor) of the embedded tiny Qwen2-VL, fp32 on CPU."""
    import model
    return model.load("tiny", device="cpu")

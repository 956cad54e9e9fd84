"""The claim itself, on the testbed this project trains (scripts/train_testbed.py, 128-token context).

Past the training length vanilla attention loses the passkey; SelfExtend, with its planned G and W,
keeps it. Measured on these committed weights over 5 depths x 4 seeds per length: vanilla 1.0 / 0.1 /
0.05 and SelfExtend 1.0 / 0.9 / 0.5 at 1x / 4x / 8x. The bounds below leave a margin of 2-3 samples.
"""

import pytest
import transformers

from selfextend.evaluation import Evaluation, Method, evaluate, summarize
from selfextend.testbed import TRAIN_LENGTH, WEIGHTS


@pytest.fixture(scope="module")
def accuracy(tmp_path_factory) -> dict:
    tokenizer = transformers.AutoTokenizer.from_pretrained(WEIGHTS)
    model = transformers.AutoModelForCausalLM.from_pretrained(WEIGHTS, dtype="float32").eval()
    ev = Evaluation("passkey", [TRAIN_LENGTH, 4 * TRAIN_LENGTH, 8 * TRAIN_LENGTH],
                    [Method.parse("vanilla"), Method.parse("selfextend")], "testbed",
                    depths=[0.0, 0.25, 0.5, 0.75, 1.0], samples=4)
    rows = evaluate(model, tokenizer, ev, tmp_path_factory.mktemp("testbed"), progress=False)
    return {(s["method"], s["length"] // TRAIN_LENGTH): s["accuracy"] for s in summarize(rows)}


def test_both_read_the_key_within_the_training_length(accuracy):
    assert accuracy[("vanilla", 1)] >= 0.9
    assert accuracy[("selfextend", 1)] >= 0.9


def test_vanilla_loses_the_key_past_the_training_length(accuracy):
    assert accuracy[("vanilla", 4)] <= 0.25
    assert accuracy[("vanilla", 8)] <= 0.2


def test_selfextend_keeps_it_at_4x_and_much_of_it_at_8x(accuracy):
    assert accuracy[("selfextend", 4)] >= 0.75
    assert accuracy[("selfextend", 8)] >= 0.35
    assert accuracy[("selfextend", 8)] >= accuracy[("vanilla", 8)] + 0.25

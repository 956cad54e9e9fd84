"""Synthetic long documents made offline and deterministically: the passkey-retrieval template."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

CountTokens = Callable[[str], int]

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
INSTRUCTION = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
               "I will quiz you about the important information there.\n\n")
QUESTION = "What is the pass key? The pass key is"


@dataclass(frozen=True)
class PasskeySample:
    text: str
    question: str
    answer: str


def token_counter(tokenizer) -> CountTokens:
    """How many tokens `tokenizer` makes of a piece of text, special tokens left out: what documents are sized by."""
    return lambda text: len(tokenizer(text, add_special_tokens=False).input_ids)


def needle(key: str) -> str:
    """The authors' needle sentence for `key`."""
    return f"The pass key is {key}. Remember it. {key} is the pass key. "


def passkey_sample(count_tokens: CountTokens, n_tokens: int, depth: float = 0.5, digits: int = 5,
                   seed: int = 0) -> PasskeySample:
    """A passkey document of about `n_tokens` tokens (as counted by `count_tokens(text)`), needle at `depth`."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be within [0, 1], got {depth}")
    key = str(random.Random(seed).randrange(10 ** (digits - 1), 10**digits))
    fixed = count_tokens(INSTRUCTION + needle(key) + QUESTION)
    per_filler = max(1, count_tokens(FILLER * 20) // 20)
    repeats = max(1, (n_tokens - fixed) // per_filler)
    before = round(repeats * depth)
    text = INSTRUCTION + FILLER * before + needle(key) + FILLER * (repeats - before)
    return PasskeySample(text, QUESTION, key)

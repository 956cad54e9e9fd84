"""Long-context tasks generated offline and deterministically by seed, sized in the model's own tokens.

`passkey` is the SelfExtend authors' template. `niah` hides one "special magic number" in real prose
(the King James Bible, see texts.py). The RULER-style tasks (Hsieh et al., 2024) hide their needles in
the passkey filler: `multikey` (one key asked, three distractor keys), `multivalue` (four values of
one key, all asked), `vartrack` (a chain of VAR assignments) and `kv` (UUID keys and values). A sample
is correct when every expected string appears in the answer, spaces ignored (RULER's string match).
"""

from __future__ import annotations

import random
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from ..samples import FILLER, CountTokens, passkey_sample
from .texts import kjv_text

WORDS = ("apple", "river", "candle", "falcon", "harbor", "lantern", "meadow", "pepper", "quartz", "saddle",
         "thunder", "violin", "walnut", "zephyr", "anchor", "bishop", "copper", "dragon", "ember", "forest",
         "glacier", "hammer", "island", "jasmine", "kettle", "lemon", "marble", "nickel", "orchid", "pillow")


@dataclass(frozen=True)
class Sample:
    """One prompt: `context` then `question`, whose continuation must contain every `expected` string."""

    task: str
    context: str
    question: str
    expected: tuple[str, ...]
    max_new_tokens: int

    @property
    def prompt(self) -> str:
        return f"{self.context.rstrip()}\n\n{self.question}"


def is_correct(expected: tuple[str, ...], got: str) -> bool:
    """Every expected string occurs in the answer, whitespace ignored on both sides."""
    flat = re.sub(r"\s+", "", got)
    return all(re.sub(r"\s+", "", item) in flat for item in expected)


MAGIC_HEADER = "Some special magic numbers are hidden within the following text. Make sure to memorize them.\n\n"


def _magic(word: str, value: str) -> str:
    """RULER's needle sentence for a magic number."""
    return f"One of the special magic numbers for {word} is: {value}."


def _number(rng: random.Random, digits: int) -> str:
    return str(rng.randrange(10 ** (digits - 1), 10**digits))


def _hide(count_tokens: CountTokens, n_tokens: int, header: str, needles: list[str], depths: list[float],
          question: str, haystack: str) -> str:
    """`header`, then `haystack` (repeated if short) filling `n_tokens` in all, each needle at its depth (0..1)."""
    budget = max(0, n_tokens - count_tokens(header + " ".join(needles) + "\n\n" + question))
    chars_per_token = len(haystack[:8000]) / max(1, count_tokens(haystack[:8000]))
    need = int(budget * chars_per_token)
    text = (haystack * (need // len(haystack) + 1))[:need]
    while text and count_tokens(text) > budget:  # the estimate ran over: trim to the budget
        text = text[: int(len(text) * 0.99)]
    cuts = [0] + [m.end() for m in re.finditer(r"(?<=[.!?])\s+", text)] + [len(text)]
    pieces, last = [], 0
    for depth, needle in sorted(zip(depths, needles)):
        cut = max(last, min(cuts, key=lambda c: abs(c - depth * len(text))))
        pieces += [text[last:cut], needle + " "]
        last = cut
    return header + "".join(pieces) + text[last:]


def passkey(count_tokens: CountTokens, n_tokens: int, depth: float, seed: int, digits: int = 5) -> Sample:
    sample = passkey_sample(count_tokens, n_tokens, depth=depth, digits=digits, seed=seed)
    return Sample("passkey", sample.text, sample.question, (sample.answer,), digits + 8)


def niah(count_tokens: CountTokens, n_tokens: int, depth: float, seed: int, digits: int = 7) -> Sample:
    rng = random.Random(f"niah:{seed}")
    word, value = rng.choice(WORDS), _number(rng, digits)
    question = (f"What is the special magic number for {word} mentioned in the provided text? "
                f"The special magic number for {word} mentioned in the provided text is")
    needle = _magic(word, value)
    context = _hide(count_tokens, n_tokens, MAGIC_HEADER, [needle], [depth], question, kjv_text().replace("\n", " "))
    return Sample("niah", context, question, (value,), digits + 8)


def multikey(count_tokens: CountTokens, n_tokens: int, depth: float, seed: int, digits: int = 7) -> Sample:
    rng = random.Random(f"multikey:{seed}")
    words = rng.sample(WORDS, 4)
    values = [_number(rng, digits) for _ in words]
    needles = [_magic(w, v) for w, v in zip(words, values)]
    depths = [depth] + [rng.random() for _ in words[1:]]
    question = (f"What is the special magic number for {words[0]} mentioned in the provided text? "
                f"The special magic number for {words[0]} mentioned in the provided text is")
    context = _hide(count_tokens, n_tokens, MAGIC_HEADER, needles, depths, question, FILLER * 100)
    return Sample("multikey", context, question, (values[0],), digits + 8)


def multivalue(count_tokens: CountTokens, n_tokens: int, depth: float, seed: int, digits: int = 7) -> Sample:
    rng = random.Random(f"multivalue:{seed}")
    word = rng.choice(WORDS)
    values = [_number(rng, digits) for _ in range(4)]
    needles = [_magic(word, v) for v in values]
    depths = [depth] + [rng.random() for _ in values[1:]]
    question = (f"What are all the special magic numbers for {word} mentioned in the provided text? "
                f"The special magic numbers for {word} mentioned in the provided text are")
    context = _hide(count_tokens, n_tokens, MAGIC_HEADER, needles, depths, question, FILLER * 100)
    return Sample("multivalue", context, question, tuple(values), 4 * (digits + 4))


def vartrack(count_tokens: CountTokens, n_tokens: int, depth: float, seed: int, hops: int = 4) -> Sample:
    rng = random.Random(f"vartrack:{seed}")
    names = ["".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5)) for _ in range(hops + 1)]
    value = _number(rng, 5)
    needles = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
    depths = sorted([depth] + [rng.random() for _ in range(hops)])  # the chain reads in order
    question = (f"Find all variables that are assigned the value {value} in the text above. Answer: According to "
                f"the chain(s) of variable assignment in the text above, {hops + 1} variables are assigned the "
                f"value {value}, they are:")
    header = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
    context = _hide(count_tokens, n_tokens, header, needles, depths, question, FILLER * 100)
    return Sample("vartrack", context, question, tuple(names), 8 * (hops + 1))


def kv(count_tokens: CountTokens, n_tokens: int, depth: float, seed: int, pairs: int = 4) -> Sample:
    rng = random.Random(f"kv:{seed}")
    keys = [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(pairs)]
    values = [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(pairs)]
    needles = [f'The value of key "{k}" is "{v}".' for k, v in zip(keys, values)]
    depths = [depth] + [rng.random() for _ in keys[1:]]
    question = f'What is the value of key "{keys[0]}"? The value of key "{keys[0]}" is "'
    header = "Key-value pairs are hidden within the following text. Make sure to memorize them.\n\n"
    context = _hide(count_tokens, n_tokens, header, needles, depths, question, FILLER * 100)
    return Sample("kv", context, question, (values[0],), 48)


TASKS: dict[str, Callable[..., Sample]] = {
    "passkey": passkey, "niah": niah, "multikey": multikey, "multivalue": multivalue, "vartrack": vartrack, "kv": kv,
}

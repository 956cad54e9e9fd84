"""Reading a long prompt in chunks and answering greedily: the loop shared by `generate` and `eval`."""

from __future__ import annotations

import sys

import torch
from tqdm import tqdm
from transformers import DynamicCache, PreTrainedModel


@torch.inference_mode()
def prefill(model: PreTrainedModel, ids: torch.Tensor, chunk_size: int = 2048, progress: bool = False) -> DynamicCache:
    """The KV cache of all but the last token of `ids`, filled `chunk_size` tokens per forward pass."""
    if chunk_size < 1:
        raise ValueError(f"chunk size must be positive, got {chunk_size}")
    n = ids.shape[1]
    cache = DynamicCache(config=model.config)
    with tqdm(total=n - 1, unit="tok", desc="prefill", file=sys.stderr, disable=not progress) as bar:
        for start in range(0, n - 1, chunk_size):
            end = min(n - 1, start + chunk_size)
            model(ids[:, start:end], past_key_values=cache, use_cache=True, logits_to_keep=1)
            bar.update(end - start)
    return cache


def pad_id(tokenizer) -> int | None:
    """The id `generate` pads with: the tokenizer's pad token, else its end-of-sequence token."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


@torch.inference_mode()
def answer(model: PreTrainedModel, ids: torch.Tensor, cache: DynamicCache, max_new_tokens: int,
           pad_token_id: int | None, streamer=None) -> torch.Tensor:
    """Greedy continuation of `ids` from its pre-filled cache; returns the new token ids of row 0."""
    out = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, do_sample=False,
                         max_new_tokens=max_new_tokens, streamer=streamer, pad_token_id=pad_token_id)
    return out[0, ids.shape[1]:]


def respond(model: PreTrainedModel, tokenizer, ids: torch.Tensor, max_new_tokens: int, chunk_size: int = 2048) -> str:
    """The greedy answer to prompt `ids` (row 0), read in chunks: the loop behind eval and calibrate."""
    cache = prefill(model, ids, chunk_size)
    return tokenizer.decode(answer(model, ids, cache, max_new_tokens, pad_id(tokenizer)), skip_special_tokens=True)

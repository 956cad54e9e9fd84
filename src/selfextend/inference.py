"""Reading a long prompt in chunks and answering: the loop shared by `generate`, `eval`, `calibrate` and `serve`."""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from tqdm import tqdm
from transformers import DynamicCache, PreTrainedModel

from .allocator import return_freed_memory
from .integration import settings
from .kv_cache import new_cache
from .transformers_compat import cache_kwargs, length_reminder_held_back

ChunkHook = Callable[[int, DynamicCache], None]
# prefill tokens per forward pass, for every command: a chunk's intermediates are most of the main job's memory
# above what it keeps (Gemma's MLP holds four [chunk, 2048] float32 tensors), and 1024 took 0.1-0.15 GB off its
# peak against 2048 at no prefill speed seen (docs/results.md)
CHUNK_SIZE = 1024


@torch.inference_mode()
def prefill(model: PreTrainedModel, ids: torch.Tensor, chunk_size: int = CHUNK_SIZE, progress: bool = False,
            cache: DynamicCache | None = None, on_chunk: ChunkHook | None = None,
            capacity: int | None = None, cache_dtype: torch.dtype | None = None) -> DynamicCache:
    """The KV cache of all but the last token of `ids`, filled `chunk_size` tokens per forward pass.

    Given a `cache` that already holds a prefix of `ids`, only the rest is read. Chunks end at multiples of
    `chunk_size` counted from the first token, so a prefill resumed from a chunk boundary runs exactly the
    forward passes of one from scratch. `on_chunk(end, cache)` runs after each chunk (it may raise to stop).
    `capacity`: the positions a cache made here will hold (prompt and answer), allocated at once; `cache_dtype`
    what it stores keys and values in (None: the model's dtype; see `kv_cache`). After each
    chunk the memory its intermediates freed is given back (`allocator`), so chunks do not pile up held pages.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk size must be positive, got {chunk_size}")
    n = ids.shape[1]
    cache = cache if cache is not None else new_cache(model.config, capacity, cache_dtype)
    done = cache.get_seq_length()
    if done > max(n - 1, 0):
        raise ValueError(f"the cache holds {done} tokens, more than the {n - 1} to prefill")
    with tqdm(total=n - 1, initial=done, unit="tok", desc="prefill", file=sys.stderr, disable=not progress) as bar:
        start = done
        while start < n - 1:
            end = min(n - 1, (start // chunk_size + 1) * chunk_size)
            model(ids[:, start:end], **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1)
            return_freed_memory()
            bar.update(end - start)
            if on_chunk is not None:
                on_chunk(end, cache)
            start = end
    return cache


def pad_id(tokenizer) -> int | None:
    """The id `generate` pads with: the tokenizer's pad token, else its end-of-sequence token."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def sampling(temperature: float, top_p: float = 1.0) -> dict:
    """`generate` options for OpenAI-style sampling: greedy at temperature 0, else temperature and top-p only."""
    if temperature == 0:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}


@torch.inference_mode()
def answer(model: PreTrainedModel, ids: torch.Tensor, cache: DynamicCache, max_new_tokens: int,
           pad_token_id: int | None, streamer=None, options: dict | None = None,
           stopping_criteria=None) -> torch.Tensor:
    """Continuation of `ids` from its pre-filled cache (greedy unless `options` say otherwise); new ids of row 0.

    Within the applied plan's limit, `generate`'s reminder about passing the model's maximum length is not shown.
    """
    applied = settings(model)
    within_plan = applied is not None and ids.shape[1] + max_new_tokens <= applied.max_length
    with length_reminder_held_back(within_plan):
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(model, cache),
                             max_new_tokens=max_new_tokens, streamer=streamer, pad_token_id=pad_token_id,
                             stopping_criteria=stopping_criteria, **(options or {"do_sample": False}))
    return out[0, ids.shape[1]:]


def respond(model: PreTrainedModel, tokenizer, ids: torch.Tensor, max_new_tokens: int, chunk_size: int = CHUNK_SIZE,
            cache_dtype: torch.dtype | None = None) -> str:
    """The greedy answer to prompt `ids` (row 0), read in chunks: the loop behind eval and calibrate."""
    cache = prefill(model, ids, chunk_size, capacity=ids.shape[1] + max_new_tokens, cache_dtype=cache_dtype)
    return tokenizer.decode(answer(model, ids, cache, max_new_tokens, pad_id(tokenizer)), skip_special_tokens=True)

"""Negative log-likelihood of every token of a long document, computed chunk by chunk over a KV cache.

Only the scored positions' logits are computed, one chunk at a time, so a 64K-token document fits in
memory whatever the vocabulary. `truncated_nll` is the floor without any extension: each token scored
from a fresh window of at most C tokens before it, as a model that reads only its training length would.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from ..kv_cache import new_cache
from ..transformers_compat import cache_kwargs


def _check(ids: torch.Tensor) -> None:
    if ids.shape[0] != 1 or ids.shape[1] < 2:
        raise ValueError(f"need one row of at least 2 tokens, got shape {tuple(ids.shape)}")


def _window_nll(model: PreTrainedModel, window: torch.Tensor, first: int, chunk_size: int, on_chunk,
                cache_dtype: torch.dtype | None = None) -> torch.Tensor:
    """NLL of tokens first+1..end of `window` (1×m) given the window before them, from one fresh cache (keys and
    values stored in `cache_dtype`, None: the model's)."""
    m = window.shape[1]
    cache = new_cache(model.config, m, cache_dtype)
    out = []
    for start in range(0, m - 1, chunk_size):
        end = min(m - 1, start + chunk_size)
        keep = max(0, end - max(start, first))  # scored positions form a suffix of the chunk
        logits = model(window[:, start:end], **cache_kwargs(model, cache), use_cache=True,
                       logits_to_keep=max(keep, 1)).logits[0].float()
        if keep:
            out.append(F.cross_entropy(logits[-keep:], window[0, end - keep + 1:end + 1], reduction="none").cpu())
        if on_chunk is not None:
            on_chunk(end - start)
    return torch.cat(out)


@torch.inference_mode()
def token_nll(model: PreTrainedModel, ids: torch.Tensor, chunk_size: int = 1024, on_chunk=None,
              cache_dtype: torch.dtype | None = None) -> torch.Tensor:
    """NLL (nats) of tokens 1..n-1 of `ids` (shape 1×n) given all before them; float32, shape n-1."""
    _check(ids)
    return _window_nll(model, ids, 0, chunk_size, on_chunk, cache_dtype)


@torch.inference_mode()
def truncated_nll(model: PreTrainedModel, ids: torch.Tensor, context: int, stride: int, chunk_size: int = 1024,
                  on_chunk=None) -> torch.Tensor:
    """NLL of tokens 1..n-1 of `ids` when the model reads at most `context` tokens: windows of `context` tokens
    moved `stride` at a time, each scoring its last `stride` tokens (their context: context - stride .. context - 1;
    the first window scores all of its tokens). Equals `token_nll` when n <= context; costs n/stride windows."""
    _check(ids)
    if not 1 <= stride < context:
        raise ValueError(f"need 1 <= stride < context, got stride {stride} and context {context}")
    n = ids.shape[1]
    end = min(context, n)
    parts = [_window_nll(model, ids[:, :end], 0, chunk_size, on_chunk)]
    while end < n:
        nxt = min(end + stride, n)
        window = ids[:, nxt - context:nxt]
        parts.append(_window_nll(model, window, context - (nxt - end) - 1, chunk_size, on_chunk))
        end = nxt
    return torch.cat(parts)


def bucket_means(nll: torch.Tensor, bucket: int) -> list[float]:
    """Mean NLL over consecutive spans of `bucket` predicted tokens (the last span may be shorter)."""
    return [round(span.mean().item(), 5) for span in nll.split(bucket)]

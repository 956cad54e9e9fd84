"""Negative log-likelihood of every token of a long document, computed chunk by chunk over a KV cache.

Only one chunk's logits exist at a time, so a 64K-token document fits in memory whatever the vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache, PreTrainedModel

from ..transformers_compat import cache_kwargs


@torch.inference_mode()
def token_nll(model: PreTrainedModel, ids: torch.Tensor, chunk_size: int = 1024, on_chunk=None) -> torch.Tensor:
    """NLL (nats) of tokens 1..n-1 of `ids` (shape 1×n) given all before them; float32, shape n-1."""
    if ids.shape[0] != 1 or ids.shape[1] < 2:
        raise ValueError(f"need one row of at least 2 tokens, got shape {tuple(ids.shape)}")
    n = ids.shape[1]
    cache = DynamicCache(config=model.config)
    out = torch.empty(n - 1, dtype=torch.float32)
    for start in range(0, n - 1, chunk_size):
        end = min(n - 1, start + chunk_size)
        logits = model(ids[:, start:end], **cache_kwargs(model, cache), use_cache=True).logits[0].float()
        out[start:end] = F.cross_entropy(logits, ids[0, start + 1:end + 1], reduction="none").cpu()
        if on_chunk is not None:
            on_chunk(end - start)
    return out


def bucket_means(nll: torch.Tensor, bucket: int) -> list[float]:
    """Mean NLL over consecutive spans of `bucket` predicted tokens (the last span may be shorter)."""
    return [round(span.mean().item(), 5) for span in nll.split(bucket)]

"""Merging attention partials by their log-sum-exp: exact, so attention can be split over key sets."""

from __future__ import annotations

import torch


def merge_states(outputs: list[torch.Tensor], lses: list[torch.Tensor]) -> torch.Tensor:
    """Combine partial outputs [b, h, n, d] over disjoint key sets with lses [b, h, n] (-inf: no keys).

    Returns float32, accumulated in place. Rows with no key in any partial come out as zeros.
    """
    if len(outputs) == 1:
        return outputs[0].float().masked_fill(lses[0].isneginf()[..., None], 0.0)
    lse = torch.stack(lses)
    peak = lse.amax(dim=0).clamp_min(torch.finfo(torch.float32).min)
    weights = torch.exp(lse - peak)[..., None]  # [parts, b, h, n, 1]
    merged = outputs[0].float() * weights[0]
    for weight, output in zip(weights[1:], outputs[1:]):
        merged.addcmul_(output, weight)
    return merged.div_(weights.sum(dim=0).clamp_min(torch.finfo(torch.float32).tiny))

"""Merging attention partials by their log-sum-exp: exact, so attention can be split over key sets."""

from __future__ import annotations

import torch


def merge_states(outputs: list[torch.Tensor], lses: list[torch.Tensor]) -> torch.Tensor:
    """Combine partial outputs [b, h, n, d] over disjoint key sets with lses [b, h, n] (-inf: no keys).

    Rows with no key in any partial come out as zeros.
    """
    if len(outputs) == 1:
        return outputs[0].float().nan_to_num(0.0) if torch.isinf(lses[0]).any() else outputs[0].float()
    lse = torch.stack(lses)
    peak = lse.amax(dim=0).clamp_min(torch.finfo(torch.float32).min)
    weights = torch.exp(lse - peak)  # [parts, b, h, n]
    total = weights.sum(dim=0)
    merged = sum(w[..., None] * o.float() for w, o in zip(weights, outputs))
    return merged / total.clamp_min(torch.finfo(torch.float32).tiny)[..., None]

"""One attention partial with its log-sum-exp, over a given key set and small boolean mask."""

from __future__ import annotations

import torch

from . import few_native
from .merge import merge_states


def attend(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, scale: float,
    causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of query [b, hq, n, d] over key/value [b, hkv, m, d] (GQA allowed).

    mask: bool, broadcastable to [b, 1, n, m], True where attended; or causal: query t sees keys 0..t
    (top-left, as SDPA's is_causal), which the CPU kernel does without a mask. Keys and values may be held in
    another dtype than the query (a float16 KV cache): they are read as the query's. Returns (output [b, hq, n, d],
    lse [b, hq, n] in float32), output 0 and lse -inf on rows that see no key. Under autograd the explicit form runs,
    since the fused kernel's lse carries no gradient and merging partials needs it.
    """
    if query.device.type == "cpu" and not needs_grad(query, key, value):
        few_rows = not causal and query.shape[1] // key.shape[1] * query.shape[2] <= FEW_ROWS  # a decode step's
        if few_rows and query.dtype == torch.float32 and key.dtype in few_native.KV_DTYPES \
                and few_native.available():
            few = few_native.attend_few_op if torch.compiler.is_compiling() else few_native.attend_few
            return _no_key_rows(*few(query, key, value, mask, scale), mask)
        if key.dtype != query.dtype:
            return _widened(query, key, value, mask, scale, causal)
        if few_rows and key.shape[2] > FEW_KEYS:
            return _no_key_rows(*_attend_few(query, key, value, mask, scale), mask)
        # the CPU flash kernel reads the head dimension as unit-stride: other strides give wrong sums (torch 2.13)
        query, key, value = (t if t.stride(-1) == 1 else t.contiguous() for t in (query, key, value))
        float_mask = None
        if mask is not None:
            float_mask = torch.zeros(mask.shape, dtype=query.dtype).masked_fill_(~mask, float("-inf"))
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, is_causal=causal, attn_mask=float_mask, scale=scale
        )
        return _no_key_rows(out, lse, mask)
    if causal:
        n, m = query.shape[2], key.shape[2]
        mask = torch.ones(n, m, dtype=torch.bool, device=query.device).tril()[None, None]
    return _no_key_rows(*_attend_math(query, key, value, mask, scale), mask)


WIDEN_KEYS = 4096  # keys of another dtype widened to the query's at a time, so a call copies a bounded range


def _widened(query, key, value, mask, scale, causal):
    """`attend` over keys and values held in another dtype (a float16 cache), widened to the query's
    `WIDEN_KEYS` at a time, the ranges' partials merged; a causal call (a diagonal tile) is widened whole."""
    m = key.shape[2]
    if causal or m <= WIDEN_KEYS:
        return attend(query, key.to(query.dtype), value.to(query.dtype), mask, scale, causal)
    outputs, lses = [], []
    for s0 in range(0, m, WIDEN_KEYS):
        keys = slice(s0, s0 + WIDEN_KEYS)
        part = None if mask is None else mask[..., keys] if mask.shape[-1] == m else mask
        out, lse = attend(query, key[:, :, keys].to(query.dtype), value[:, :, keys].to(query.dtype), part, scale)
        outputs.append(out)
        lses.append(lse)
    return merge_states(outputs, lses).to(query.dtype), torch.logsumexp(torch.stack(lses), dim=0)


def attend_merged(first: few_native.Triple, second: few_native.Triple, scale: float) -> torch.Tensor | None:
    """Softmax attention over two unmasked key sets, each (query, key, value) with its own query: the merge of
    their two `attend` partials, in one call of the native kernel where it takes them (a decode step's rows,
    float32 on CPU, no autograd). Returns the output [b, hq, n, d], or None where the kernel does not run (the
    caller then merges two partials)."""
    query, key = first[0], first[1]
    if query.device.type != "cpu" or query.dtype != torch.float32 or needs_grad(*first, *second) \
            or key.dtype not in few_native.KV_DTYPES or second[1].dtype != key.dtype \
            or query.shape[1] // key.shape[1] * query.shape[2] > FEW_ROWS or not few_native.available():
        return None
    if torch.compiler.is_compiling():
        return few_native.attend_two_op(*first, *second, scale)[0]
    return few_native.attend_two(first, second, scale)[0]


FEW_ROWS = 16  # query rows per key/value head (a decode step's heads) up to which the few-row paths run:
# the native kernel (float32, any number of keys), else torch's _attend_few over more keys than FEW_KEYS;
FEW_KEYS = 2048  # over fewer, the flash kernel's one call costs less than _attend_few's dozen (a sliding
# window's 512 keys: 0.11 against 0.28 ms for Gemma's 4 heads, 0.11 against 0.31 for SmolLM2's 9)
SPLITS = 8  # key ranges _attend_few's value product is split into, one batch entry each


def _attend_few(query, key, value, mask, scale):
    """A few query rows (a decode step) on CPU in torch (other dtypes, or no C compiler): two GEMMs that read K and
    V once each.

    The flash kernel runs such a call on one thread and reads K and V once per query head; here the heads
    sharing a key/value head are folded into rows, the logits come from K @ q (the layout the CPU GEMM
    streams fastest), and the value product is split along the keys into a batch, so every core reads part.
    """
    b, hq, n, d = query.shape
    hkv, m = key.shape[1], key.shape[2]
    rows = hq // hkv * n
    folded = query.reshape(b, hkv, rows, d)
    logits = torch.matmul(key, folded.transpose(-1, -2)).transpose(-1, -2).float().mul_(scale).contiguous()
    logits = logits.reshape(b, hkv, hq // hkv, n, m)
    if mask is not None:
        logits.masked_fill_(~mask[:, :, None], float("-inf"))
    peak = logits.amax(dim=-1, keepdim=True).clamp_min_(torch.finfo(torch.float32).min)
    probs = logits.sub_(peak).exp_()
    total = probs.sum(dim=-1, keepdim=True)
    lse = (peak + total.log()).squeeze(-1)  # -inf where no key is seen (total 0)
    probs = probs.div_(total.clamp_min_(torch.finfo(torch.float32).tiny)).to(value.dtype)
    probs = probs.reshape(b * hkv, rows, m)
    values = value.reshape(b * hkv, m, d)
    step = m // SPLITS
    if step:
        split = torch.matmul(probs[:, :, :step * SPLITS].reshape(b * hkv, rows, SPLITS, step).transpose(1, 2),
                             values[:, :step * SPLITS].reshape(b * hkv, SPLITS, step, d))
        out = split.sum(dim=1)
        if step * SPLITS < m:
            out += torch.matmul(probs[:, :, step * SPLITS:], values[:, step * SPLITS:])
    else:
        out = torch.matmul(probs, values)
    return out.reshape(b, hq, n, d).to(query.dtype), lse.reshape(b, hq, n)


def _no_key_rows(out: torch.Tensor, lse: torch.Tensor, mask: torch.Tensor | None):
    """Rows whose mask hides every key: output 0 and lse -inf, whatever the kernel left there."""
    if mask is not None:
        sees_a_key = mask.any(dim=-1)
        lse = lse.masked_fill(~sees_a_key, float("-inf"))
        out = out.masked_fill(~sees_a_key[..., None], 0.0)
    return out, lse


def needs_grad(*tensors: torch.Tensor) -> bool:
    """Whether autograd will track an operation on these tensors."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _attend_math(query, key, value, mask, scale):
    """Portable fallback (any device): explicit logits for this partial only, never the whole n×n matrix.

    Query heads sharing a key/value head are folded into its rows, so K and V are never repeated.
    """
    b, hq, n, d = query.shape
    hkv, m = key.shape[1], key.shape[2]
    folded = query.float().reshape(b, hkv, hq // hkv * n, d)
    logits = torch.matmul(folded, key.float().transpose(-1, -2)).mul_(scale).view(b, hkv, hq // hkv, n, m)
    if mask is not None:
        logits = logits.masked_fill(~mask[:, :, None], float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)
    probs = torch.exp(logits - lse.clamp_min(torch.finfo(torch.float32).min)[..., None])
    out = torch.matmul(probs.view(b, hkv, hq // hkv * n, m), value.float())
    return out.view(b, hq, n, d).to(query.dtype), lse.view(b, hq, n)

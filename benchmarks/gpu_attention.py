"""GPU: SelfExtend attention (FlexAttention backend) vs vanilla causal SDPA, side by side, one process.

Checks exactness against the eager oracle first, then times prefill (one attention layer, bf16) at
each length for a Llama-shaped and a Gemma-3-shaped layer, a decode step, and the naive formulation
with two n×n logit matrices. Prints times, peak memory and ratios.

    python benchmarks/gpu_attention.py --lengths 32768,65536,131072
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from selfextend.attention import flex
from selfextend.attention.layout import KVLayout, resolve_geometry
from selfextend.attention.reference import reference_attention
from selfextend.rotary import GroupedRotation, RopeSource

SHAPES = {"llama": (32, 8, 128), "gemma3": (4, 1, 256)}  # query heads, kv heads, head dim
GROUP, WINDOW = 8, 4096


def _rotation(head_dim: int, device) -> GroupedRotation:
    holder = torch.nn.Module()
    holder.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)))
    return GroupedRotation(GROUP, WINDOW, RopeSource(holder, "inv_freq"))


def _inputs(shape, n_queries, n_keys, dtype, seed=0):
    hq, hkv, d = shape
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(1, hq, n_queries, d, device="cuda", dtype=dtype, generator=g)
    k = torch.randn(1, hkv, n_keys, d, device="cuda", dtype=dtype, generator=g)
    v = torch.randn(1, hkv, n_keys, d, device="cuda", dtype=dtype, generator=g)
    geometry = resolve_geometry(KVLayout(n_keys - n_queries, 0), None, 1, n_queries, n_keys, torch.device("cuda"))
    return q, k, v, geometry


def _time(fn, reps=5):
    fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2], (torch.cuda.max_memory_allocated() - base) / 2**20


def _vanilla(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1, enable_gqa=True)


def _naive(q, k, v, geometry, rotation, scale):
    """The original formulation: two full n×n logit matrices, then a select and one softmax."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    qg, kg = rotation(q, geometry.query_positions, "query"), rotation(k, geometry.key_positions, "key")
    n = q.shape[2]
    d = torch.arange(n, device=q.device)[:, None] - torch.arange(n, device=q.device)
    logits = torch.where(d < WINDOW, q @ k.transpose(-1, -2), qg @ kg.transpose(-1, -2)) * scale
    return torch.softmax(logits.masked_fill(d < 0, float("-inf")), -1) @ v


def check() -> None:
    for name, shape in SHAPES.items():
        for n_q, n_k, pads in [(6000, 6000, [0]), (1, 6000, [0]), (700, 6000, [0]), (5000, 5000, [0, 900])]:
            q, k, v, geometry = _inputs(shape, n_q, n_k, torch.float32)
            if len(pads) > 1:
                q, k, v = (t.expand(2, -1, -1, -1).contiguous() for t in (q, k, v))
                valid = torch.arange(n_k, device="cuda")[None] >= torch.tensor(pads, device="cuda")[:, None]
                position_ids = (valid.long().cumsum(-1) - 1)[:, -n_q:]
                geometry = resolve_geometry(KVLayout(0, 0, valid), position_ids, 2, n_q, n_k, torch.device("cuda"))
            rotation = _rotation(shape[2], "cuda")
            expected = reference_attention(q, k, v, geometry, rotation, shape[2] ** -0.5)
            rows = geometry.query_positions >= 0
            for dtype, tol in [(torch.float32, 2e-3), (torch.bfloat16, 3e-2)]:
                got = flex.selfextend_attention(q.to(dtype), k.to(dtype), v.to(dtype), geometry, rotation,
                                                shape[2] ** -0.5)
                err = (got.float()[rows] - expected[rows]).abs().max().item()
                print(f"check {name:<6} q={n_q:<5} k={n_k:<5} pads={pads!s:<9} {str(dtype)[6:]:<8} "
                      f"max|err|={err:.2e} {'ok' if err < tol else 'FAIL'}", flush=True)


def bench(lengths: list[int], decode_lengths: list[int]) -> None:
    print(f"\nprefill, one layer, bf16, G={GROUP} W={WINDOW}")
    print(f"{'shape':<7} {'tokens':>7} {'vanilla ms':>11} {'SE ms':>9} {'time ×':>7} {'vanilla MiB':>12} {'SE MiB':>9}"
          f" {'naive ms':>9}")
    for name, shape in SHAPES.items():
        rotation = _rotation(shape[2], "cuda")
        for n in lengths:
            q, k, v, geometry = _inputs(shape, n, n, torch.bfloat16)
            base = q.numel() * 2 * 2 + k.numel() * 2 * 2
            tv, mv = _time(lambda: _vanilla(q, k, v))
            ts, ms = _time(lambda: flex.selfextend_attention(q, k, v, geometry, rotation, shape[2] ** -0.5))
            try:
                tn, _ = _time(lambda: _naive(q, k, v, geometry, rotation, shape[2] ** -0.5), reps=1)
                naive = f"{tn:>9.1f}"
            except torch.OutOfMemoryError:
                naive = f"{'OOM':>9}"
            torch.cuda.empty_cache()
            print(f"{name:<7} {n:>7} {tv:>11.2f} {ts:>9.2f} {ts / tv:>7.2f} {mv:>12.0f} {ms:>9.0f} {naive}"
                  f"   (inputs {base / 2**20:.0f} MiB)", flush=True)
    print("\ndecode step, one layer, bf16")
    for name, shape in SHAPES.items():
        rotation = _rotation(shape[2], "cuda")
        for n in decode_lengths:
            q, k, v, geometry = _inputs(shape, 1, n, torch.bfloat16)
            tv, _ = _time(lambda: _vanilla(q, k, v), reps=20)
            ts, _ = _time(lambda: flex.selfextend_attention(q, k, v, geometry, rotation, shape[2] ** -0.5), reps=20)
            print(f"{name:<7} cache {n:>7}: vanilla {tv * 1e3:8.1f} us, SelfExtend {ts * 1e3:8.1f} us, "
                  f"× {ts / tv:.2f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="32768,65536,131072")
    parser.add_argument("--decode", default="32768,131072")
    parser.add_argument("--skip-check", action="store_true")
    args = parser.parse_args()
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    if not args.skip_check:
        check()
    bench([int(x) for x in args.lengths.split(",")], [int(x) for x in args.decode.split(",")])


if __name__ == "__main__":
    main()

"""Where a prefill chunk should leave the native paged kernel for the blockwise one (the vLLM plugin's
`NATIVE_KEYS`): one request's chunk of q queries over n keys, read by the native C kernel from paged blocks,
against the blockwise kernel over the same keys gathered (as the plugin runs long chunks). The native kernel
costs about the same per query·key·head·dimension product at any size; the blockwise kernel adds a fixed
cost per request, and is faster per product on large chunks, the more so the fewer queries over more keys. Ratios native / blockwise, measured in this run.

    python benchmarks/paged_native_crossover.py      # from the repository root; quiet machine
"""
import time

import torch

from selfextend.attention import KVLayout, resolve_backend, resolve_geometry
from selfextend.attention.paged_native import NATIVE_KEYS, native_paged_attention, native_step
from selfextend.rotary import GroupedRotation, RopeSource

blockwise = resolve_backend("blockwise", torch.device("cpu"))


def _seconds(f) -> float:
    f()
    start, runs = time.perf_counter(), 0
    while time.perf_counter() - start < 1.0:
        f()
        runs += 1
    return (time.perf_counter() - start) / runs


def compare(query_heads: int, heads: int, dim: int, q: int, n: int, block_size: int = 16) -> None:
    torch.manual_seed(0)
    frequencies = torch.nn.Module()
    frequencies.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, dim, 2).float() / dim))
    rotation = GroupedRotation(6, 32, RopeSource(frequencies, "inv_freq"))
    count = -(-n // block_size)
    keys, grouped = torch.randn(count, heads, dim, block_size), torch.randn(count, heads, dim, block_size)
    values = torch.randn(count, heads, block_size, dim)
    query = torch.randn(q, query_heads, dim)
    out = torch.empty_like(query)

    def native() -> None:
        step = native_step(torch.arange(count)[None], torch.tensor([n]), torch.tensor([0, q]), torch.tensor([0]),
                           rotation)
        native_paged_attention(query, out, keys, values, step, 0.1, grouped)

    def gathered(x: torch.Tensor) -> torch.Tensor:  # [count, heads, d, block] -> [1, heads, n, d]
        return x.permute(1, 0, 3, 2).reshape(1, heads, -1, dim)[:, :, :n].contiguous()

    k, v, g = gathered(keys), gathered(values.transpose(-1, -2)), gathered(grouped)
    geometry = resolve_geometry(KVLayout(q_offset=n - q, kv_offset=0), None, 1, q, n, query.device)

    def block() -> None:
        blockwise.selfextend(query.transpose(0, 1)[None], k, v, geometry, rotation, 0.1, g)

    a, b = _seconds(native), _seconds(block)
    print(f"{query_heads:>3} {heads:>3} {dim:>4} {q:>5} {n:>6} {'native' if n <= NATIVE_KEYS else 'blockwise':>9}"
          f" {a * 1e3:9.2f} {b * 1e3:9.2f} {a / b:6.2f}")


print(f"{'hq':>3} {'h':>3} {'d':>4} {'q':>5} {'n':>6} {'plugin':>9} {'native ms':>9} {'block ms':>9} {'ratio':>6}")
for shape in [(4, 4, 32, 500, 500), (4, 4, 32, 1024, 1024), (4, 4, 32, 2048, 2048), (4, 4, 32, 256, 4096),
              (9, 3, 64, 512, 512), (9, 3, 64, 1024, 1024), (9, 3, 64, 512, 4096),
              (4, 4, 32, 64, 1024), (4, 4, 32, 64, 2048), (4, 4, 32, 256, 2048),
              (4, 1, 256, 256, 256), (4, 1, 256, 512, 512), (4, 1, 256, 64, 1024), (4, 1, 256, 64, 2048),
              (4, 1, 256, 256, 4096), (4, 1, 256, 2048, 8192)]:
    compare(*shape)

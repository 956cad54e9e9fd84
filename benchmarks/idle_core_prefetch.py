"""Would fetching the next layer's int8 weights on the idle core, while the current layer's Python runs, speed up
a decode step? (An experiment; its result is in docs/results.md, session 25.)

1. Gemma 3 270M's four per-layer products (q/k/v 1536 x 640, o 640 x 1024, gate/up 4096 x 640, down 640 x 2048;
   int8 blocks of random weights) over 18 layers: read from memory (the layers in turn, 100 MB, past the L3)
   against read from the L3 (the same layer again).
2. A simulated layer: about 0.4 ms of small torch operators (a layer's Python), then its four products; with a C
   helper thread (`idle_core_prefetch.c`) told at the layer's start to read the next layer's weights, against
   without, alternating. OpenMP's wait policy is read when torch starts, so compare runs of this script under
   `OMP_WAIT_POLICY=PASSIVE` and without.

    python benchmarks/idle_core_prefetch.py
    OMP_WAIT_POLICY=PASSIVE python benchmarks/idle_core_prefetch.py
"""

from __future__ import annotations

import ctypes
import os
import statistics
import time
from pathlib import Path

import torch

from selfextend import native
from selfextend.linear_native import Int8Blocks, linear

SHAPES = {"qkv": (1536, 640), "o": (640, 1024), "gate_up": (4096, 640), "down": (640, 2048)}
LAYERS = 18


def products(layer: dict, inputs: dict) -> None:
    for name in SHAPES:
        linear(inputs[name], layer[name])


def python_work(h: torch.Tensor, ops: int = 60) -> torch.Tensor:
    for _ in range(ops):
        h = h * 1.0001 + 0.0
    return h


def buffers(layer: dict):
    """The layer's int8 rows and scales as the helper's argument arrays."""
    tensors = [t for blocks in layer.values() for t in (blocks.rows, blocks.scale)]
    pointers = (ctypes.c_char_p * len(tensors))(*[ctypes.c_char_p(t.data_ptr()) for t in tensors])
    sizes = (ctypes.c_size_t * len(tensors))(*[t.numel() * t.element_size() for t in tensors])
    return pointers, sizes, len(tensors)


def main() -> None:
    torch.manual_seed(0)
    layers = [{name: Int8Blocks.quantize(torch.randn(*shape)) for name, shape in SHAPES.items()}
              for _ in range(LAYERS)]
    inputs = {name: torch.randn(1, shape[1]) for name, shape in SHAPES.items()}
    size = sum(rows * columns * 1.0625 for rows, columns in SHAPES.values())
    helper = native.load(Path(__file__).with_name("idle_core_prefetch.c"))
    told = [buffers(layer) for layer in layers]
    h = torch.randn(1, 640)
    print(f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}, {torch.get_num_threads()} threads")
    with torch.inference_mode():
        for _ in range(3):
            start = time.perf_counter()
            for layer in layers:
                products(layer, inputs)
            cold = (time.perf_counter() - start) / LAYERS
            warm = []
            for layer in layers:
                products(layer, inputs)
                start = time.perf_counter()
                products(layer, inputs)
                warm.append(time.perf_counter() - start)
            warm = statistics.median(warm)
            print(f"products of a layer: from memory {cold * 1e6:.0f} us ({size / cold / 1e9:.1f} GB/s), from the "
                  f"L3 {warm * 1e6:.0f} us ({size / warm / 1e9:.1f} GB/s): {cold / warm:.2f}x")

        def step(prefetch: bool) -> float:
            start = time.perf_counter()
            for index, layer in enumerate(layers):
                if prefetch:
                    helper.se_prefetch(*told[(index + 1) % LAYERS])
                python_work(h)
                helper.se_busy(1)
                products(layer, inputs)
                helper.se_busy(0)
            return (time.perf_counter() - start) / LAYERS

        rounds = {False: [], True: []}
        for prefetch in [False, True] * 8:
            rounds[prefetch].append(statistics.median(step(prefetch) for _ in range(5)))
        plain, fetched = statistics.median(rounds[False]), statistics.median(rounds[True])
        print(f"simulated layer: {plain * 1e3:.3f} ms without the helper, {fetched * 1e3:.3f} ms with it "
              f"({plain / fetched:.2f}x; 8 alternating rounds, medians)")


if __name__ == "__main__":
    main()

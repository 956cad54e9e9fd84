"""The decode attention kernel alone (`few_native.attend_two`), its keys and values read from memory: the embedded
Gemma 3 270M's full-layer shape (4 query heads over 1 KV head of 256, a float16 cache), 512 neighbor keys and the
rest grouped, as a decode step calls it. A 512 MB write between calls evicts the cache as a step's weights do;
medians of `--calls`. Run it under an older checkout's `src` on PYTHONPATH to time that one's kernel.

    python benchmarks/decode_kernel.py --tokens 16384,40960
    PYTHONPATH=/tmp/before/src python benchmarks/decode_kernel.py --tokens 16384,40960
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from selfextend.attention import few_native


def _problem(keys: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.randn(1, 4, 1, 256), torch.randn(1, 1, keys, 256).half(), torch.randn(1, 1, keys, 256).half()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default="16384,40960", help="comma-separated cache lengths")
    parser.add_argument("--calls", type=int, default=30)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.manual_seed(0)
    junk, rows = torch.ones(1 << 27), []
    for tokens in map(int, args.tokens.split(",")):
        near, far = _problem(512), _problem(tokens - 512)
        times = []
        for _ in range(args.calls):
            junk.add_(1)
            start = time.perf_counter()
            few_native.attend_two(near, far, 0.0625)
            times.append(time.perf_counter() - start)
        ms = statistics.median(times) * 1e3
        print(f"{tokens} keys: {ms:.3f} ms a call, {tokens / ms / 1e3:.1f} M keys/s ({few_native.__file__})")
        rows.append({"tokens": tokens, "ms": ms, "calls_ms": [t * 1e3 for t in times]})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"kernel": few_native.__file__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

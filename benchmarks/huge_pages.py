"""The LM head's int8 product read from memory, its rows in 4 KB pages (torch's memory) against huge pages
(`allocator.huge_page_empty`, what `Int8Blocks.quantize` gives): the embedded Gemma 3 270M's shape (262144 × 640),
random weights, one token. Between reads a 1 GB write evicts the rows from every cache, as a decode step's other
weights do; the two layouts alternate, medians of `--reads`.

    python benchmarks/huge_pages.py --reads 12
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from selfextend.linear_native import Int8Blocks, linear


def _huge_kib() -> int:
    return int(open("/proc/self/smaps_rollup").read().split("AnonHugePages:")[1].split()[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=262144)
    parser.add_argument("--inputs", type=int, default=640)
    parser.add_argument("--reads", type=int, default=12)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.manual_seed(0)
    huge_before = _huge_kib()
    huge = Int8Blocks.quantize(torch.randn(args.rows, args.inputs))
    huge_kib = _huge_kib() - huge_before
    small = Int8Blocks(huge.rows.clone(), huge.scale.clone())  # torch's memory: 4 KB pages here
    assert huge.rows.data_ptr() % (2 << 20) == 0
    x, junk = torch.randn(1, args.inputs), torch.ones(1 << 28)
    assert torch.equal(linear(x, small), linear(x, huge))
    times = {"4 KB pages": [], "huge pages": []}
    for i in range(args.reads):
        for name, blocks in sorted(((n, b) for n, b in zip(times, (small, huge))), reverse=bool(i % 2)):
            junk.add_(1)
            start = time.perf_counter()
            linear(x, blocks)
            times[name].append((time.perf_counter() - start) * 1e3)
    medians = {name: statistics.median(t) for name, t in times.items()}
    print(f"{args.rows} x {args.inputs} int8, one token, read from memory ({huge_kib // 1024} MiB in huge pages): "
          f"4 KB pages {medians['4 KB pages']:.2f} ms, huge pages {medians['huge pages']:.2f} ms, "
          f"{medians['4 KB pages'] / medians['huge pages']:.3f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": args.rows, "inputs": args.inputs, "huge_mib": huge_kib / 1024, "ms": times,
                       "medians": medians}, f, indent=1)


if __name__ == "__main__":
    main()

"""Which CPU kernels could hold lighter weights: one decode-step matrix-vector product per kernel and shape.

A decode step multiplies one token's activations by every weight matrix, so each kernel is timed on [1, K] @ W^T
for Gemma 3 270M's shapes (the tied 262144 × 640 head and the layers' projections). Times are printed as
ratios to the dense float32 product in the same run, with each kernel's largest difference from the product of
the weights it holds (its own quantization error is not counted):

- float16: fbgemm's packed fp16 GEMM (`--weights float16`);
- int8 blocks: the project's C kernel, int8 in blocks of 32 with a scale each (`--weights int8`);
- int8 weight-only: torch's `_weight_int8pack_mm` (one scale per row);
- int4 weight-only: torch's `_weight_int4pack_mm_for_cpu` (groups of 32, scale and zero point);
- bfloat16: plain `F.linear` in bfloat16 (activations too).

    python benchmarks/weight_kernels.py [--repeat 30] [--json PATH]

With `--step-against CHECKOUT`, instead: one decode step's int8 products of the embedded Gemma 3 270M (every
projection and the head, from the packed model) with this checkout's kernel and CHECKOUT's `linear_native.c`,
in alternating rounds in one process (the machine's speed moves by tens of percent within minutes), checked to
give the same numbers.

    python benchmarks/weight_kernels.py --step-against /tmp/before [--rounds 40]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from selfextend import linear_native
from selfextend.linear_native import Int8Blocks

SHAPES = [(262144, 640), (2048, 640), (640, 2048), (1024, 640), (256, 640)]  # Gemma 3 270M: head, MLP, attention
GROUP = 32  # int4 group size


def _seconds(call, repeat: int) -> float:
    for _ in range(3):
        call()
    start = time.perf_counter()
    for _ in range(repeat):
        call()
    return (time.perf_counter() - start) / repeat


def _int4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Packed int4 weights, their scales and zero points as the CPU kernel takes them, and what they hold."""
    rows, cols = weight.shape
    groups = weight.reshape(rows, cols // GROUP, GROUP)
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    scale = (high - low).clamp(min=1e-6) / 15
    codes = torch.round((groups - low) / scale).clamp(0, 15)
    held = (codes * scale + low).reshape(rows, cols)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).reshape(rows, cols), 1)
    # the kernel computes (code - 8) * scale + zero, so zero = low + 8 * scale
    scales_and_zeros = torch.stack([scale.squeeze(-1).T, (low + 8 * scale).squeeze(-1).T], -1).contiguous()
    return packed, scales_and_zeros, held


def measure(rows: int, cols: int, repeat: int) -> dict:
    weight, x = torch.randn(rows, cols), torch.randn(1, cols)
    dense = _seconds(lambda: F.linear(x, weight), repeat)
    fp16 = torch.ops.quantized.linear_prepack_fp16(weight, None)
    scale = weight.abs().amax(1) / 127
    int8 = torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8)
    packed, scales_and_zeros, held4 = _int4(weight)
    xb, wb = x.bfloat16(), weight.bfloat16()
    blocks = Int8Blocks.quantize(weight)
    kernels = {
        "float16": (lambda: torch.ops.quantized.linear_dynamic_fp16(x, fp16), weight.half().float()),
        "int8 blocks": (lambda: linear_native.linear(x, blocks), blocks.widen()),
        "int8 weight-only": (lambda: torch._weight_int8pack_mm(x, int8, scale), int8.float() * scale[:, None]),
        "int4 weight-only": (lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, GROUP, scales_and_zeros),
                             held4),
        "bfloat16": (lambda: F.linear(xb, wb).float(), wb.float()),
    }
    row = {"shape": [rows, cols], "dense_ms": dense * 1e3}
    for name, (call, held) in kernels.items():
        error = (call().float() - F.linear(x, held)).abs().max().item()
        row[name] = {"ratio": _seconds(call, repeat) / dense, "max_abs_error": error}
    return row


def step_against(before: str, rounds: int) -> dict:
    """Median ms of one decode step's int8 products with this kernel and `before`'s, alternating rounds."""
    import statistics

    from decode_breakdown import weight_bytes
    from selfextend import models, native
    from selfextend.weights import PackedLinear

    ours = linear_native.library()
    theirs = native.load(Path(before) / "src" / "selfextend" / "linear_native.c")
    theirs.se_linear_int8.restype, theirs.se_linear_int8.argtypes = None, ours.se_linear_int8.argtypes
    model = models.load_model(models.resolve(None), weights="int8")
    products = [(m, torch.randn(1, m.in_features), torch.empty(1, m.out_features))
                for m in model.modules() if isinstance(m, PackedLinear) and m.format == "int8"]

    def step(lib) -> torch.Tensor:
        for m, x, out in products:
            lib.se_linear_int8(x.data_ptr(), 1, m.in_features, m.rows.data_ptr(), m.scale.data_ptr(),
                               m.out_features, m.in_features, None, out.data_ptr(), m.out_features)
        return torch.cat([out.flatten() for _, _, out in products])

    if not torch.equal(step(ours), step(theirs)):
        raise SystemExit("the two kernels give different numbers")
    times: dict[str, list[float]] = {"before": [], "this checkout": []}
    for _ in range(rounds):
        for name, lib in (("before", theirs), ("this checkout", ours)):
            start = time.perf_counter()
            step(lib)
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    return {"products": len(products), "weight_mb": weight_bytes(model) / 1e6, "rounds": rounds,
            "median_ms": medians, "ratio": medians["this checkout"] / medians["before"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--step-against", metavar="CHECKOUT", help="time one decode step's int8 products against "
                        "an older checkout's kernel instead")
    parser.add_argument("--rounds", type=int, default=40, help="alternating rounds for --step-against")
    args = parser.parse_args()
    if args.step_against:
        result = step_against(args.step_against, args.rounds)
        print(f"{result['products']} int8 products, {result['weight_mb']:.0f} MB: before "
              f"{result['median_ms']['before']:.1f} ms, this checkout {result['median_ms']['this checkout']:.1f} ms "
              f"(× {result['ratio']:.2f}), medians of {args.rounds} alternating rounds")
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
        return
    rows = [measure(r, c, args.repeat) for r, c in SHAPES]
    names = [k for k in rows[0] if isinstance(rows[0][k], dict)]
    print(f"{'shape':>14} {'dense ms':>9} " + " ".join(f"{n:>17}" for n in names) + "   (time ÷ dense)")
    for row in rows:
        print(f"{'×'.join(map(str, row['shape'])):>14} {row['dense_ms']:>9.3f} "
              + " ".join(f"{row[n]['ratio']:>17.2f}" for n in names))
    if args.json:
        Path(args.json).write_text(json.dumps({"threads": torch.get_num_threads(), "torch": torch.__version__,
                                               "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

"""SelfExtend ÷ vanilla SDPA on CPU over a grid of model shapes: prefill time and peak memory, decode step.

Every measurement runs in its own fresh process, and the two methods alternate (vanilla, SelfExtend,
vanilla, SelfExtend, …) so that drift in the machine's speed hits both alike; each cell reports the
median of its repeats and the ratio of medians. The model is a 2-layer Llama whose cost is dominated by
attention: 8 query heads of the given head dim, 8 / (q/kv) key-value heads.

    python benchmarks/cpu_grid.py                          # the 8K grid: head dim × GQA × (G, W)
    python benchmarks/cpu_grid.py --preset long            # Llama-, Qwen- and Gemma-like shapes at 32K and 64K
    python benchmarks/cpu_grid.py --preset classic         # the 8 × 64 shape of the README's first table
    python benchmarks/cpu_grid.py --preset smoke           # seconds: checks the script itself
    python benchmarks/cpu_grid.py --json after.json --compare before.json
    python benchmarks/cpu_grid.py --before /tmp/old   # also SelfExtend from an older checkout, in the same rounds

With --before, each round runs vanilla, this checkout's SelfExtend and the older checkout's (its src/ put
first on PYTHONPATH), so the before/after ratios come from the same minutes of the same machine.
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import statistics
import time
from dataclasses import asdict, dataclass

from fresh import competing_process, in_fresh_process

HEADS = 8


@dataclass(frozen=True)
class Cell:
    """One measurement: a shape, SelfExtend's G and W, and the phase (prefill of n tokens, or decode at n)."""

    head_dim: int
    gqa: int
    group: int
    window: int
    tokens: int
    phase: str = "prefill"
    train: int = 16384  # max_position_embeddings of the model; SelfExtend's limit must cover the tokens

    @property
    def label(self) -> str:
        return f"{self.phase} d={self.head_dim} q/kv={self.gqa} G={self.group} W={self.window} n={self.tokens}"


def grid(preset: str) -> list[Cell]:
    if preset == "classic":  # the README's earlier table: 8 × 64, 2 key-value heads, L = 4096, G = 16, W = 1024
        return [Cell(64, 4, 16, 1024, n, train=4096) for n in (4096, 8192, 16384, 32768)] + \
            [Cell(64, 4, 16, 1024, 16384, "decode", train=4096)]
    if preset == "smoke":
        return [Cell(64, 2, 4, 128, 1024, train=512), Cell(64, 2, 4, 128, 1024, "decode", train=512)]
    if preset == "long":  # head dim, GQA of Llama-3-8B (128, 4), Qwen2.5-7B (128, 7 → 8), Gemma 3 (256, 4)
        shapes = [(128, 4, 8, 2048), (128, 8, 8, 4096), (256, 4, 4, 1024)]
        cells = [Cell(d, g, G, W, n, train=32768) for d, g, G, W in shapes for n in (32768, 65536)]
        return cells + [Cell(d, g, G, W, n, "decode", train=32768) for d, g, G, W in shapes for n in (16384, 65536)]
    settings = [(4, 512), (8, 2048), (16, 4096), (16, 8192)]
    return [Cell(d, g, G, W, 8192, train=4096 if W < 4096 else 12288)
            for d, g, (G, W) in itertools.product((64, 128, 256), (1, 4, 8), settings)]


def _model(cell: Cell, method: str):
    import torch
    import transformers

    import selfextend

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=HEADS * cell.head_dim, intermediate_size=512,
                                      num_hidden_layers=2, num_attention_heads=HEADS,
                                      num_key_value_heads=HEADS // cell.gqa, head_dim=cell.head_dim,
                                      max_position_embeddings=cell.train)
    model = transformers.LlamaForCausalLM(config).eval()
    model.set_attn_implementation("sdpa")
    if method == "selfextend":
        selfextend.apply(model, cell.group, cell.window)
    return model


def _cache_kwargs(model, cache) -> dict:
    """The cache keyword this transformers expects; an older checkout (--before) may predate transformers_compat."""
    try:
        from selfextend.transformers_compat import cache_kwargs
    except ImportError:
        return {"past_key_values": cache}
    return cache_kwargs(model, cache)


def measure(cell: Cell, method: str, steps: int = 16) -> dict:
    """One measurement in this process: seconds (per step for decode) and peak RSS growth in MiB."""
    import torch

    with torch.inference_mode():
        model = _model(cell, method)
        ids = torch.randint(0, 256, (1, cell.tokens), generator=torch.Generator().manual_seed(0))
        model(ids[:, :256])  # warm-up
        base = _rss_mib()
        if cell.phase == "prefill":
            start = time.perf_counter()
            model(ids, logits_to_keep=1)
            seconds = time.perf_counter() - start
        else:
            cache, token = _filled_cache(model, cell), ids[:, -1:]
            model(token, **_cache_kwargs(model, cache), use_cache=True)  # warm-up step
            start = time.perf_counter()
            for _ in range(steps):
                token = model(token, **_cache_kwargs(model, cache), use_cache=True).logits[:, -1:].argmax(-1)
            seconds = (time.perf_counter() - start) / steps
    return {"seconds": seconds, "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base}


def _filled_cache(model, cell: Cell):
    """A KV cache of cell.tokens random keys and values per layer: a decode step's cost does not depend on
    what the cache holds, and filling it by a prefill would take minutes at 64K."""
    import torch
    from transformers import DynamicCache

    cache, generator = DynamicCache(config=model.config), torch.Generator().manual_seed(1)
    shape = (1, HEADS // cell.gqa, cell.tokens, cell.head_dim)
    for layer in range(model.config.num_hidden_layers):
        cache.update(torch.randn(shape, generator=generator), torch.randn(shape, generator=generator), layer)
    return cache


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _in_process(cell: Cell, method: str, before: str | None = None) -> dict:
    old = before if method == "before" else None
    return in_fresh_process(__file__, ["--one", json.dumps(asdict(cell)), "selfextend" if old else method], old)


def run(cell: Cell, repeats: int, before: str | None = None) -> dict:
    """Vanilla and SelfExtend (and the older SelfExtend) alternating `repeats` times; medians and ratios."""
    runs = {"vanilla": [], "selfextend": [], **({"before": []} if before else {})}
    for _ in range(repeats):
        for method in runs:
            runs[method].append(_in_process(cell, method, before))
    median = {m: {k: statistics.median(r[k] for r in rs) for k in ("seconds", "peak_mib")} for m, rs in runs.items()}
    result = {"cell": asdict(cell), **median,
              "time_ratio": median["selfextend"]["seconds"] / median["vanilla"]["seconds"],
              "memory_ratio": median["selfextend"]["peak_mib"] / max(median["vanilla"]["peak_mib"], 1e-9),
              "all_time_ratios": [s["seconds"] / v["seconds"] for v, s in zip(runs["vanilla"], runs["selfextend"])]}
    if before:
        result["before_time_ratio"] = median["before"]["seconds"] / median["vanilla"]["seconds"]
        result["before_memory_ratio"] = median["before"]["peak_mib"] / max(median["vanilla"]["peak_mib"], 1e-9)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="8k", choices=["8k", "long", "classic", "smoke"])
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs per method and cell")
    parser.add_argument("--json", help="write every cell's figures here")
    parser.add_argument("--compare", help="a --json file of an earlier run: print its time ratio beside")
    parser.add_argument("--before", help="an older checkout (git worktree) whose SelfExtend runs in the same rounds")
    parser.add_argument("--cells", help="only the cells whose label contains this text")
    parser.add_argument("--busy", action="store_true",
                        help="with one competing CPU-bound process running throughout (a busy user's machine)")
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(Cell(**json.loads(args.one[0])), args.one[1])))
        return
    cells = [cell for cell in grid(args.preset) if not args.cells or args.cells in cell.label]
    if not cells:
        parser.error(f"--cells {args.cells!r} matches no cell of the {args.preset!r} preset; its cells:\n  "
                     + "\n  ".join(cell.label for cell in grid(args.preset)))
    before = {}
    if args.compare:
        before = {Cell(**r["cell"]).label: r for r in json.load(open(args.compare))}
    print(f"{'cell':<56} {'vanilla':>9} {'SE':>9} {'time ×':>7} {'mem ×':>6}"
          + (f" {'before ×':>9} {'mem ×':>6}" if args.before else "") + (f" {'earlier ×':>9}" if before else ""))
    with competing_process(args.busy):
        results = _rows(cells, args, before)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


def _rows(cells: list[Cell], args, before: dict) -> list[dict]:
    """Every cell of `cells` measured and printed as it finishes."""
    results = []
    for cell in cells:
        result = run(cell, args.repeats, args.before)
        results.append(result)
        unit, scale = ("ms", 1e3) if cell.phase == "decode" else ("s", 1)
        line = (f"{cell.label:<56} {result['vanilla']['seconds'] * scale:>7.2f}{unit:<2} "
                f"{result['selfextend']['seconds'] * scale:>7.2f}{unit:<2} {result['time_ratio']:>7.2f} "
                f"{result['memory_ratio']:>6.2f}")
        if args.before:
            line += f" {result['before_time_ratio']:>9.2f} {result['before_memory_ratio']:>6.2f}"
        if before:
            old = before.get(cell.label)
            line += f" {old['time_ratio']:>9.2f}" if old else f" {'-':>9}"
        print(line, flush=True)
    return results


if __name__ == "__main__":
    main()

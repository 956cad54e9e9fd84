"""This checkout's decode steps against an older checkout's, side by side: both load the embedded Gemma 3 270M
(int8 weights, float16 KV cache, SelfExtend planned for the length) over the same random cache in two processes
held at once, which take turns running a short block of steps while the other waits. This machine's speed moves
by tens of percent within minutes (docs/results.md), more than one change saves; blocks a second or so apart see
the same machine, so the ratio of the two sides' medians holds where whole-process rounds
(`decode_breakdown.py --before`) scatter. Each block's first step, after the other process ran, is not counted.
Each length is compared twice, each side's worker started first once: with the same code on both sides the
worker started second ran up to 1.14x faster (docs/results.md, session 33); the geometric mean of the two is
the figure.

    git worktree add /tmp/before <commit>
    python benchmarks/decode_side_by_side.py --before /tmp/before --tokens 16384,40960
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time


def serve(tokens: int, weights: str, kv_cache: str) -> None:
    """A worker: builds the model and cache, then runs `steps` decode steps per line read, replying their seconds."""
    import torch

    import selfextend
    from selfextend import kv_cache as caches, models
    from selfextend.transformers_compat import cache_kwargs
    from decode_breakdown import _random_cache

    model = models.load_model(models.resolve(None), weights=weights)
    selfextend.apply(model, input_length=tokens + 4096)
    torch.manual_seed(0)
    cache = _random_cache(model, tokens, caches.cache_dtype(kv_cache, model.dtype, model.device))
    token = torch.tensor([[1]])
    print(json.dumps({"ready": selfextend.__file__}), flush=True)
    with torch.inference_mode():
        for line in sys.stdin:
            times = []
            for _ in range(int(line)):
                start = time.perf_counter()
                logits = model(token, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1).logits
                token = logits[:, -1].argmax(-1, keepdim=True)
                times.append(time.perf_counter() - start)
            print(json.dumps(times), flush=True)


def _worker(source: str, tokens: int, weights: str, kv_cache: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [source, os.environ.get("PYTHONPATH")])))
    worker = subprocess.Popen([sys.executable, __file__, "--serve", str(tokens), "--weights", weights,
                               "--kv-cache-dtype", kv_cache], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env=env, cwd=os.path.dirname(os.path.abspath(__file__)))
    ready = json.loads(worker.stdout.readline())
    print(f"  {ready['ready']}", file=sys.stderr)
    return worker


def compare(before: str, tokens: int, blocks: int, steps: int, weights: str, kv_cache: str, first: str) -> dict:
    """Median step seconds of each side over `blocks` alternating blocks of `steps` (the first of each dropped),
    the `first` side's worker started first."""
    here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
    sources = {"before": os.path.join(before, "src"), "this": here}
    sides = {}
    for name in sorted(sources, key=lambda n: n != first):
        sides[name] = _worker(sources[name], tokens, weights, kv_cache)
    times = {name: [] for name in sides}
    try:
        for block in range(blocks):
            for name in (("before", "this") if block % 2 == 0 else ("this", "before")):
                worker = sides[name]
                worker.stdin.write(f"{steps + 1}\n")
                worker.stdin.flush()
                times[name] += json.loads(worker.stdout.readline())[1:]
    finally:
        for worker in sides.values():
            worker.stdin.close()
            worker.wait()
    medians = {name: statistics.median(t) for name, t in times.items()}
    return {"tokens": tokens, "started_first": first, "before_ms": medians["before"] * 1e3,
            "this_ms": medians["this"] * 1e3, "speedup": medians["before"] / medians["this"],
            "steps_each": len(times["this"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", help="an older checkout's folder (e.g. a git worktree)")
    parser.add_argument("--tokens", default="16384", help="comma-separated cache lengths")
    parser.add_argument("--blocks", type=int, default=20, help="blocks each side runs, taking turns")
    parser.add_argument("--steps", type=int, default=8, help="counted steps per block")
    parser.add_argument("--weights", default="int8")
    parser.add_argument("--kv-cache-dtype", default="float16")
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.weights, args.kv_cache_dtype)
        return
    if not args.before:
        parser.error("--before CHECKOUT is required")
    rows = []
    for tokens in (int(n) for n in args.tokens.split(",")):
        pair = []
        for first in ("before", "this"):  # the worker started second ran up to 14% faster with the same code
            row = compare(args.before, tokens, args.blocks, args.steps, args.weights, args.kv_cache_dtype, first)
            rows.append(row)
            pair.append(row["speedup"])
            print(f"{tokens:>6} tokens, {first} started first: before {row['before_ms']:.2f} ms a step, this "
                  f"{row['this_ms']:.2f} ms: {row['speedup']:.3f}x ({row['steps_each']} steps each, {args.blocks} "
                  f"blocks taking turns)")
        print(f"{tokens:>6} tokens: {math.sqrt(pair[0] * pair[1]):.3f}x (geometric mean of both start orders)")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"before": args.before, "weights": args.weights, "kv_cache": args.kv_cache_dtype,
                       "rows": rows}, out, indent=1)


if __name__ == "__main__":
    main()

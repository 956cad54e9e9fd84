"""Prefill speed of the embedded Gemma 3 270M: vanilla (SDPA) against SelfExtend, tokens per second.

The same loop `selfextend generate` runs (inference.prefill, its chunks over a DynamicCache), on
a passkey document of the given length, with G and W planned as `generate` plans them. Each measurement
runs in a fresh process; the methods alternate within each round, each round starting one later. `--before
DIR` adds an older checkout's SelfExtend (its src/ first on PYTHONPATH) to every round.

    python benchmarks/gemma_prefill.py --tokens 32768,65536
    python benchmarks/gemma_prefill.py --tokens 32768 --before /tmp/old --json gemma.json
    python benchmarks/gemma_prefill.py --tokens 16384 --busy     # one competing CPU-bound process throughout
    python benchmarks/gemma_prefill.py --tokens 16384 --weights int8   # generate's default weights on CPU
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

from fresh import competing_process, in_fresh_process


def measure(tokens: int, method: str, chunk_size: int, weights: str = "dense") -> dict:
    """One prefill in this process: seconds, tokens/s, peak RSS (MiB) and the settings used."""
    import torch

    import selfextend
    from selfextend import models
    from selfextend.inference import prefill
    from selfextend.samples import passkey_sample

    source = models.resolve(None)
    tokenizer, model = models.load_tokenizer(source), models.load_model(source, weights=weights)
    sample = passkey_sample(lambda text: len(tokenizer(text).input_ids), tokens)
    ids = tokenizer(sample.text + sample.question, return_tensors="pt").input_ids[:, :tokens]
    settings = "-"
    if method == "selfextend":
        selfextend.apply(model, input_length=ids.shape[1])
        config = selfextend.settings(model)
        settings = f"G={config.group_size} W={config.window_size}"
    with torch.inference_mode():
        prefill(model, ids[:, :600], chunk_size)  # warm-up
        start = time.perf_counter()
        prefill(model, ids, chunk_size)
        seconds = time.perf_counter() - start
    return {"tokens": ids.shape[1], "seconds": seconds, "tok_s": (ids.shape[1] - 1) / seconds,
            "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "settings": settings}


def _in_process(tokens: int, method: str, chunk_size: int, before: str | None, weights: str) -> dict:
    old = before if method == "before" else None
    argv = ["--one", str(tokens), "selfextend" if old else method, "--chunk-size", str(chunk_size), "--weights", weights]
    return in_fresh_process(__file__, argv, old)


def main() -> None:
    from selfextend.inference import CHUNK_SIZE

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default="32768,65536", help="comma-separated document lengths")
    parser.add_argument("--repeats", type=int, default=1, help="rounds per length (methods alternate in each)")
    parser.add_argument("--chunk-size", type=int, default=CHUNK_SIZE, help="prefill tokens per forward pass "
                        "(default: generate's)")
    parser.add_argument("--before", help="an older checkout (git worktree) whose SelfExtend runs in the same rounds")
    parser.add_argument("--json", help="write every measurement here")
    parser.add_argument("--busy", action="store_true",
                        help="with one competing CPU-bound process running throughout (a busy user's machine)")
    parser.add_argument("--weights", default="dense", help="the weight format (as load_model's; generate's default "
                        "on CPU is int8)")
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(int(args.one[0]), args.one[1], args.chunk_size, args.weights)))
        return
    with competing_process(args.busy):
        _measure_all(args)


def _measure_all(args) -> None:
    """Every length and method, methods alternating in each round, each round starting one method later (so none
    always follows the same one); printed as they finish."""
    methods = ["vanilla", "selfextend"] + (["before"] if args.before else [])
    print(f"{'tokens':>7} {'method':<11} {'settings':<14} {'tok/s':>7} {'× vanilla':>9} {'peak MiB':>9}", flush=True)
    results = []
    for tokens in (int(t) for t in args.tokens.split(",")):
        runs = {m: [] for m in methods}
        for round_ in range(args.repeats):
            for method in methods[round_ % len(methods):] + methods[:round_ % len(methods)]:  # each goes first in turn
                runs[method].append(_in_process(tokens, method, args.chunk_size, args.before, args.weights))
        vanilla = statistics.median(r["tok_s"] for r in runs["vanilla"])
        for method, rs in runs.items():
            speed = statistics.median(r["tok_s"] for r in rs)
            peak = statistics.median(r["peak_mib"] for r in rs)
            print(f"{tokens:>7} {method:<11} {rs[0]['settings']:<14} {speed:>7.1f} {speed / vanilla:>9.3f} {peak:>9.0f}",
                  flush=True)
            results.append({"tokens": tokens, "method": method, "weights": args.weights, "runs": rs, "tok_s": speed,
                            "ratio": speed / vanilla})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()

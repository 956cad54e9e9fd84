"""The main job under glibc's allocation policies: prefill speed, peak memory and page faults.

Runs `selfextend generate --sample-tokens N` in fresh processes, one per policy and round (each round starting
with another policy), with the CLI's two memory policies switched on or off: `map` (allocator.map_large_allocations,
which the CLI sets) and `trim` (inference.prefill's `malloc_trim` after each chunk). `--clean-heap` instead
times a bare prefill of random ids with no tokenizer loaded (a library user's heap, without the tokenizer's freed
holes), with and without `map`.

    python benchmarks/allocator_policies.py --sample-tokens 40000 --rounds 2 --json out.json
    python benchmarks/allocator_policies.py --clean-heap --sample-tokens 16384 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

from fresh import in_fresh_process

POLICIES = ("map+trim", "trim", "map", "none")  # the CLI's, then each switched off


def main_job(tokens: int, policy: str) -> dict:
    """`selfextend generate` in this process under `policy`: its prefill tok/s (its own line), peak, faults."""
    import contextlib
    import io

    import selfextend.cli as cli
    import selfextend.inference as inference

    if "map" not in policy:
        cli.map_large_allocations = lambda: False
    if "trim" not in policy:
        inference.return_freed_memory = lambda: True
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()) as out:
        code = cli.main(["generate", "--sample-tokens", str(tokens)])
    line = next(row for row in err.getvalue().splitlines() if row.startswith("[selfextend] prefill"))
    return {"policy": policy, "exit": code, "prefill_tok_s": float(line.split("(")[1].split()[0]),
            "answer": out.getvalue().strip()[-12:], **_usage()}


def clean_heap(tokens: int, policy: str) -> dict:
    """A bare prefill of random ids under `policy` (no tokenizer loaded; it trims after each chunk, as always)."""
    import torch

    from decode_breakdown import main_job_model
    from selfextend import inference
    from selfextend.allocator import map_large_allocations

    model = main_job_model(tokens + 64)
    if "map" in policy:
        map_large_allocations()
    ids = torch.randint(10, 20000, (1, tokens + 1), generator=torch.Generator().manual_seed(0))
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    inference.prefill(model, ids)
    seconds = time.perf_counter() - start
    return {"policy": policy, "prefill_tok_s": tokens / seconds, **_usage(faults)}


def _usage(faults_before: int = 0) -> dict:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"peak_gb": usage.ru_maxrss / 1e6, "minor_faults_m": (usage.ru_minflt - faults_before) / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample-tokens", type=int, default=40000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--clean-heap", action="store_true", help="a bare prefill, no tokenizer: map against none")
    parser.add_argument("--json", help="write every measurement here")
    parser.add_argument("--one", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        kind, tokens, policy = args.one
        print(json.dumps((clean_heap if kind == "clean" else main_job)(int(tokens), policy)))
        return
    policies = ("map+trim", "trim") if args.clean_heap else POLICIES  # a bare prefill trims each chunk too
    rows = []
    for round_ in range(args.rounds):
        for policy in policies[round_ % len(policies):] + policies[:round_ % len(policies)]:
            row = in_fresh_process(__file__, ["--one", "clean" if args.clean_heap else "main",
                                              str(args.sample_tokens), policy])
            rows.append({"round": round_ + 1, **row})
            print(json.dumps(rows[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"command": " ".join(sys.argv), "rows": rows}, out, indent=1)


if __name__ == "__main__":
    main()

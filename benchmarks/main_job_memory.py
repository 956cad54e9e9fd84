"""Where the main job's memory goes: resident and peak memory after each step of `selfextend generate`.

Runs the README's main job in this process, step by step as `generate` does (tokenizer, document, model in
the chosen weight format, plan, prefill with the run's KV cache capacity, 32 new tokens), and after each step
prints the resident memory and the peak so far (VmRSS, VmHWM from /proc/self/status; Linux only). At the
end, glibc's `malloc_trim` shows how much of the resident memory was freed memory the allocator still held.

    python benchmarks/main_job_memory.py --sample-tokens 40000 --json out.json
"""

from __future__ import annotations

import argparse
import ctypes
import importlib
import json
import sys
import time

STARTED = time.perf_counter()
ROWS: list[dict] = []


def mark(step: str) -> None:
    """Record and print this process's resident and peak memory after `step`."""
    with open("/proc/self/status") as status:
        fields = dict(line.split(":", 1) for line in status)
    row = {"step": step, "seconds": round(time.perf_counter() - STARTED, 1),
           "rss_gb": int(fields["VmRSS"].split()[0]) / 1e6, "peak_gb": int(fields["VmHWM"].split()[0]) / 1e6}
    ROWS.append(row)
    print(f"{row['seconds']:7.1f}s  {step:34s} RSS {row['rss_gb']:.3f} GB   peak {row['peak_gb']:.3f} GB",
          file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample-tokens", type=int, default=40000)
    parser.add_argument("--weights", default="auto")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--json", help="also write the rows here")
    options = parser.parse_args()
    mark("start")
    importlib.import_module("torch")
    importlib.import_module("transformers")
    mark("torch and transformers imported")
    from selfextend import cli, models
    from selfextend.inference import answer, pad_id, prefill
    from selfextend.integration import apply_plan

    mark("selfextend imported")
    args = cli.build_parser().parse_args(["generate", "--sample-tokens", str(options.sample_tokens),
                                          "--weights", options.weights,
                                          "--max-new-tokens", str(options.max_new_tokens)])
    source = cli._source(args)
    tokenizer = models.load_tokenizer(source)
    mark("tokenizer loaded")
    text, question, key = cli._document(args, tokenizer)
    model = cli._load_model(args, source)
    mark(f"model loaded ({options.weights} weights)")
    ids = cli._prompt_ids(tokenizer, text, question, args.chat)
    n = ids.shape[1]
    apply_plan(model, cli._settings(args, model, n + args.max_new_tokens))
    cache = prefill(model, ids, args.chunk_size, capacity=n + args.max_new_tokens)
    mark(f"prefill of {n} tokens")
    new = answer(model, ids, cache, args.max_new_tokens, pad_id(tokenizer))
    mark(f"{len(new)} new tokens")
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    mark("after malloc_trim (freed memory returned)")
    print(f"answer: {tokenizer.decode(new, skip_special_tokens=True)!r} (key {key})", file=sys.stderr)
    if options.json:
        with open(options.json, "w") as out:
            json.dump({"sample_tokens": options.sample_tokens, "weights": options.weights, "rows": ROWS}, out, indent=1)


if __name__ == "__main__":
    main()

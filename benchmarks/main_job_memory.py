"""Where the main job's memory goes: resident and peak memory after each step of `selfextend generate`.

Runs `selfextend generate --sample-tokens N` itself in this process, with the functions it calls for each step
(the tokenizer, the model in its weight format, the prefill, the answer) wrapped so that after each one the
resident memory and the peak so far are printed (VmRSS, VmHWM from /proc/self/status; Linux only). After the
answer, glibc's `malloc_trim` shows how much of the resident memory was freed memory the allocator still held.

    python benchmarks/main_job_memory.py --sample-tokens 40000 --json out.json
"""

from __future__ import annotations

import argparse
import functools
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


def marked(module, name: str, step: str, trim: bool = False) -> None:
    """Replace `module.name` by a function that calls it, then marks `step`; with `trim`, then has glibc return
    the memory it holds freed and marks again (the model and cache still alive)."""
    original = getattr(module, name)

    @functools.wraps(original)
    def call(*args, **kwargs):
        result = original(*args, **kwargs)
        mark(step)
        if trim:
            from selfextend.allocator import return_freed_memory  # imported by now: no effect on the marks

            if return_freed_memory():
                mark("malloc_trim (freed memory returned)")
        return result

    setattr(module, name, call)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample-tokens", type=int, default=40000)
    parser.add_argument("--weights", default="auto")
    parser.add_argument("--kv-cache-dtype", default="auto")
    parser.add_argument("--json", help="also write the rows here")
    options = parser.parse_args()
    mark("start")
    importlib.import_module("torch")
    importlib.import_module("transformers")
    mark("torch and transformers imported")
    from selfextend import cli, inference, models

    mark("selfextend imported")
    marked(models, "load_tokenizer", "tokenizer loaded")
    marked(cli, "_load_model", f"model loaded ({options.weights} weights)")
    marked(inference, "prefill", "prefill")
    marked(inference, "answer", "answer (new tokens)", trim=True)
    cli.main(["generate", "--sample-tokens", str(options.sample_tokens), "--weights", options.weights,
              "--kv-cache-dtype", options.kv_cache_dtype])
    if options.json:
        with open(options.json, "w") as out:
            json.dump({"sample_tokens": options.sample_tokens, "weights": options.weights,
                       "kv_cache_dtype": options.kv_cache_dtype, "rows": ROWS}, out, indent=1)


if __name__ == "__main__":
    main()

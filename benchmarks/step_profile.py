"""Where the embedded Gemma 3 270M's time goes, by py-spy's samples: decode steps over a random cache, or a prefill.

Runs the work in a child process under `py-spy record` (a benchmark tool: `pip install py-spy`) and sums its
samples by the innermost Python frame. A line that calls into C (our kernels through ctypes, torch's operators)
holds the samples of that call, so the int8 layers' products are `linear_native.linear`'s kernel call with its
wrapper, and so on. Prints the largest leaves, then the shares by source: our C kernels, torch's operators called
from Python, and the Python of selfextend, transformers, torch.nn and the rest.

    python benchmarks/step_profile.py decode --tokens 16384 --steps 300
    python benchmarks/step_profile.py prefill --tokens 16384
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter

# leaf frames (function, file) whose samples are C work called from Python
KERNELS = {
    ("linear", "selfextend/linear_native.py"):
        "int8 layers' products (our C kernel up to 16 tokens, else torch's GEMM)",
    ("attend_two", "selfextend/attention/few_native.py"): "decode attention, full layers (C)",
    ("attend_few", "selfextend/attention/few_native.py"): "decode attention, sliding layers (C)",
    ("OpOverloadPacket.__call__", "torch/_ops.py"): "torch operators called as torch.ops (SDPA's flash kernel)",
}
LEAF = re.compile(r"^(?P<function>.*) \((?P<file>.*?):(?P<line>\d+)\)$")


def work(kind: str, tokens: int, steps: int) -> None:
    """The profiled work, in this process."""
    import torch

    from selfextend import inference
    from selfextend.transformers_compat import cache_kwargs
    from decode_breakdown import main_job_cache, main_job_model

    model = main_job_model(tokens + steps + 64)
    start = time.perf_counter()
    if kind == "prefill":
        ids = torch.randint(10, 20000, (1, tokens + 1), generator=torch.Generator().manual_seed(0))
        inference.prefill(model, ids)
        print(json.dumps({"prefill_tok_s": tokens / (time.perf_counter() - start)}))
        return
    cache = main_job_cache(model, tokens)
    with torch.inference_mode():
        decode_steps(model, cache_kwargs(model, cache), 5)
        start = time.perf_counter()
        decode_steps(model, cache_kwargs(model, cache), steps)
    print(json.dumps({"step_ms": (time.perf_counter() - start) / steps * 1e3}))


def decode_steps(model, cache: dict, steps: int) -> None:
    """`steps` greedy decode steps (the profiled frames: loading and the cache's filling are outside them)."""
    import torch

    token = torch.tensor([[1]])
    for _ in range(steps):
        logits = model(token, **cache, use_cache=True, logits_to_keep=1).logits
        token = logits[:, -1].argmax(-1, keepdim=True)


def source(function: str, file: str) -> str:
    """The share a leaf frame's samples count towards."""
    if (function, file) in KERNELS:
        return KERNELS[(function, file)]
    for prefix, name in (("selfextend/", "selfextend's Python"), ("transformers/", "transformers' Python"),
                         ("torch/nn/", "torch.nn's module machinery"), ("kernels/", "the kernels package's wrappers")):
        if file.startswith(prefix):
            return name
    return "other Python (torch, the loop)"


def profile(kind: str, tokens: int, steps: int, rate: int) -> dict:
    """Run `work` under py-spy; the leaf frames' and sources' shares of the samples inside the work."""
    with tempfile.TemporaryDirectory() as folder:
        raw = os.path.join(folder, "raw.txt")
        done = subprocess.run(["py-spy", "record", "-r", str(rate), "-f", "raw", "-o", raw, "--", sys.executable,
                               __file__, kind, "--tokens", str(tokens), "--steps", str(steps), "--work"],
                              check=True, capture_output=True, text=True)
        timing = json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])  # not py-spy's
        inside = "prefill (selfextend/inference.py" if kind == "prefill" else "decode_steps (step_profile.py"
        leaves, total = Counter(), 0
        with open(raw) as samples:
            for line in samples:
                stack, count = line.rsplit(" ", 1)
                if inside not in stack:
                    continue
                total += int(count)
                leaves[stack.split(";")[-1]] += int(count)
    sources = Counter()
    for leaf, count in leaves.items():
        match = LEAF.match(leaf)
        sources[source(match["function"], match["file"]) if match else "other Python (torch, the loop)"] += count
    return {"kind": kind, "tokens": tokens, **timing, "samples": total,
            "sources": {name: count / total for name, count in sources.most_common()},
            "leaves": {leaf: count / total for leaf, count in leaves.most_common(25)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=["decode", "prefill"])
    parser.add_argument("--tokens", type=int, default=16384, help="the cache's length (decode) or the prompt's")
    parser.add_argument("--steps", type=int, default=300, help="decode steps profiled")
    parser.add_argument("--rate", type=int, default=200, help="py-spy's samples a second")
    parser.add_argument("--json", help="write the shares here")
    parser.add_argument("--work", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.work:
        work(args.kind, args.tokens, args.steps)
        return
    if shutil.which("py-spy") is None:
        raise SystemExit("step_profile.py samples with py-spy, which is not installed here: pip install py-spy")
    result = profile(args.kind, args.tokens, args.steps, args.rate)
    speed = (f"{result['step_ms']:.1f} ms a step" if "step_ms" in result
             else f"{result['prefill_tok_s']:.0f} tok/s")
    print(f"{args.kind} at {args.tokens} tokens: {speed} ({result['samples']} samples)")
    print("largest leaves:")
    for leaf, share in result["leaves"].items():
        print(f"  {share * 100:5.1f}%  {leaf}")
    print("by source:")
    for name, share in result["sources"].items():
        print(f"  {share * 100:5.1f}%  {name}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(result, out, indent=1)


if __name__ == "__main__":
    main()

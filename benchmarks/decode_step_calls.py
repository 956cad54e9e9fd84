"""A decode step of the embedded Gemma 3 270M (int8 weights, float16 KV cache, SelfExtend) over a cache of n
random tokens, timed per call of its parts: the attention kernels (full-attention and sliding-window layers), the
cache updates, RoPE, SelfExtend's grouped rotations, the forward pass's geometry, and torch's own operators (their
self time and count, from torch's profiler). Run it under an older checkout's `src` on PYTHONPATH to time that
one's parts. With `--env`, whole steps are timed in fresh processes under each environment in turn (e.g. OpenMP's
wait policy, read when torch starts), alternating, and compared with the first.

    python benchmarks/decode_step_calls.py --tokens 16384
    python benchmarks/decode_step_calls.py --tokens 16384 --env "" OMP_WAIT_POLICY=ACTIVE GOMP_SPINCOUNT=3000000
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict


def measure(tokens: int, steps: int) -> dict:
    """Step and per-call times in this process (milliseconds and microseconds)."""
    import torch

    from selfextend import integration, kv_cache, rotary
    from selfextend.attention import few_native
    from selfextend.transformers_compat import cache_kwargs
    from decode_breakdown import main_job_cache, main_job_model

    spent, calls, on = defaultdict(float), defaultdict(int), [False]

    def timed(owner, name: str, label: str) -> None:
        function = getattr(owner, name)

        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                if on[0]:
                    spent[label] += time.perf_counter() - start
                    calls[label] += 1
        setattr(owner, name, wrapper)

    model = main_job_model(tokens + 3 * steps + 16)
    cache = main_job_cache(model, tokens)
    timed(few_native, "attend_two", "full-attention kernel (attend_two)")
    timed(few_native, "attend_few", "sliding-window kernel (attend_few)")
    timed(kv_cache.SlidingLayer, "update", "sliding cache update")
    timed(kv_cache.GrowingLayer, "update", "full cache update")
    timed(integration, "_sequences_of", "a pass's geometry (_sequences_of)")
    timed(rotary.GroupedRotation, "__call__", "grouped rotation (GroupedRotation)")
    modeling = sys.modules[type(model.model.layers[0].self_attn).__module__]
    timed(modeling, "apply_rotary_pos_emb", "RoPE (apply_rotary_pos_emb)")
    token = torch.tensor([[1]])

    def step():
        nonlocal token
        logits = model(token, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1).logits
        token = logits[:, -1].argmax(-1, keepdim=True)

    with torch.inference_mode():
        for _ in range(5):
            step()
        on[0], times = True, []
        for _ in range(steps):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        on[0] = False
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            for _ in range(10):
                step()
    events = profiler.key_averages()
    ops = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)
    return {"tokens": tokens, "step_ms": statistics.median(times) * 1e3,
            "parts": {label: {"calls_per_step": calls[label] / steps, "us_per_call": spent[label] / calls[label] * 1e6,
                              "ms_per_step": spent[label] / steps * 1e3} for label in spent},
            "torch_ops_per_step": sum(e.count for e in events) / 10,
            "torch_self_ms_per_step": sum(e.self_cpu_time_total for e in events) / 10 / 1e3,  # profiled steps
            "top_ops": [{"op": e.key, "us_per_step": e.self_cpu_time_total / 10, "calls": e.count / 10}
                        for e in ops[:6]]}


def compare(tokens: int, steps: int, envs: list[str], rounds: int) -> None:
    medians = defaultdict(list)
    for _ in range(rounds):
        for setting in envs:
            env = dict(os.environ, **dict(item.split("=", 1) for item in setting.split() if item))
            done = subprocess.run([sys.executable, __file__, "--tokens", str(tokens), "--steps", str(steps)],
                                  check=True, capture_output=True, text=True, env=env)
            medians[setting].append(json.loads(done.stdout.splitlines()[-1])["step_ms"])
    base = statistics.median(medians[envs[0]])
    for setting in envs:
        ms = statistics.median(medians[setting])
        print(f"{setting or '(default)':32s} {ms:6.2f} ms a step ({' '.join(f'{m:.1f}' for m in medians[setting])})"
              f"  {base / ms:.2f}x the first")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--env", nargs="+", help="environments (VAR=value ..., '' for none) to compare")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if args.env:
        compare(args.tokens, args.steps, args.env, args.rounds)
        return
    result = measure(args.tokens, args.steps)
    print(f"{result['tokens']} tokens: {result['step_ms']:.2f} ms a step", file=sys.stderr)
    for label, part in result["parts"].items():
        print(f"  {label:38s} {part['us_per_call']:8.1f} us a call x {part['calls_per_step']:.0f} = "
              f"{part['ms_per_step']:.2f} ms a step", file=sys.stderr)
    print(f"  torch operators: {result['torch_ops_per_step']:.0f} a step, {result['torch_self_ms_per_step']:.2f} ms "
          f"self time a step (profiled); most: " + ", ".join(f"{o['op']} {o['us_per_step']:.0f} us"
                                                              for o in result["top_ops"]), file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

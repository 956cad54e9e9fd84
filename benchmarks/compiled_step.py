"""What `torch.compile` (inductor, CPU) does to a decode step of the embedded Gemma 3 270M, here and now.

The route transformers documents for a compiled decode: its own `StaticCache`, SDPA attention, dense float32
weights, `torch.compile(model.forward)`. Prints the eager step's time, the first compiled call's (the compile),
each later call's (inductor's on-disk cache is a new, empty folder unless `--warm-cache`), how many graphs were
compiled and why each recompile happened (dynamo's guard failures). With
`--explain`, also traces one decode step of generate's own configuration (int8 weights, SelfExtend, our KV cache)
with `torch._dynamo.explain` and prints its graphs and graph breaks by reason: what a compiled step of ours would
have to remove first. Bounded: `--steps` compiled calls, each at most one compile.

    python benchmarks/compiled_step.py --tokens 1024 --steps 2 --explain --json out.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from collections import Counter


def _timed(call) -> tuple[float, object]:
    start = time.perf_counter()
    result = call()
    return time.perf_counter() - start, result


def compiled_static_cache(tokens: int, steps: int) -> dict:
    """Eager and compiled decode steps over transformers' StaticCache after a `tokens`-token prefill."""
    import torch
    from torch._dynamo import guards
    from transformers import StaticCache

    from selfextend import models
    from selfextend.transformers_compat import cache_kwargs

    model = models.load_model(models.resolve(None), weights="dense")
    model.set_attn_implementation("sdpa")
    cache = StaticCache(config=model.config, max_cache_len=tokens + 4 * steps + 16)
    reasons: list[str] = []

    class Reasons(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines = [line.strip() for line in record.getMessage().splitlines() if line.strip().startswith("- ")]
            reasons.extend(lines[:1])

    handler = Reasons()
    torch._logging.set_logs(recompiles=True)
    guards.recompiles_log.addHandler(handler)
    guards.recompiles_log.propagate = False  # collected here, not printed
    graphs = Counter()

    def backend(graph, inputs):
        from torch._inductor.compile_fx import compile_fx
        graphs["compiled"] += 1
        return compile_fx(graph, inputs)

    limit = torch._dynamo.config.recompile_limit
    torch._dynamo.config.recompile_limit = steps + 1  # no more compiles than calls: a bounded run
    position = tokens

    def step(forward):
        nonlocal position
        out = forward(token, **cache_kwargs(model, cache), cache_position=torch.tensor([position]),
                      position_ids=torch.tensor([[position]]), use_cache=True, logits_to_keep=1)
        position += 1
        return out.logits[:, -1].argmax(-1, keepdim=True)

    with torch.inference_mode():
        ids = torch.randint(10, 20000, (1, tokens), generator=torch.Generator().manual_seed(0))
        model(ids, **cache_kwargs(model, cache), cache_position=torch.arange(tokens), use_cache=True, logits_to_keep=1)
        token = torch.tensor([[1]])
        for _ in range(2):
            step(model.forward)
        eager = []
        for _ in range(steps + 2):
            seconds, token = _timed(lambda: step(model.forward))
            eager.append(seconds)
        compiled_forward = torch.compile(model.forward, backend=backend)
        compiled = []
        for _ in range(steps):
            seconds, token = _timed(lambda: step(compiled_forward))
            compiled.append(seconds)
    guards.recompiles_log.removeHandler(handler)
    torch._logging.set_logs()
    torch._dynamo.config.recompile_limit = limit
    return {"tokens": tokens, "eager_step_s": sorted(eager)[len(eager) // 2], "compiled_calls_s": compiled,
            "graphs_compiled": graphs["compiled"], "recompile_reasons": reasons}


def explain_ours(tokens: int) -> dict:
    """`torch._dynamo.explain` of one decode step as `generate` runs it: int8 weights, SelfExtend, our cache."""
    import torch

    from selfextend.transformers_compat import cache_kwargs
    from decode_breakdown import main_job_cache, main_job_model

    model = main_job_model(tokens + 64)
    cache = main_job_cache(model, tokens)
    with torch.inference_mode():
        model(torch.tensor([[1]]), **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1)
        seconds, found = _timed(lambda: torch._dynamo.explain(model)(
            torch.tensor([[1]]), **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1))

    def where(reason) -> str:  # the first line of the reason, at the innermost frame of ours (else of any code)
        frames = [f for f in reason.user_stack if "selfextend" in f.filename] or reason.user_stack
        frame = frames[-1] if frames else None
        at = f" at {frame.filename.split('site-packages/')[-1].split('src/')[-1]}:{frame.lineno}" if frame else ""
        return reason.reason.splitlines()[0][:100] + at

    reasons = Counter(where(reason) for reason in found.break_reasons)
    return {"graphs": found.graph_count, "graph_breaks": found.graph_break_count, "trace_s": seconds,
            "break_reasons": reasons.most_common()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=1024, help="the cache's length before the decode steps")
    parser.add_argument("--steps", type=int, default=2, help="compiled calls (each may compile once)")
    parser.add_argument("--explain", action="store_true", help="also trace our own decode step and list its breaks")
    parser.add_argument("--warm-cache", action="store_true", help="keep inductor's usual on-disk cache (compiles "
                        "of earlier runs are reused), instead of a new empty one")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    if not args.warm_cache:  # read when inductor starts: before torch is imported
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-cache-")
    result = {"static_cache": compiled_static_cache(args.tokens, args.steps)}
    static = result["static_cache"]
    print(f"transformers' StaticCache, dense float32, SDPA, {args.tokens}-token cache: eager "
          f"{static['eager_step_s'] * 1e3:.1f} ms a step; compiled calls "
          + ", ".join(f"{s:.1f} s" for s in static["compiled_calls_s"])
          + f" ({static['graphs_compiled']} graphs compiled for {args.steps} calls)")
    for reason in static["recompile_reasons"]:
        print(f"  recompiled: {reason}")
    if args.explain:
        import torch._dynamo
        torch._dynamo.reset()
        result["ours"] = ours = explain_ours(args.tokens)
        print(f"our decode step (int8, SelfExtend, our cache): {ours['graphs']} graphs, {ours['graph_breaks']} "
              f"graph breaks (traced in {ours['trace_s']:.0f} s); by reason:")
        for reason, count in ours["break_reasons"]:
            print(f"  {count:4d} x {reason}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(result, out, indent=1)


if __name__ == "__main__":
    main()

"""Where a decode step's time goes, per weight format, cache length and method, beside llama.cpp.

One decode step is the forward pass of one new token over a KV cache of n tokens plus the greedy pick, as
`generate` runs it. The cache is filled with random keys and values of the model's shapes (a step's cost
depends on the shapes, not the values), so 40K costs no 40K prefill; the first steps (not timed) build
SelfExtend's kept grouped keys. Each step is split by timing hooks into:

- linear: every linear layer and the LM head, i.e. reading the weights;
- attention: the attention function (SDPA, or SelfExtend's kernel);
- cache: the KV cache update;
- other: the rest (norms, RoPE, residuals, embedding, Python), the step's time less those three.

The weights floor is the bytes of linear weights one step reads over this machine's measured read bandwidth.
Each weight format runs in its own process (its peak RSS is printed); llama.cpp's `llama-bench` at the same
depths on the same GGUF, given `--llama-bench`, is the anchor the ratios are taken against.

    python benchmarks/decode_breakdown.py --llama-bench /tmp/llamacpp/.../build/bin/llama-bench
    python benchmarks/decode_breakdown.py --formats dense,int8 --lengths 16384 --json out.json

With `--before CHECKOUT` (an older checkout's folder, e.g. a `git worktree`), each format runs `--rounds` times
with that checkout's selfextend and with this one's, alternately, and the median decode speeds are compared:
this machine's speed can move by tens of percent within minutes, more than one change saves.

    python benchmarks/decode_breakdown.py --formats int8 --methods selfextend --before /tmp/before --rounds 5

With `--kv-cache-dtypes model,float16`, SelfExtend's rows are measured over a cache of each dtype, the caches
taking turns for `--cache-rounds` rounds in one process (the model's own attention reads `model` only).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import time
from collections import defaultdict

from fresh import in_fresh_process


def read_bandwidth() -> float:
    """This machine's memory read bandwidth in GB/s: summing a 1 GiB float32 tensor, best of five."""
    import torch

    data = torch.ones(2 ** 28)
    data.sum()
    best = min(_seconds(data.sum) for _ in range(5))
    return data.numel() * 4 / best / 1e9


def _seconds(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def weight_bytes(model) -> int:
    """Bytes of linear weights one decode step reads (each PackedLinear's stored form, or the float tensor)."""
    from torch import nn

    from selfextend.weights import PackedLinear

    total = 0
    for module in model.modules():
        if isinstance(module, PackedLinear) and module.format == "int8":
            total += module.rows.numel() + module.scale.numel() * module.scale.element_size()  # a scale per 32
        elif isinstance(module, PackedLinear):
            total += module.in_features * module.out_features * 2
        elif isinstance(module, nn.Linear):
            total += module.weight.numel() * module.weight.element_size()
    return total


class _Timers:
    """Seconds spent in linear layers, the attention function and the cache update, while `on`."""

    def __init__(self, model) -> None:
        from torch import nn
        from transformers import AttentionInterface
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        from selfextend.weights import PackedLinear

        self.spent: dict[str, float] = defaultdict(float)
        self.on = False
        self._originals = {name: ALL_ATTENTION_FUNCTIONS[name] for name in ("sdpa", "selfextend")}
        for name, function in self._originals.items():
            AttentionInterface.register(name, self._timed("attention", function))
        self._register = AttentionInterface.register
        starts: dict[int, float] = {}
        for module in model.modules():
            if isinstance(module, (nn.Linear, PackedLinear)):
                module.register_forward_pre_hook(lambda m, a: starts.__setitem__(id(m), time.perf_counter()))
                module.register_forward_hook(lambda m, a, o: self._add("linear", time.perf_counter() - starts[id(m)]))

    def _add(self, part: str, seconds: float) -> None:
        if self.on:
            self.spent[part] += seconds

    def _timed(self, part: str, function):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self._add(part, time.perf_counter() - start)
        return timed

    def watch_cache(self, cache) -> None:
        cache.update = self._timed("cache", cache.update)

    def close(self) -> None:
        for name, function in self._originals.items():
            self._register(name, function)


def _random_cache(model, n: int, dtype=None):
    """The cache every loop uses (kv_cache.new_cache) holding n random keys and values per layer (sliding
    layers keep their window), stored in `dtype` (None: the model's)."""
    import torch

    from selfextend.kv_cache import new_cache

    config = model.config.get_text_config()
    cache = new_cache(model.config, dtype=dtype)
    heads = config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    with torch.inference_mode():  # as prefill fills it
        for layer in range(config.num_hidden_layers):
            keys, values = torch.randn(1, heads, n, head_dim), torch.randn(1, heads, n, head_dim)
            cache.update(keys, values, layer)
    return cache


def main_job_model(input_length: int):
    """The embedded Gemma 3 270M as the main job decodes with it: int8 weights, SelfExtend planned for
    `input_length` tokens."""
    import selfextend
    from selfextend import models

    model = models.load_model(models.resolve(None), weights="int8")
    selfextend.apply(model, input_length=input_length)
    return model


def main_job_cache(model, n: int):
    """`_random_cache` of n tokens, stored as the main job stores its KV cache on CPU (float16)."""
    from selfextend import kv_cache

    return _random_cache(model, n, kv_cache.cache_dtype("float16", model.dtype, model.device))


def _steps(model, timers: _Timers, cache, steps: int, warm_up: int) -> tuple[list, list]:
    """`warm_up` untimed decode steps, `steps` timed whole, `steps` timed by part: (seconds, (seconds, parts))."""
    import torch

    from selfextend.transformers_compat import cache_kwargs

    token = torch.tensor([[1]])
    plain, timed = [], []
    with torch.inference_mode():
        for step in range(warm_up + 2 * steps):
            timers.on = step >= warm_up + steps
            before = dict(timers.spent)
            start = time.perf_counter()
            logits = model(token, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1).logits
            token = logits[:, -1].argmax(-1, keepdim=True)
            seconds = time.perf_counter() - start
            if warm_up <= step < warm_up + steps:
                plain.append(seconds)
            elif timers.on:
                timed.append((seconds, {k: v - before.get(k, 0.0) for k, v in timers.spent.items()}))
    timers.on = False
    return plain, timed


def measure(fmt: str, lengths: list[int], methods: list[str], steps: int, model_name: str | None,
            kv_caches: list[str] = ("model",), cache_rounds: int = 1) -> dict:
    """Decode-step breakdowns for one weight format, in this process; each (length, method) over a cache of each
    of `kv_caches` (kv_cache.CACHE_DTYPES; the model's own attention reads `model` only), `cache_rounds` rounds
    taking turns, medians over all."""
    import selfextend
    from selfextend import models
    from selfextend.kv_cache import cache_dtype
    source = models.resolve(model_name)
    model = models.load_model(source, weights=fmt)  # as the commands load it (its peak RSS too)
    rows = []
    for n in lengths:
        for method in methods:
            selfextend.remove(model)
            settings = "-"
            if method == "selfextend":
                selfextend.apply(model, input_length=n + cache_rounds * (2 * steps + 2) + 4)
                config = selfextend.settings(model)
                settings = f"G={config.group_size} W={config.window_size}"
            timers = _Timers(model)
            names = [name for name in kv_caches if method == "selfextend" or name == "model"]
            caches = {name: _random_cache(model, n, cache_dtype(name, model.dtype, model.device)) for name in names}
            runs = {name: ([], []) for name in names}
            for cache in caches.values():
                timers.watch_cache(cache)
            for round in range(cache_rounds):
                for name, cache in caches.items():
                    plain, timed = _steps(model, timers, cache, steps, 2 if round == 0 else 0)
                    runs[name][0].extend(plain)
                    runs[name][1].extend(timed)
            timers.close()
            for name, (plain, timed) in runs.items():
                step_ms = statistics.median(plain) * 1e3
                timed_ms = statistics.median(s for s, _ in timed) * 1e3
                parts = {part: statistics.median(p.get(part, 0.0) for _, p in timed) * 1e3
                         for part in ("linear", "attention", "cache")}
                rows.append({"format": fmt, "tokens": n, "method": method, "kv_cache": name, "settings": settings,
                             "step_ms": step_ms, "tok_s": 1e3 / step_ms, **{f"{k}_ms": v for k, v in parts.items()},
                             "other_ms": timed_ms - sum(parts.values()), "timed_step_ms": timed_ms})
            del caches
    return {"format": fmt, "weight_bytes": weight_bytes(model), "rows": rows,
            "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def llama_bench(binary: str, gguf: str, lengths: list[int], threads: int) -> dict[int, float]:
    """llama.cpp's decode tok/s (64 new tokens) at each cache depth, from `llama-bench -o json`."""
    depths = ",".join(str(n) for n in lengths)
    done = subprocess.run([binary, "-m", gguf, "-t", str(threads), "-p", "0", "-n", "64", "-d", depths,
                           "-r", "2", "-o", "json"], check=True, capture_output=True, text=True)
    return {int(row["n_depth"]): float(row["avg_ts"]) for row in json.loads(done.stdout)}


def compare(args) -> None:
    """Median decode tok/s of each (format, length, method) with `args.before`'s selfextend and this one's, in
    alternating rounds of fresh processes."""
    rows: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: {"before": [], "this": []})
    for fmt in args.formats.split(","):
        argv = ["--one", fmt, "--lengths", args.lengths, "--methods", args.methods, "--steps", str(args.steps),
                "--kv-cache-dtypes", args.kv_cache_dtypes]
        argv += ["--model", args.model] if args.model else []
        for _ in range(args.rounds):
            for side, before in (("before", args.before), ("this", None)):
                for row in in_fresh_process(__file__, argv, before)["rows"]:
                    rows[(fmt, row["tokens"], row["method"], row["kv_cache"])][side].append(row["tok_s"])
    print(f"{'format':8} {'tokens':>6} {'method':10} {'cache':7} {'before tok/s':>12} {'this tok/s':>10} {'x':>5}  "
          f"(medians of {args.rounds} alternating rounds)")
    table = []
    for (fmt, n, method, kv_cache), sides in rows.items():
        before, this = statistics.median(sides["before"]), statistics.median(sides["this"])
        table.append({"format": fmt, "tokens": n, "method": method, "kv_cache": kv_cache,
                      "before_tok_s": sides["before"],
                      "this_tok_s": sides["this"], "ratio_of_medians": this / before})
        print(f"{fmt:8} {n:>6} {method:10} {kv_cache:7} {before:12.1f} {this:10.1f} {this / before:5.2f}   "
              f"before {' '.join(f'{x:.1f}' for x in sides['before'])}; "
              f"this {' '.join(f'{x:.1f}' for x in sides['this'])}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"before": args.before, "rounds": args.rounds, "rows": table}, out, indent=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a named model (default: the embedded Gemma 3 270M)")
    parser.add_argument("--formats", default="dense,float16,int8")
    parser.add_argument("--lengths", default="4096,16384,40960")
    parser.add_argument("--methods", default="vanilla,selfextend")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per cell (and as many instrumented)")
    parser.add_argument("--llama-bench", help="path to llama.cpp's llama-bench: adds its decode speed")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="write all rows here")
    parser.add_argument("--before", metavar="CHECKOUT", help="compare with an older checkout, rounds alternating")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each side for --before")
    parser.add_argument("--kv-cache-dtypes", default="model",
                        help="KV caches to compare, e.g. model,float16 (float16: SelfExtend rows only)")
    parser.add_argument("--cache-rounds", type=int, default=1,
                        help="rounds the caches take turns in, medians over all (3 or more to compare caches)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--bandwidth", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    lengths, methods = [int(n) for n in args.lengths.split(",")], args.methods.split(",")
    if args.bandwidth:
        print(json.dumps({"gb_s": read_bandwidth()}))
        return
    if args.one:
        print(json.dumps(measure(args.one, lengths, methods, args.steps, args.model, args.kv_cache_dtypes.split(","),
                                 args.cache_rounds)))
        return

    if args.before:
        compare(args)
        return
    gb_s = in_fresh_process(__file__, ["--bandwidth"])["gb_s"]
    anchor = {}
    if args.llama_bench:
        from selfextend import models

        gguf = models.NAMED_MODELS[args.model or models.DEFAULT_MODEL].gguf()
        anchor = llama_bench(args.llama_bench, str(gguf), lengths, args.threads)
    results = []
    for fmt in args.formats.split(","):
        argv = ["--one", fmt, "--lengths", args.lengths, "--methods", args.methods, "--steps", str(args.steps),
                "--kv-cache-dtypes", args.kv_cache_dtypes, "--cache-rounds", str(args.cache_rounds)]
        results.append(in_fresh_process(__file__, argv + (["--model", args.model] if args.model else [])))

    print(f"read bandwidth {gb_s:.1f} GB/s" + (f"; llama.cpp decode tok/s by depth: {anchor}" if anchor else ""))
    print(f"{'format':8} {'tokens':>6} {'method':10} {'cache':7} {'settings':12} {'tok/s':>6} {'x llama':>7} "
          f"{'step':>6} {'linear':>6} {'floor':>6} {'attn':>6} {'update':>6} {'other':>6}  (ms)")
    for result in results:
        floor_ms = result["weight_bytes"] / gb_s / 1e6
        result["weights_floor_ms"] = floor_ms
        for row in result["rows"]:
            ratio = row["tok_s"] / anchor[row["tokens"]] if row["tokens"] in anchor else float("nan")
            row["x_llama_cpp"] = ratio
            print(f"{row['format']:8} {row['tokens']:>6} {row['method']:10} {row.get('kv_cache', 'model'):7} "
                  f"{row['settings']:12} {row['tok_s']:6.1f} "
                  f"{ratio:7.2f} {row['step_ms']:6.1f} {row['linear_ms']:6.1f} {floor_ms:6.1f} "
                  f"{row['attention_ms']:6.1f} {row['cache_ms']:6.1f} {row['other_ms']:6.1f}")
        print(f"{result['format']}: {result['weight_bytes'] / 1e6:.0f} MB of linear weights per step, "
              f"peak RSS {result['peak_mib']:.0f} MiB")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"read_gb_s": gb_s, "llama_cpp_tok_s": anchor, "results": results}, out, indent=1)


if __name__ == "__main__":
    main()

"""What `generate` costs a decode step over a bare loop of forward calls and argmax, in one process.

The embedded Gemma 3 270M (int8 weights, float16 KV cache, SelfExtend planned for the length) over a cache of n
random tokens (`decode_breakdown._random_cache`): rounds of `--tokens-per-round` new tokens alternate between
greedy `generate` and the bare loop, both growing the same cache, so both see the same machine; the medians of
their milliseconds a token are compared. `--min-new-tokens` asks `generate` for that processor too.

    python benchmarks/generate_overhead.py --tokens 16384
    python benchmarks/generate_overhead.py --tokens 16384 --min-new-tokens
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16384, help="cache length")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--tokens-per-round", type=int, default=16)
    parser.add_argument("--min-new-tokens", action="store_true", help="generate with min_new_tokens set")
    options = parser.parse_args()

    import torch

    from selfextend.transformers_compat import cache_kwargs
    from decode_breakdown import main_job_cache, main_job_model

    n = options.tokens_per_round
    model = main_job_model(options.tokens + 2 * options.rounds * n + 16)
    cache = main_job_cache(model, options.tokens)
    ids = torch.randint(3, 1000, (1, options.tokens + 1), generator=torch.Generator().manual_seed(0))
    extra = {"min_new_tokens": n} if options.min_new_tokens else {}
    spent = {"generate": [], "bare loop": []}
    with torch.inference_mode():
        for _ in range(options.rounds):
            start = time.perf_counter()
            out = model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(model, cache),
                                 max_new_tokens=n, do_sample=False, pad_token_id=0, **extra)
            spent["generate"].append((time.perf_counter() - start) / (out.shape[1] - ids.shape[1]))
            ids, token = out, out[:, -1:]
            start = time.perf_counter()
            for _ in range(n):
                logits = model(token, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1).logits
                token = logits[:, -1].argmax(-1, keepdim=True)
                ids = torch.cat([ids, token], 1)
            spent["bare loop"].append((time.perf_counter() - start) / n)
    medians = {name: statistics.median(times) * 1e3 for name, times in spent.items()}
    for name, times in spent.items():
        print(f"{name:10s} {medians[name]:6.2f} ms a token (rounds: {', '.join(f'{t * 1e3:.1f}' for t in times)})")
    print(f"generate{' with min_new_tokens' if extra else ''} / bare loop: "
          f"{medians['generate'] / medians['bare loop']:.3f}x the time a token")


if __name__ == "__main__":
    main()

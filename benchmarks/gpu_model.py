"""GPU, whole model: prefill and decode of a model of the embedded Gemma 3 270M's shape with SelfExtend, beside
the same model with transformers' SDPA attention, in one process.

Random weights of the shape a config.json gives (speed does not depend on the weights' values; nothing is
downloaded), bf16, batch 1, a DynamicCache. For each length: one prefill of n tokens (logits of the last token
only, as generate asks), then `--new` decode steps of one token each; CUDA-event times (median of `--repeats`),
peak memory above the weights, and SelfExtend's ratios to vanilla. SelfExtend's settings are planned for
n + new tokens (what `apply(model, input_length=...)` gives a user), printed per length. The first call at each
new shape compiles FlexAttention's kernels and masks (tens of seconds): allow minutes per length.

    python benchmarks/gpu_model.py --config path/to/config.json --lengths 16384,65536,131072 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
import transformers

import selfextend
from selfextend.transformers_compat import cache_kwargs


def _model(config_path: str, dtype: torch.dtype) -> transformers.PreTrainedModel:
    config = transformers.AutoConfig.from_pretrained(config_path)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).cuda().eval()
    model.set_attn_implementation("sdpa")
    return model


@torch.no_grad()
def _run(model, ids: torch.Tensor, new: int) -> tuple[float, float, int]:
    """Prefill ms, decode ms per token, and peak bytes above what was allocated before."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    cache = transformers.DynamicCache(config=model.config)
    events = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
    events[0].record()
    # the last token's logits only, as generate asks: all of them would be n × vocab (32 GiB at 64K for Gemma 3)
    logits = model(ids, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1).logits[:, -1]
    events[1].record()
    for _ in range(new):
        token = logits.argmax(-1, keepdim=True)
        logits = model(token, **cache_kwargs(model, cache), use_cache=True).logits[:, -1]
    events[2].record()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del cache, logits
    torch.cuda.empty_cache()
    return events[0].elapsed_time(events[1]), events[1].elapsed_time(events[2]) / new, peak


def _measure(model, ids, new: int, repeats: int) -> dict:
    _run(model, ids, min(new, 2))  # warm-up: kernels, compiled masks, rotation tables
    runs = [_run(model, ids, new) for _ in range(repeats)]
    return {"prefill_ms": statistics.median(r[0] for r in runs), "decode_ms": statistics.median(r[1] for r in runs),
            "peak_mib": max(r[2] for r in runs) / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a model's config.json (or its folder)")
    parser.add_argument("--lengths", default="16384,65536,131072")
    parser.add_argument("--new", type=int, default=32, help="decode steps after each prefill")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_model.py needs a CUDA device; benchmarks/vs_llama_cpp.py is the CPU side-by-side")
    model = _model(args.config, torch.bfloat16)
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  transformers {transformers.__version__}  "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, bf16, random weights")
    print(f"{'tokens':>7} {'settings':<12} {'prefill ms':>16} {'× vanilla':>9} {'decode ms/token':>16} {'× vanilla':>9}"
          f" {'peak MiB':>14} {'×':>6}")
    rows = []
    for n in (int(x) for x in args.lengths.split(",")):
        ids = torch.randint(3, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(n)).cuda()
        vanilla = _measure(model, ids, args.new, args.repeats)
        config = selfextend.settings(selfextend.apply(model, input_length=n + args.new))
        ours = _measure(model, ids, args.new, args.repeats)
        selfextend.remove(model)
        row = {"tokens": n, "group_size": config.group_size, "window_size": config.window_size,
               "vanilla": vanilla, "selfextend": ours}
        rows.append(row)
        print(f"{n:>7} G={config.group_size} W={config.window_size:<5} "
              f"{vanilla['prefill_ms']:>7.1f} → {ours['prefill_ms']:>6.1f} {ours['prefill_ms'] / vanilla['prefill_ms']:>9.2f}"
              f" {vanilla['decode_ms']:>7.2f} → {ours['decode_ms']:>6.2f} {ours['decode_ms'] / vanilla['decode_ms']:>9.2f}"
              f" {vanilla['peak_mib']:>6.0f} → {ours['peak_mib']:>5.0f} {ours['peak_mib'] / vanilla['peak_mib']:>6.2f}",
              flush=True)
    if args.json:
        meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                "transformers": transformers.__version__, "config": args.config, "new": args.new,
                "repeats": args.repeats}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

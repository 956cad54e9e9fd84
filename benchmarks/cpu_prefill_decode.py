"""SelfExtend vs vanilla SDPA on CPU, side by side: prefill time and peak memory, decode step time.

Each measurement runs in a fresh subprocess so peak RSS is its own. Prints a table of ratios
(SelfExtend / vanilla); the model is a small random Llama whose cost is dominated by attention.

    python benchmarks/cpu_prefill_decode.py --lengths 4096,8192,16384,32768 --decode-cache 16384
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
import transformers

import selfextend

SHAPE = dict(vocab_size=256, hidden_size=512, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
             num_key_value_heads=2, max_position_embeddings=4096)
GROUP, WINDOW = 16, 1024  # limit (4096 - 1024)·16 + 1024 = 50176 tokens


def _model(method: str) -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SHAPE)).eval()
    model.set_attn_implementation("sdpa")
    if method == "selfextend":
        selfextend.apply(model, GROUP, WINDOW)
    return model


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


@torch.inference_mode()
def measure(method: str, phase: str, length: int, steps: int) -> dict:
    """One measurement in this process: prefill of `length` tokens, or `steps` decode steps after it."""
    model = _model(method)
    ids = torch.randint(0, 256, (1, length), generator=torch.Generator().manual_seed(0))
    if phase == "prefill":
        model(ids[:, :256])  # warm-up
        base = _rss_mib()
        start = time.perf_counter()
        model(ids, logits_to_keep=1)
        seconds = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return {"seconds": seconds, "peak_mib": peak - base}
    out = model(ids, use_cache=True, logits_to_keep=1)
    cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    model(token, past_key_values=cache, use_cache=True)  # warm-up step
    start = time.perf_counter()
    for _ in range(steps):
        token = model(token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
    return {"seconds": (time.perf_counter() - start) / steps}


def _run(method: str, phase: str, length: int, steps: int) -> dict:
    cmd = [sys.executable, __file__, "--one", method, phase, str(length), str(steps)]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="4096,8192,16384,32768")
    parser.add_argument("--decode-cache", type=int, default=16384)
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--one", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        method, phase, length, steps = args.one
        print(json.dumps(measure(method, phase, int(length), int(steps))))
        return
    torch_threads = torch.get_num_threads()
    print(f"CPU, {torch_threads} threads; Llama {SHAPE['num_hidden_layers']} layers, {SHAPE['num_attention_heads']}"
          f"×{SHAPE['hidden_size'] // SHAPE['num_attention_heads']} heads, GQA {SHAPE['num_key_value_heads']}; "
          f"SelfExtend G={GROUP}, W={WINDOW}")
    print(f"{'phase':<8} {'tokens':>7} {'vanilla s':>10} {'SE s':>8} {'time ×':>7} {'vanilla MiB':>12} {'SE MiB':>8} "
          f"{'mem ×':>6}")
    for length in [int(x) for x in args.lengths.split(",")]:
        v, s = _run("vanilla", "prefill", length, 0), _run("selfextend", "prefill", length, 0)
        print(f"{'prefill':<8} {length:>7} {v['seconds']:>10.2f} {s['seconds']:>8.2f} "
              f"{s['seconds'] / v['seconds']:>7.2f} {v['peak_mib']:>12.0f} {s['peak_mib']:>8.0f} "
              f"{s['peak_mib'] / v['peak_mib']:>6.2f}", flush=True)
    v = _run("vanilla", "decode", args.decode_cache, args.decode_steps)
    s = _run("selfextend", "decode", args.decode_cache, args.decode_steps)
    print(f"{'decode':<8} {args.decode_cache:>7} {v['seconds'] * 1e3:>9.1f}ms {s['seconds'] * 1e3:>6.1f}ms "
          f"{s['seconds'] / v['seconds']:>7.2f}   (per step, {args.decode_steps} steps)")


if __name__ == "__main__":
    main()

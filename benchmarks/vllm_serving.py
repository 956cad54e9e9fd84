"""vLLM + the selfextend plugin against our own `selfextend serve`, and against plain vLLM inside L.

N clients at once, each asking for a completion of its own long document (past the training length L), over
HTTP to a server in a child process on 127.0.0.1; requests/s, mean time to first token (streamed) and decode
tokens/s per request. Each server runs alone, one after another, in this run; ratios are printed against the
first row of each comparison.

    python benchmarks/vllm_serving.py --vllm-python .venv-vllm/bin/python [--clients 8] [--tokens 500] [--rounds 5]
    python benchmarks/vllm_serving.py --vllm-python .venv-vllm/bin/python --model gemma --clients 2 \
        --tokens 33000 --inside 4096 --rounds 1 --warmup-tokens 512 --group-size 4 --window 1024

The model is the project's testbed (L = 128; float32), or the embedded Gemma 3 270M (L = 32768; its
converted cache, float32), with G and W fixed alike in both servers.

vLLM's CPU build binds its worker's threads to cores and, by default (`VLLM_CPU_OMP_THREADS_BIND=auto`), keeps
one core per worker for its scheduler: on two cores the model runs on one. Both servers get the same cores here:
vLLM's worker is bound to `--vllm-cores` (default: every core this process may run on, as our server uses);
`--vllm-cores auto` keeps vLLM's own choice.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import torch

from local_server import free_port, wait_until_healthy
from selfextend import models
from selfextend.testbed import WEIGHTS


def _start(command: list[str], log: Path, seconds: float = 600) -> tuple[subprocess.Popen, str, int]:
    port = free_port()
    process = subprocess.Popen([*command, "--port", str(port)], stdout=open(log, "w"), stderr=subprocess.STDOUT,
                               env=os.environ)
    url = f"http://127.0.0.1:{port}"
    wait_until_healthy(url, process, log, seconds)
    return process, url, port


def _one(url: str, model: str, prompt: list[int], max_tokens: int, out: list) -> None:
    started, first, count = time.perf_counter(), None, 0
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True}  # every server does the same work
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=3600) as response:
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                count = chunk["usage"]["completion_tokens"]
            if first is None and any(c.get("text") for c in chunk.get("choices", [])):
                first = time.perf_counter()
    ended = time.perf_counter()
    out.append({"ttft": (first or ended) - started, "decode": max(count - 1, 0) / max(ended - (first or ended), 1e-9),
                "seconds": ended - started, "tokens": count})


def load(url: str, model: str, prompts: list[list[int]], max_tokens: int) -> dict:
    """All prompts at once, one client thread each; requests/s over the whole, mean TTFT and decode tok/s."""
    results: list = []
    threads = [threading.Thread(target=_one, args=(url, model, p, max_tokens, results)) for p in prompts]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    tokens = {r["tokens"] for r in results}
    if tokens != {max_tokens}:  # a server that stops early (e.g. at its max_model_len) does less work: refuse it
        raise SystemExit(f"{url} returned {sorted(tokens)} tokens per request, not {max_tokens}")
    return {"requests_per_s": len(prompts) / wall, "wall_s": wall,
            "ttft_s": sum(r["ttft"] for r in results) / len(results),
            "decode_tok_s": sum(r["decode"] for r in results) / len(results)}


def run(name: str, command: list[str], model: str, rounds: list[list[list[int]]], max_tokens: int, logs: Path,
        warmup: int | None = None) -> dict:
    """One load per round of new documents (no prefix-cache hits), in turn on one server after a warm-up (on
    a document no round sends, of `warmup` tokens if given); each figure is the median over the rounds."""
    process, url, _ = _start(command, logs / f"{name}.log")
    try:
        load(url, model, [rounds[0][0][::-1][:warmup]], max_tokens)
        measured = [load(url, model, prompts, max_tokens) for prompts in rounds]
        return {"server": name, **{k: statistics.median(m[k] for m in measured) for k in measured[0]},
                "rounds": measured}
    finally:
        process.terminate()
        process.wait(60)


def _all_cores() -> str:
    """The cores this process may run on, as vLLM's VLLM_CPU_OMP_THREADS_BIND lists them ("0,1,2")."""
    return ",".join(str(core) for core in sorted(os.sched_getaffinity(0)))


SERVERS = ("ours", "plugin", "plain-inside", "plugin-inside")  # two comparisons: past L, and inside it


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vllm-python", required=True, help="python of the virtual environment holding vllm-cpu")
    parser.add_argument("--model", choices=("testbed", "gemma"), default="testbed")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=500, help="document length, past L")
    parser.add_argument("--inside", type=int, default=112,
                        help="document length inside L, for the plugin's cost (with the new tokens, at most L)")
    parser.add_argument("--warmup-tokens", type=int, help="the warm-up document's length (default: --tokens)")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--group-size", type=int, default=6)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5, help="loads per server; the median is reported")
    parser.add_argument("--vllm-args", default="", help="extra flags for both vLLM servers, one string (e.g. "
                        "'--max-num-batched-tokens 8192')")
    parser.add_argument("--servers", default=",".join(SERVERS),
                        help=f"which servers run, in this order's pairs: {','.join(SERVERS)} (default: all)")
    parser.add_argument("--vllm-cores", default=_all_cores(),
                        help="VLLM_CPU_OMP_THREADS_BIND for both vLLM servers (default: every core this process "
                             "may use, %(default)s; 'auto': vLLM's choice, one core kept for its scheduler)")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    chosen = args.servers.split(",")
    if not set(chosen) <= set(SERVERS):
        raise SystemExit(f"--servers takes {','.join(SERVERS)}, not {args.servers}")
    logs = Path("runs/vllm_serving")
    logs.mkdir(parents=True, exist_ok=True)
    if args.model == "testbed":
        folder, ours_model, train, vocab, space = str(WEIGHTS), "testbed", 128, 56, "1"
    else:  # the embedded Gemma's converted cache, which vLLM reads (the main job converts it once)
        source = models.resolve(None)
        if source.gguf_file is not None:
            raise SystemExit("the weights are not converted yet: run `selfextend generate --sample-tokens 1000` once")
        folder, ours_model, train, vocab = source.name_or_path, models.DEFAULT_MODEL, 32768, 262140  # ids < 262144
        space = str(-(-args.clients * (args.tokens + args.max_tokens) * 36 * 1024 * 5 // 4 // 2**30))  # KV GiB
    if args.inside + args.max_tokens > train:
        raise SystemExit(f"--inside {args.inside} + {args.max_tokens} new tokens is past L = {train}")
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = space
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = args.vllm_cores
    generator = torch.Generator().manual_seed(0)

    def documents(length: int) -> list[list[list[int]]]:
        return [[torch.randint(4, vocab, (length,), generator=generator).tolist() for _ in range(args.clients)]
                for _ in range(args.rounds)]
    long, short = documents(args.tokens), documents(args.inside)
    G, W, n = args.group_size, args.window, args.tokens + args.max_tokens
    vllm = [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", folder, "--dtype",
            "float32", "--enforce-eager", "--host", "127.0.0.1", "--served-model-name", ours_model,
            *args.vllm_args.split()]
    extend = ["--hf-overrides", json.dumps({"max_position_embeddings": n}), "--max-model-len", str(n),
              "--additional-config", json.dumps({"selfextend": {"group_size": G, "window_size": W}})]
    ours = [sys.executable, "-m", "selfextend", "serve", "--model", ours_model, "--host", "127.0.0.1",
            "--group-size", str(G), "--window", str(W), "--log-level", "warning"]
    warm = args.warmup_tokens
    runs = {"ours": ("selfextend serve", ours, long), "plugin": ("vLLM + plugin", vllm + extend, long),
            "plain-inside": ("plain vLLM, inside L", vllm + ["--max-model-len", str(train)], short),
            "plugin-inside": ("vLLM + plugin, inside L", vllm + extend, short)}
    done = {key: run(name, command, ours_model, documents, args.max_tokens, logs, warm)
            for key, (name, command, documents) in runs.items() if key in chosen}
    rows = list(done.values())
    print(f"{'server':<26} {'req/s':>7} {'× first':>8} {'TTFT s':>8} {'× first':>8} {'decode tok/s':>13}")
    for group in ([done[k] for k in SERVERS[:2] if k in done], [done[k] for k in SERVERS[2:] if k in done]):
        if not group:
            continue
        base = group[0]
        for row in group:
            print(f"{row['server']:<26} {row['requests_per_s']:>7.2f} {row['requests_per_s'] / base['requests_per_s']:>8.2f} "
                  f"{row['ttft_s']:>8.2f} {row['ttft_s'] / base['ttft_s']:>8.2f} {row['decode_tok_s']:>13.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

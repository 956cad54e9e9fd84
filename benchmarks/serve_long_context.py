"""Serving a long document: time to first token of a first and a follow-up question, decode speed, and
requests/s under a bounded load, measured against a real `selfextend serve` process.

    python benchmarks/serve_long_context.py [--model testbed] [--tokens 40000] [--check-exact]

The follow-up shares the document with the first question, so the server resumes from its kept prefix;
--check-exact also asks it of a second server with prefix reuse off and compares the answers. The
ratio printed is follow-up TTFT ÷ first TTFT, measured in this run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from local_server import free_port, wait_until_healthy
from selfextend import models
from selfextend.samples import passkey_sample


class Server:
    """`selfextend serve` in a child process, on 127.0.0.1, stopped on exit."""

    def __init__(self, model: str | None, log: Path, *extra: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "selfextend", "serve", "--port", str(self.port), *extra]
        if model:
            command += ["--model", model]
        self.log = open(log, "w")
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT)
        wait_until_healthy(self.url, self.process, log, 900)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.process.terminate()
        self.process.wait(60)
        self.log.close()

    def peak_rss_mib(self) -> float:
        return int(Path(f"/proc/{self.process.pid}/status").read_text().split("VmHWM:")[1].split()[0]) / 1024

    def ask(self, name: str, prompt: str, max_tokens: int) -> dict:
        """Stream one completion; returns its text, TTFT, total time and the server's own figures."""
        body = {"model": name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
        started, first, text, final, usage = time.perf_counter(), None, "", {}, {}
        with httpx.stream("POST", f"{self.url}/v1/completions", json=body, timeout=3600) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk.get("choices", []):
                    if choice["text"] and first is None:
                        first = time.perf_counter()
                    text += choice["text"]
                if "selfextend" in chunk:
                    final = chunk["selfextend"]
        return {"text": text, "ttft": (first or time.perf_counter()) - started, "seconds": time.perf_counter() - started,
                "usage": usage, "server": final}


def load(server: Server, name: str, users: int, each: int, prompt: str) -> tuple[float, int, int]:
    """`users` clients × `each` short requests at once; 429s are retried after Retry-After. Requests/s, 429s, failures."""
    refused, failed, lock = [0], [0], threading.Lock()

    def user() -> None:
        with httpx.Client(timeout=600) as client:
            for _ in range(each):
                for _attempt in range(50):
                    r = client.post(f"{server.url}/v1/completions",
                                    json={"model": name, "prompt": prompt, "max_tokens": 8, "temperature": 0})
                    if r.status_code != 429:
                        break
                    with lock:
                        refused[0] += 1
                    time.sleep(float(r.headers["retry-after"]))
                if r.status_code != 200:
                    with lock:
                        failed[0] += 1

    started = time.perf_counter()
    threads = [threading.Thread(target=user) for _ in range(users)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(1800)
    return users * each / (time.perf_counter() - started), refused[0], failed[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="default: the embedded Gemma 3 270M")
    parser.add_argument("--tokens", type=int, default=40000, help="document length in tokens")
    parser.add_argument("--check-exact", action="store_true", help="compare the follow-up with prefix reuse off")
    parser.add_argument("--out", default="runs/serve_bench", help="folder for server logs and results.json")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = args.model or models.DEFAULT_MODEL
    tokenizer = models.load_tokenizer(models.resolve(args.model))
    sample = passkey_sample(lambda text: len(tokenizer(text, add_special_tokens=False).input_ids), args.tokens)
    first = f"{sample.text}\n\n{sample.question}"
    follow_up = f"{sample.text}\n\nWhat is the pass key? Answer with the number only. The pass key is"
    results = {"model": name, "document_tokens": args.tokens, "key": sample.answer}
    with Server(args.model, out / "server.log") as server:
        for label, prompt, max_tokens in (("first", first, 32), ("follow_up", follow_up, 32),
                                          ("third", f"{sample.text}\n\nCopy the first sentence of the text above:",
                                           64)):
            results[label] = server.ask(name, prompt, max_tokens)
            r = results[label]
            print(f"{label:>9}: TTFT {r['ttft']:.1f}s, total {r['seconds']:.1f}s, cached "
                  f"{r['usage'].get('prompt_tokens_details', {}).get('cached_tokens')} of "
                  f"{r['usage'].get('prompt_tokens')} prompt tokens, plan G={r['server'].get('group_size')} "
                  f"W={r['server'].get('window_size')}: {r['text']!r}", flush=True)
        third = results["third"]
        decode = third["usage"]["completion_tokens"] - 1
        results["decode_tokens_per_second"] = decode / max(third["server"]["decode_seconds"], 1e-9)
        short = "The pass key is 12345. Remember it. 12345 is the pass key. What is the pass key? The pass key is"
        rps, refused, failed = load(server, name, 16, 4, short)
        results["load"] = {"requests_per_second": rps, "refused_429": refused, "failed": failed}
        results["peak_rss_mib"] = server.peak_rss_mib()
    if args.check_exact:
        with Server(args.model, out / "server_no_reuse.log", "--prefix-cache-mb", "0") as plain:
            control = plain.ask(name, follow_up, 32)
        results["follow_up_without_reuse"] = control
        results["identical_with_and_without_reuse"] = control["text"] == results["follow_up"]["text"]
    ratio = results["follow_up"]["ttft"] / results["first"]["ttft"]
    results["follow_up_ttft_ratio"] = ratio
    print(f"follow-up TTFT ÷ first TTFT = {ratio:.3f}; decode {results['decode_tokens_per_second']:.1f} tok/s at "
          f"{args.tokens} tokens; load 16×4: {rps:.2f} req/s ({refused} refusals retried, {failed} failed); "
          f"peak RSS {results['peak_rss_mib']:.0f} MiB")
    if args.check_exact:
        print(f"follow-up answer identical without reuse: {results['identical_with_and_without_reuse']}")
    (out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

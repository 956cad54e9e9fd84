"""The README's main job inside vLLM: the embedded Gemma 3 270M reads the ~40K-token passkey document past its
32K training length, with the plugin planning G and W against the shipped profile's E, as `selfextend
generate --sample-tokens 40000` does. Prints the plan, the answer, and the time to the first token and per
new token. Run it in vLLM's virtual environment, after the main job has converted the weights once:

    .venv-vllm/bin/python benchmarks/vllm_gemma_passkey.py [--tokens 40000] [--new-tokens 32]

vLLM runs the model on every core this process may use, as the main job does (VLLM_CPU_OMP_THREADS_BIND, unless
set: vLLM's own choice keeps one core for its scheduler, half of a two-core machine).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(str(core) for core in sorted(os.sched_getaffinity(0))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=40000)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()

    from vllm import LLM, SamplingParams

    from selfextend import models
    from selfextend.planning.profiles import SHIPPED, load_profile
    from selfextend.samples import passkey_sample, token_counter

    source = models.resolve(None)
    if source.gguf_file is not None:
        raise SystemExit("the weights are not converted yet: run `selfextend generate --sample-tokens 1000` once")
    folder = source.name_or_path
    tokenizer = models.load_tokenizer(source)
    sample = passkey_sample(token_counter(tokenizer), args.tokens)
    ids = tokenizer(f"{sample.text.strip()}\n\n{sample.question}").input_ids
    length = len(ids) + args.new_tokens
    if "architectures" not in json.loads((Path(folder) / "config.json").read_text()):
        raise SystemExit(f"{folder} was converted by an older selfextend, in a form vLLM cannot read (no "
                         "architecture, the tied embedding stored as lm_head): delete it and convert again")
    # the shipped profile the main job plans against (found there by the loaded model's identity)
    effective = next(p.effective_length for p in map(load_profile, sorted(SHIPPED.glob("*.json")))
                     if p.model == models.DEFAULT_MODEL)
    llm = LLM(model=folder, dtype="float32", enforce_eager=True, max_model_len=length,
              hf_overrides={"max_position_embeddings": length},
              additional_config={"selfextend": {"effective_length": effective}})
    started = time.perf_counter()
    first = llm.generate([{"prompt_token_ids": ids}], SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
    prefill = time.perf_counter() - started
    started = time.perf_counter()
    out = llm.generate([{"prompt_token_ids": ids}], SamplingParams(temperature=0, max_tokens=args.new_tokens),
                       use_tqdm=False)[0].outputs[0]
    whole = time.perf_counter() - started
    print(f"{len(ids)} prompt tokens, E = {effective}; prefill {prefill:.1f} s ({len(ids) / prefill:.0f} tok/s); "
          f"{len(out.token_ids)} new tokens in {whole:.1f} s from the prefix cache; first token "
          f"{first[0].outputs[0].text!r}")
    print(f"answer: {out.text!r}; the key {sample.answer} is {'found' if sample.answer in out.text else 'NOT found'}")


if __name__ == "__main__":
    main()

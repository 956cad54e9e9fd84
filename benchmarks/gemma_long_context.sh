#!/usr/bin/env bash
# The real-model results of docs/results.md: the embedded Gemma 3 270M (training length 32K) at 16K-64K,
# every method side by side on the same samples. CPU, 2 cores: the passkey run took 52 min; perplexity at
# 64K runs at roughly 60 tokens/s there (about 1.5 h for five methods). Resumable: rerun to go on.
set -euo pipefail
out=${1:-runs/gemma}
methods=vanilla,selfextend,linear,dynamic,yarn
time selfextend eval passkey --lengths 16k,32k,48k,64k --methods $methods --depths 0.5 --samples 1 --out "$out/passkey"
time selfextend eval perplexity --lengths 64k --methods $methods --bucket 4096 --out "$out/perplexity"

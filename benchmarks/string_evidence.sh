#!/usr/bin/env bash
# Issue #13's evidence: STRING beside vanilla and SelfExtend on the same samples (docs/results.md, "STRING").
# Testbed lines take seconds. Gemma lines: about 1.5 CPU-hours on 2 cores (24K ≈ 1.5 min, 32K ≈ 2 min a
# sample when nothing else runs); every eval resumes, so rerun to go on. 32000 tokens, not 32K: STRING
# works inside the training length (32768), and the question and answer need room.
set -euo pipefail
out=${1:-runs/string13}
tb="--model testbed --depths 0,0.25,0.5,0.75,1 --samples 4 --quiet"
# testbed at 1x (inside its 128 tokens) for all three; at 2x STRING does not apply (it refuses)
selfextend eval passkey $tb --lengths 120 --methods vanilla,selfextend,string --out "$out/testbed-1x"
selfextend eval passkey $tb --lengths 256 --methods vanilla,selfextend --out "$out/testbed-2x"
# Gemma 3 270M (training length 32768, measured E = 14336): passkey, 2 keys x 3 depths
gemma="--depths 0.25,0.5,0.75 --quiet"
time selfextend eval passkey --lengths 24k --methods vanilla,selfextend,string --samples 2 $gemma --out "$out/passkey"
time selfextend eval passkey --lengths 32000 --methods vanilla,selfextend,string --samples 2 $gemma --out "$out/passkey"
# niah at 32000, 3 depths
time selfextend eval niah --lengths 32000 --methods vanilla,selfextend,string $gemma --out "$out/niah"
# perplexity on the bundled KJV text at 32000, by position band
time selfextend eval perplexity --lengths 32000 --methods vanilla,selfextend,string --quiet --out "$out/perplexity"

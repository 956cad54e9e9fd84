#!/usr/bin/env bash
# Issue #10's evidence for the planner (docs/results.md, "Planning against the effective length").
# Testbed lines: seconds each. Gemma lines: about two CPU-hours on 2 cores in all (40K ≈ 2.5 min and
# 64K ≈ 4.5 min a sample when nothing else runs); every eval resumes, so rerun to go on.
set -euo pipefail
out=${1:-runs/plan10}
tb="--model testbed --depths 0,0.25,0.5,0.75,1 --samples 4 --quiet"
# testbed: the planned G/W at 4x, 8x, 16x its 128 tokens (the testbed's profile is E = L = 128)
selfextend eval passkey $tb --lengths 512,1024,2048 --methods selfextend --out "$out/testbed-planned"
# testbed: G/W by hand, to see what any plan could reach
selfextend eval passkey $tb --lengths 1024 --out "$out/testbed-sweep" --methods \
  selfextend:G=8,W=32,selfextend:G=12,W=32,selfextend:G=16,W=32,selfextend:G=24,W=32,selfextend:G=16,W=16,selfextend:G=10,W=16,selfextend:G=20,W=16,selfextend:G=12,W=48,selfextend:G=16,W=48,selfextend:G=12,W=64,selfextend:G=12,W=8,selfextend:G=16,W=8,selfextend:G=24,W=8,selfextend:G=32,W=8,selfextend:G=16,W=4
selfextend eval passkey $tb --lengths 2048 --out "$out/testbed-sweep" --methods \
  selfextend:G=32,W=32,selfextend:G=24,W=32,selfextend:G=48,W=32,selfextend:G=32,W=48,selfextend:G=32,W=16
# Gemma 3 270M: its effective length (the shipped profile)
time selfextend calibrate
# passkey, 2 keys x 3 depths: planned against the calibrated E (the shipped profile), then the old plan
time selfextend eval passkey --lengths 40k,64k --methods selfextend --depths 0.25,0.5,0.75 --samples 2 --out "$out/passkey" --quiet
time selfextend eval passkey --lengths 40k --methods selfextend:G=3,W=8190,vanilla --depths 0.25,0.5,0.75 --samples 2 --out "$out/passkey" --quiet
time selfextend eval passkey --lengths 64k --methods selfextend:G=5,W=8190 --depths 0.25,0.5,0.75 --samples 2 --out "$out/passkey" --quiet
# the README's main job, no flags
time selfextend generate --sample-tokens 40000 --quiet
# niah (not the passkey template), 3 depths: calibrated plan vs the old plan (40K: G=3, 64K: G=5, W=8190)
time selfextend eval niah --lengths 40k --methods selfextend,selfextend:G=3,W=8190 --depths 0.25,0.5,0.75 --out "$out/niah" --quiet
time selfextend eval niah --lengths 64k --methods selfextend,selfextend:G=5,W=8190 --depths 0.25,0.5,0.75 --out "$out/niah" --quiet

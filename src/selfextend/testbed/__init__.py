"""The testbed: a tiny RoPE decoder this project trains itself (scripts/train_testbed.py) to read passkeys.

Trained at 128 tokens on the passkey template, it lets tests check the real claim in seconds: past its
training length vanilla attention loses the key and SelfExtend keeps it.
"""

from pathlib import Path

WEIGHTS = Path(__file__).parent / "weights"
TRAIN_LENGTH = 128

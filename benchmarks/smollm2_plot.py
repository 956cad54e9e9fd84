"""docs/smollm2_perplexity_by_position.png from the committed SmolLM2 perplexity rows, each SelfExtend line
named by its G and W and the one the planner picks today marked "planned" (an older plan's row says so).

    python benchmarks/smollm2_plot.py
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from selfextend.evaluation import plot
from selfextend.planning import plan

ROOT = Path(__file__).resolve().parent.parent
ROWS = ROOT / "benchmarks/results/smollm2_22/ppl.jsonl"
OUT = ROOT / "docs/smollm2_perplexity_by_position.png"
TRAINING, EFFECTIVE = 8192, 2048  # SmolLM2's training length and its shipped profile's E


def label(row: dict) -> str:
    """The row's legend name: SelfExtend rows say whether they are today's plan for their length."""
    if not row["method"].startswith("selfextend"):
        return row["method"]
    group, window = row["params"]["G"], row["params"]["W"]
    planned = plan(TRAINING, row["length"], EFFECTIVE).settings
    if (group, window) == (planned.group_size, planned.window_size):
        return f"selfextend G={group} W={window}, planned"
    return f"selfextend G={group} W={window}" + (", an older plan" if row["method"] == "selfextend" else "")


def main() -> None:
    rows = [json.loads(line) for line in ROWS.read_text().splitlines() if line.strip()]
    rows = [{**row, "method": label(row), "params": {}} if row["method"].startswith("selfextend") else row
            for row in rows]
    with tempfile.TemporaryDirectory() as folder:
        [written] = plot(rows, Path(folder))
        shutil.copyfile(written, OUT)
    print(f"wrote {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()

"""Print a markdown summary of ``bench/comm_accuracy.py`` JSON output.

Usage: ``python bench/summarize.py comm_accuracy.json``
"""

from __future__ import annotations

import json
import sys
from typing import Any


def _fmt_bytes(b: float) -> str:
    return f"{b / 1000:.1f} kB" if b >= 1000 else f"{b:.0f} B"


def summarize(data: dict[str, Any]) -> str:
    lines = []
    dense = data["dense_accuracy"]
    rows = data["rows"]
    for model in sorted({r["model"] for r in rows}, key=lambda m: m != "resnet_narrow"):
        lines.append(f"\n### {model} (dense accuracy {dense[model]:.3f})\n")
        lines.append(
            "| nodes | budget | acc fp32 | acc int8 | bytes/sample fp32 | dense TP fp32 | "
            "fewer bytes | bytes/sample int8 | sync points |"
        )
        lines.append("|---|---|---|---|---|---|---|---|---|")
        for n in sorted({r["nodes"] for r in rows if r["model"] == model}):
            sel = [r for r in rows if r["model"] == model and r["nodes"] == n]
            for b in sorted({r["budget"] for r in sel}, reverse=True):
                f32 = next(r for r in sel if r["budget"] == b and r["codec"] == "fp32")
                i8 = next(r for r in sel if r["budget"] == b and r["codec"] == "int8")
                red = f32["dense_bytes_per_sample"] / max(f32["bytes_per_sample"], 1)
                lines.append(
                    f"| {n} | {b} | {f32['accuracy']:.3f} | {i8['accuracy']:.3f} | "
                    f"{_fmt_bytes(f32['bytes_per_sample'])} | "
                    f"{_fmt_bytes(f32['dense_bytes_per_sample'])} | {red:.1f}x | "
                    f"{_fmt_bytes(i8['bytes_per_sample'])} | {f32['sync_points']} |"
                )
    skipped = data.get("skipped", [])
    if skipped:
        lines.append("\nSkipped (could not be partitioned):\n")
        for cell in skipped:
            lines.append(
                f"- {cell['model']}, {cell['nodes']} nodes, budget {cell['budget']}: "
                f"{cell['reason']}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    with open(args[0]) as f:
        print(summarize(json.load(f)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

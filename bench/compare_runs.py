"""Compare two result JSONs of the same benchmark (before vs after a change).

Prints a markdown table of the rows both runs have: the key columns, then ``before``,
``after`` and ``after/before`` for each figure. The benchmark is recognised from the JSON
(``bench/comm_accuracy.py``, ``bench/latency.py``, ``bench/train.py`` or the summary of
``disco-fl demo --json``); ``--summary`` adds, per figure, the spread of the ratios and the
number of bit-identical rows (ratios over the rows whose before value is not 0).

Usage::

    python bench/compare_runs.py before.json after.json [--summary] [--metrics a,b]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

# benchmark: (key columns, figures)
KINDS: dict[str, tuple[list[str], list[str]]] = {
    "comm_accuracy": (
        ["model", "nodes", "budget", "codec"],
        ["accuracy", "bytes_per_sample", "train_seconds"],
    ),
    "latency": (
        ["mode", "nodes", "budget", "max_sync_points", "codec", "overlap", "link"],
        ["latency_ms_median", "throughput_per_s", "wire_bytes_per_sample", "accuracy"],
    ),
    "train": (
        ["plan", "mode", "phase"],
        ["step_ms_median", "bytes_per_step", "model_mb_per_node", "peak_rss_mb_per_node"],
    ),
    "demo": (["figure"], ["value"]),
}


def kind_of(data: dict[str, Any]) -> str:
    rows = data.get("rows")
    if not rows:
        return "demo"
    if "link" in rows[0]:  # latency rows may carry a codec too
        return "latency"
    if "codec" in rows[0]:
        return "comm_accuracy"
    return "train"


def _flatten(obj: Any, prefix: str, out: dict[str, float]) -> None:
    """Numeric leaves of the demo summary; list items are keyed by their ``round``."""
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return
    if isinstance(obj, (int, float)):
        out[prefix] = float(obj)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            if k != "timeline":  # per-node step timestamps: not a figure
                _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            tag = f"round{v['round']}" if isinstance(v, dict) and "round" in v else str(i)
            _flatten(v, f"{prefix}[{tag}]", out)


def table_rows(data: dict[str, Any], kind: str) -> dict[tuple[Any, ...], dict[str, Any]]:
    keys, _ = KINDS[kind]
    if kind == "demo":
        flat: dict[str, float] = {}
        _flatten(data, "", flat)
        return {(k,): {"value": v} for k, v in flat.items()}
    rows = {}
    for r in data["rows"]:
        if kind == "latency":  # runs from before rows had a codec and overlap: fp32, on
            default_codec = None if r.get("mode") == "single" else "fp32"
            r = {"codec": default_codec, "overlap": True, **r}
        rows[tuple(r.get(k) for k in keys)] = r
    if kind == "comm_accuracy":  # the dense models' accuracy, as extra rows
        for m, acc in data.get("dense_accuracy", {}).items():
            rows[(m, 1, None, "dense")] = {"accuracy": acc}
    return rows


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) >= 10000:
        return f"{v:,}"
    if isinstance(v, float):
        if v == int(v) and abs(v) >= 100:
            return f"{int(v):,}"
        return f"{v:.4g}" if abs(v) < 100 else f"{v:,.1f}"
    return str(v)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("before")
    ap.add_argument("after")
    ap.add_argument("--metrics", default=None, help="comma-separated figures (default: per kind)")
    ap.add_argument("--summary", action="store_true", help="add the ratio spread per figure")
    args = ap.parse_args(argv)

    before = json.loads(Path(args.before).read_text())
    after = json.loads(Path(args.after).read_text())
    kind = kind_of(before)
    if kind_of(after) != kind:
        ap.error(f"different benchmarks: {kind} vs {kind_of(after)}")
    keys, metrics = KINDS[kind]
    if args.metrics:
        metrics = args.metrics.split(",")
    b_rows, a_rows = table_rows(before, kind), table_rows(after, kind)
    common = [k for k in b_rows if k in a_rows]
    only = [k for k in b_rows if k not in a_rows] + [k for k in a_rows if k not in b_rows]

    print(f"{kind}: {len(common)} common rows ({len(only)} in one run only)\n")
    head = keys + [f"{m} {s}" for m in metrics for s in ("before", "after", "ratio")]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    ratios: dict[str, list[float]] = {m: [] for m in metrics}
    same: dict[str, int] = {m: 0 for m in metrics}
    numeric: dict[str, int] = {m: 0 for m in metrics}
    for k in common:
        cells = [_fmt(v) for v in k]
        for m in metrics:
            b, a = b_rows[k].get(m), a_rows[k].get(m)
            ratio = "-"
            if isinstance(b, (int, float)) and isinstance(a, (int, float)):
                numeric[m] += 1
                same[m] += a == b
                if b:
                    ratios[m].append(a / b)
                    ratio = f"{a / b:.3f}"
            cells += [_fmt(b), _fmt(a), ratio]
        print("| " + " | ".join(cells) + " |")
    if only:
        print(f"\nrows in one run only: {', '.join('/'.join(map(str, k)) for k in only)}")
    if args.summary:
        print("\n| figure | rows | bit-identical | ratio min | ratio median | ratio max |")
        print("|---|---|---|---|---|---|")
        for m in metrics:
            r = ratios[m]
            if r:
                print(
                    f"| {m} | {numeric[m]} | {same[m]} | {min(r):.3f} | "
                    f"{statistics.median(r):.3f} | {max(r):.3f} |"
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

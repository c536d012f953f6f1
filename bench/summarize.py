"""Print a markdown summary of ``bench/comm_accuracy.py`` JSON output; optionally plot the
metric against bytes per sample (PNG, one panel per task and model, one line per N).

Usage: ``python bench/summarize.py comm_accuracy.json [more.json ...] [--plot out.png]``
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

# metric name -> (column title, scale, format): mean IoU is printed in points
METRICS: dict[str, tuple[str, float, str]] = {
    "accuracy": ("acc", 1.0, "{:.3f}"),
    "miou": ("mIoU", 100.0, "{:.1f}"),
    "psnr_db": ("PSNR dB", 1.0, "{:.2f}"),
}


def _fmt_bytes(b: float) -> str:
    return f"{b / 1000:.1f} kB" if b >= 1000 else f"{b:.0f} B"


def _metric(data: dict[str, Any]) -> str:
    meta = data.get("meta", {})
    rows = data.get("rows", [])
    return str(meta.get("metric") or (rows[0].get("metric") if rows else None) or "accuracy")


def _fmt(metric: str, value: float | None) -> str:
    if value is None:  # not evaluated (see the row's JSON file)
        return "n/a"
    _, scale, fmt = METRICS.get(metric, METRICS["accuracy"])
    return fmt.format(value * scale)


def summarize(data: dict[str, Any]) -> str:
    lines = []
    dense = data["dense_accuracy"]
    rows = data["rows"]
    metric = _metric(data)
    title = METRICS.get(metric, METRICS["accuracy"])[0]
    dense_word = "accuracy" if metric == "accuracy" else title
    for model in sorted({r["model"] for r in rows}, key=lambda m: m != "resnet_narrow"):
        lines.append(f"\n### {model} (dense {dense_word} {_fmt(metric, dense[model])})\n")
        lines.append(
            f"| nodes | budget | {title} fp32 | {title} int8 | bytes/sample fp32 | "
            "dense TP fp32 | fewer bytes | bytes/sample int8 | sync points |"
        )
        lines.append("|---|---|---|---|---|---|---|---|---|")
        for n in sorted({r["nodes"] for r in rows if r["model"] == model}):
            sel = [r for r in rows if r["model"] == model and r["nodes"] == n]
            for b in sorted({r["budget"] for r in sel}, reverse=True):
                f32 = next(r for r in sel if r["budget"] == b and r["codec"] == "fp32")
                i8 = next(r for r in sel if r["budget"] == b and r["codec"] == "int8")
                red = f32["dense_bytes_per_sample"] / max(f32["bytes_per_sample"], 1)
                label = "dense" if b >= 1.0 and metric != "accuracy" else f"{b}"
                lines.append(
                    f"| {n} | {label} | {_fmt(metric, f32['accuracy'])} | "
                    f"{_fmt(metric, i8['accuracy'])} | "
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


# issue 16's bars at N = 2: within this much of dense, with >= 8x fewer fp32 bytes
BARS: dict[str, float] = {"miou": 0.01, "psnr_db": 0.3}


def bars(data: dict[str, Any], nodes: int = 2, min_reduction: float = 8.0) -> str:
    """The issue 16 check of a dense-prediction task at ``nodes``: the best fp32 row with at
    least ``min_reduction`` x fewer bytes than dense TP, against dense and no exchange."""
    metric = _metric(data)
    if metric not in BARS:
        return ""
    lines = []
    for model in sorted({r["model"] for r in data["rows"]}):
        rows = [
            r
            for r in data["rows"]
            if r["model"] == model and r["codec"] == "fp32" and r["nodes"] == nodes
        ]
        dense = data["dense_accuracy"][model]
        ok = [
            r for r in rows if r["dense_bytes_per_sample"] >= min_reduction * r["bytes_per_sample"]
        ]
        none = next((r for r in rows if r["budget"] == 0.0), None)
        if not ok:
            lines.append(f"- {model}, N = {nodes}: no row with {min_reduction:g}x fewer bytes")
            continue
        best = max(ok, key=lambda r: r["accuracy"])
        gap = dense - best["accuracy"]
        red = best["dense_bytes_per_sample"] / best["bytes_per_sample"]
        met = gap <= BARS[metric] + 1e-12 and (none is None or best["accuracy"] > none["accuracy"])
        text = (
            f"- {model}, N = {nodes}: best row with >= {min_reduction:g}x fewer bytes: budget "
            f"{best['budget']:g} ({red:.1f}x), {_fmt(metric, best['accuracy'])} vs dense "
            f"{_fmt(metric, dense)} (gap {_fmt(metric, gap)}, bar {_fmt(metric, BARS[metric])})"
        )
        if none is not None:
            text += f", no exchange {_fmt(metric, none['accuracy'])}"
        lines.append(text + (": **met**" if met else ": **not met**"))
    return "\n".join(lines)


def plot(datas: list[dict[str, Any]], path: str) -> None:
    """Write a PNG: for every (task, model) a panel of the metric (fp32 codec) against fp32
    bytes per sample (log scale), one line per node count, the dense model dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: list[tuple[str, str, str, list[dict[str, Any]], float]] = []
    seen: dict[tuple[str, str], int] = {}
    for data in datas:
        task = str(data.get("meta", {}).get("task", "classification"))
        for model in {r["model"] for r in data["rows"]}:
            seen[task, model] = seen.get((task, model), 0) + 1
    for data in datas:
        metric = _metric(data)
        meta = data.get("meta", {})
        task = str(meta.get("task", "classification"))
        for model in sorted({r["model"] for r in data["rows"]}):
            rows = [r for r in data["rows"] if r["model"] == model and r["codec"] == "fp32"]
            label = model
            setting = meta.get("settings", {}).get(model, {})
            if seen[task, model] > 1 and "finetune_epochs" in setting:  # several runs of it
                label += f", {setting.get('gate_epochs', 0)} + {setting['finetune_epochs']} epochs"
                if setting.get("max_steps"):
                    label += f" of {setting['max_steps']} steps"
                if "lr" in setting:  # a weight learning rate other than the default
                    label += f", lr {setting['lr']:g}"
            panels.append((task, label, metric, rows, data["dense_accuracy"][model]))
    if not panels:
        raise ValueError("no rows to plot")
    cols = min(3, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.8 * nrows), squeeze=False)
    for ax, (task, model, metric, rows, dense) in zip(axes.flat, panels, strict=False):
        title, scale, _ = METRICS.get(metric, METRICS["accuracy"])
        for n in sorted({r["nodes"] for r in rows}):
            sel = sorted((r for r in rows if r["nodes"] == n), key=lambda r: r["bytes_per_sample"])
            xs = [max(r["bytes_per_sample"], 1) for r in sel]
            ax.plot(xs, [r["accuracy"] * scale for r in sel], "o-", label=f"N = {n}")
            for r, x in zip(sel, xs, strict=True):
                label = "dense" if r["budget"] >= 1.0 else f"{r['budget']:g}"
                ax.annotate(
                    label,
                    (x, r["accuracy"] * scale),
                    fontsize=7,
                    xytext=(3, -9),
                    textcoords="offset points",
                )
        ax.axhline(dense * scale, color="gray", ls="--", lw=1, label="dense model")
        ax.set_xscale("log")
        ax.set_xlabel("bytes per sample (fp32)")
        ax.set_ylabel(title)
        ax.set_title(f"{task}: {model}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("json", nargs="+", help="comm_accuracy.py output files")
    ap.add_argument("--plot", default=None, help="write a PNG of metric vs bytes per sample")
    args = ap.parse_args(argv)
    datas = []
    for name in args.json:
        with open(name) as f:
            datas.append(json.load(f))
    for data in datas:
        print(summarize(data))
        check = bars(data)
        if check:
            print("\nBars (issue 16):\n" + check)
    if args.plot:
        plot(datas, args.plot)
        print(f"\nwrote {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Latency vs link from a ``bench/latency.py`` JSON (PNG).

One panel per N: the median latency (``latency_ms_median``, log scale) of ``single``, dense
TP and every DISCO plan on each link, fastest link first; a DISCO plan with overlap on is a
solid line, the same plan with overlap off (``disco-fl serve --no-overlap``) dashed in the
same colour. matplotlib is a dev dependency (Agg backend, no display).

Usage::

    python bench/latency_plot.py r50.json --out r50.png
    python bench/latency_plot.py r50.json r50_more.json --out r50.png   # more plans, one plot
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def _mbps(link: str) -> float:
    """A link's rate in Mbit/s from its name ("100Mbit_2ms", "1Gbit_0.5ms"), for ordering
    (0 when the name does not say)."""
    rate = link.split("_")[0]
    for unit, scale in (("Gbit", 1000.0), ("Mbit", 1.0)):
        if rate.endswith(unit):
            try:
                return float(rate[: -len(unit)]) * scale
            except ValueError:
                break
    return 0.0


def series(data: dict[str, Any], nodes: int) -> tuple[list[str], list[dict[str, Any]]]:
    """The links (fastest first) and one series per configuration at N = ``nodes`` (plus
    ``single``): ``{"label", "mode", "overlap", "key", "ms": [per link, None if absent]}``."""
    rows = data["rows"]
    links = sorted({r["link"] for r in rows}, key=lambda k: -_mbps(k))
    out: dict[tuple[Any, ...], dict[str, Any]] = {}
    for r in rows:
        if r["mode"] != "single" and r["nodes"] != nodes:
            continue
        codec = r.get("codec")
        caps = tuple(r["capacities"]) if r.get("capacities") else None
        plan = (r["mode"], r.get("budget"), r.get("max_sync_points"), codec, caps)
        key = (*plan, bool(r.get("overlap", True)))
        if r["mode"] == "single":
            label = "single device"
        elif r["mode"] == "dense_tp":
            label = f"dense TP{'' if codec in (None, 'fp32') else f' {codec}'}"
        else:
            label = f"DISCO budget {r['budget']}"
            label += f", sync<={r['max_sync_points']}" if r.get("max_sync_points") else ""
            label += f", {codec}" if codec else ""
            label += f", slices {'/'.join(f'{c:g}' for c in caps)}" if caps else ""
        if not key[-1]:
            label += " (no overlap)"
        s = out.setdefault(
            key,
            {"label": label, "mode": r["mode"], "overlap": key[-1], "key": plan, "ms": {}},
        )
        s["ms"][r["link"]] = r["latency_ms_median"]
    result = []
    for s in out.values():
        s["ms"] = [s["ms"].get(link) for link in links]
        result.append(s)
    return links, result


def plot(data: dict[str, Any], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    all_nodes = sorted({r["nodes"] for r in data["rows"] if r["mode"] != "single"})
    fig, axes = plt.subplots(
        1, max(len(all_nodes), 1), figsize=(7 * max(len(all_nodes), 1), 5), squeeze=False
    )
    model = data.get("model") or data["rows"][0].get("model", "")
    for ax, n in zip(axes[0], all_nodes or [2], strict=False):
        links, ss = series(data, n)
        colours: dict[tuple[Any, ...], Any] = {}
        cmap = plt.get_cmap("tab20")  # 20 distinct colours (tab10 repeats after 10 plans)
        cycle = iter([cmap(i % 20) for i in range(0, 40, 2)] + [cmap(i) for i in range(1, 40, 2)])
        for s in ss:
            if s["mode"] == "single":
                colour = "black"
            elif s["mode"] == "dense_tp":
                colour = "grey"
            else:
                if s["key"] not in colours:  # one colour per plan, overlap on and off alike
                    colours[s["key"]] = next(cycle)
                colour = colours[s["key"]]
            xs = [i for i, v in enumerate(s["ms"]) if v is not None]
            ax.plot(
                xs,
                [s["ms"][i] for i in xs],
                marker="o",
                color=colour,
                linestyle="-" if s["overlap"] else "--",
                linewidth=2.5 if s["mode"] == "single" else 1.5,
                label=s["label"],
            )
        ax.set_xticks(range(len(links)), links)
        ax.set_yscale("log")
        ax.set_xlabel("link (rate, round trip)")
        ax.set_ylabel("median latency per image, ms (log)")
        masks = data.get("masks")
        note = f"; masks {masks}" if masks == "random-calibrated" else ""
        ax.set_title(f"{model}, N = {n}{note}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def merged(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The first run, with the DISCO rows of the later ones (runs of other plans of the same
    model; their single and dense-TP rows, measured again, are left out)."""
    out = dict(runs[0])
    out["rows"] = list(runs[0]["rows"]) + [
        r for run in runs[1:] for r in run["rows"] if r.get("mode") == "disco"
    ]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "json",
        nargs="+",
        help="bench/latency.py --json output(s); later files add their DISCO rows",
    )
    ap.add_argument("--out", required=True, help="PNG to write")
    args = ap.parse_args(argv)
    plot(merged([json.loads(Path(f).read_text()) for f in args.json]), args.out)
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

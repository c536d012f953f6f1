"""The compute-bound model of ``bench/latency.py --model resnet50`` and its plans.

torchvision's ``resnet50()`` (random init, no download, eval mode) at ``--image-size`` px on
random images (fixed seed). No trained plan exists for it, so the DISCO plans carry hard masks
from **calibrated random gate logits**: every gate logit is set to a seeded N(0, 1) value, then
:func:`disco_fl.emulation.budget.calibrate_masks` opens the highest logits first while the
exchange fits the byte budget, keeping at most ``max_sync_points`` exchanging layers. Which
channels cross is random; how many bytes cross and how many sync points they cost is what a
trained plan at the same budget and limit would have, which is all latency depends on. No
accuracy is claimed for these plans (``accuracy`` is ``null``).

torchvision is a dev / test dependency only: it is imported here, lazily, through the tests'
shim (``tests/conftest.import_torchvision``: its compiled ops do not load with this project's
CPU torch, the model definitions do).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import disco_fl
from disco_fl.emulation.budget import calibrate_masks

MASKS = "random-calibrated"
# (budget, max sync points or None, codec[, capacities]) of the DISCO plans; the issue's
# recipe is (0.05, 8, "int8"): int8 on the wire, at most 8 sync points. Capacities (relative,
# one per node, node 0 the requester) give uneven slices (``partition(..., capacities=)``):
# a requester holding more than its share hides the input hop, the time the image takes to
# reach the other nodes while it computes (see BENCHMARKS.md, "ResNet-50 at 224 px")
Spec = tuple[Any, ...]  # (budget, max sync, codec) or (budget, max sync, codec, capacities)
PLANS: list[Spec] = [
    (0.1, None, "fp32"),
    (0.1, 8, "int8"),
    (0.05, None, "fp32"),
    (0.05, None, "int8"),
    (0.05, 8, "fp32"),
    (0.05, 8, "int8"),
]
QUICK_PLANS: list[Spec] = [(0.05, None, "fp32"), (0.05, 8, "int8")]


def parse_plans(text: str) -> list[Spec]:
    """``"0.02:8:int8,0.05:-:fp32,0.02:4:int8:57/43"`` -> ``[(0.02, 8, "int8"), (0.05, None,
    "fp32"), (0.02, 4, "int8", (57.0, 43.0))]`` (the optional fourth field: capacities)."""
    out: list[Spec] = []
    for item in text.split(","):
        parts = item.split(":")
        if len(parts) not in (3, 4):
            raise ValueError(f"plan {item!r}: want budget:max-sync:codec[:capacities]")
        budget, sync, codec = parts[:3]
        if codec not in ("fp32", "fp16", "int8"):
            raise ValueError(f"plan {item!r}: codec must be fp32, fp16 or int8")
        spec: Spec = (float(budget), None if sync in ("-", "") else int(sync), codec)
        if len(parts) == 4:
            caps = tuple(float(c) for c in parts[3].split("/"))
            if not caps or min(caps) <= 0:
                raise ValueError(f"plan {item!r}: capacities must be positive, e.g. 57/43")
            spec = (*spec, caps)
        out.append(spec)
    return out


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def load_resnet50(
    image_size: int, count: int, seed: int = 0
) -> tuple[torch.nn.Module, torch.Tensor]:
    """torchvision's ``resnet50()`` (random init, seed ``seed``, eval) and ``count`` random
    ``(3, image_size, image_size)`` images (seed ``seed + 1``)."""
    root = str(Path(__file__).resolve().parents[1])  # tests/ of this checkout
    if root not in sys.path:
        sys.path.insert(0, root)
    from tests.conftest import import_torchvision

    tv = import_torchvision()
    torch.manual_seed(seed)
    model = tv.models.resnet50(weights=None).eval()
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(count, 3, image_size, image_size, generator=g)
    return model, x


def randomize_gates(pm: Any, seed: int = 0) -> None:
    """Set every gate logit of ``pm`` to a seeded N(0, 1) value (same seed, same logits)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, d, gates in pm.gate_items():
            gates.log_alpha[str(d)].copy_(torch.randn(gates.num_channels, generator=g))


def random_calibrated_plans(
    model: torch.nn.Module,
    n: int,
    x: torch.Tensor,
    out: Path,
    plans: list[Spec] = PLANS,
    seed: int = 0,
    log: Callable[[str], None] = _log,
    meta: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Export the dense-TP plan (fp32) and one plan per ``(budget, max_sync, codec)`` of
    ``plans``, with hard masks from calibrated random gate logits, under ``out`` (each
    plan's ``meta``: ``meta``, e.g. the input normalization of uint8 requests).

    Returns ``bench/latency.py``'s plan dicts (``mode``, ``dir``, ``budget``,
    ``max_sync_points``, ``accuracy`` = None) plus ``codec``, ``masks``, ``overlaps`` (the
    DISCO plans run with overlap on and off, dense TP on only) and ``exchange_fraction``.
    """
    t0 = time.time()
    pm = disco_fl.partition(model, n, x[:2]).eval()
    log(f"N={n}: partitioned resnet50 at {x.shape[-1]} px in {time.time() - t0:.1f} s")
    d = out / f"r50_n{n}_dense"
    pm.export(d, meta=meta)
    result = [
        {
            "mode": "dense_tp",
            "dir": d,
            "budget": None,
            "max_sync_points": None,
            "codec": "fp32",
            "masks": None,
            "overlaps": [True],
            "accuracy": None,
            "exchange_fraction": 1.0,
        }
    ]
    by_caps: dict[tuple[float, ...] | None, Any] = {None: pm}
    for spec in plans:
        budget, max_sync, codec = spec[:3]
        caps = tuple(spec[3]) if len(spec) > 3 else None
        if caps is not None and len(caps) != n:
            raise ValueError(f"plan {spec}: {len(caps)} capacities for {n} nodes")
        if caps not in by_caps:
            by_caps[caps] = disco_fl.partition(model, n, x[:2], capacities=caps).eval()
        pmc = by_caps[caps]
        randomize_gates(pmc, seed)  # the same logits for every plan: the budgets nest
        pmc.set_all_masks(1.0)
        achieved = calibrate_masks(pmc, budget, max_sync)
        slices = "even" if caps is None else "/".join(f"{c:g}" for c in caps)
        tag = "" if caps is None else "_c" + "-".join(f"{c:g}" for c in caps)
        d = out / f"r50_n{n}_b{budget}_s{max_sync}_{codec}{tag}"
        pmc.export(d, codec=codec, meta=meta)
        rep = pmc.comm_report(codec)
        log(
            f"N={n} budget {budget} max_sync {max_sync} {codec} slices {slices}: masks {MASKS} "
            f"(no trained plan), {rep.bytes_per_sample:,} B/sample ({rep.reduction:.1f}x less "
            f"than dense {codec}), exchange fraction {achieved:.4f}, sync points "
            f"{rep.sync_points}"
        )
        result.append(
            {
                "mode": "disco",
                "dir": d,
                "budget": budget,
                "max_sync_points": max_sync,
                "codec": codec,
                "capacities": None if caps is None else list(caps),
                "masks": MASKS,
                "overlaps": [True, False],
                "accuracy": None,
                "exchange_fraction": achieved,
            }
        )
    return result


def speed_table(rows: list[dict[str, Any]]) -> str:
    """The ``--model resnet50`` rows as a table: no accuracy or throughput columns (random
    calibrated masks, no throughput pass), codec, overlap and the speedup over one device."""
    head = (
        "| mode | N | budget | max sync | codec | slices | overlap | link | sync points "
        "| payload B/img | latency ms (median) | p90 ms | floor ms | latency / floor | vs single "
        "| node compute ms (diag.) |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['nodes']} | {'-' if r['budget'] is None else r['budget']} "
            f"| {r.get('max_sync_points') or '-'} | {r.get('codec') or '-'} "
            f"| {'/'.join(f'{c:g}' for c in r['capacities']) if r.get('capacities') else 'even'} "
            f"| {'on' if r.get('overlap', True) else 'off'} | {r['link']} | {r['sync_points']} "
            f"| {r['payload_bytes_per_sample']:,.0f} | {r['latency_ms_median']:.1f} "
            f"| {r.get('latency_ms_p90', r['latency_ms_median']):.1f} | {r['floor_ms']:.1f} "
            f"| {r['latency_ms_median'] / r['floor_ms']:.2f} "
            f"| {r.get('speedup_vs_single', 1.0):.2f}x "
            f"| {' / '.join(f'{v:.1f}' for v in r.get('node_compute_ms', []))} |"
        )
    return head + "\n".join(lines)

"""timm models through the ``torch.export`` capture (issue 15, beyond torchvision).

A handful of timm families at small input sizes, random weights, eval mode: capture with
``disco_fl.partition(model, 2, x, capture="export")``, then compare the emulation with gates
open to the original (max error relative to the output's scale, bar 1e-4). Writes one JSON
row per model (ok, or the capture's reason). timm is not a dependency of disco_fl or of the
test suite: ``pip install timm`` to run this (its import needs the same torchvision shim as
the tests, ``tests/conftest.import_torchvision``).

Usage::

    python bench/zoo_timm.py --out bench/results_zoo_timm.json [--only convnext_atto ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import disco_fl  # noqa: E402
from tests.conftest import import_torchvision  # noqa: E402

TOL = 1e-4
NODES = 2
# name -> (input side, extra kwargs of timm.create_model): small but valid for the model
MODELS: dict[str, tuple[int, dict[str, Any]]] = {
    "convnext_atto": (32, {}),
    "efficientnet_b0": (32, {}),
    "regnetx_002": (32, {}),
    "ghostnet_100": (32, {}),
    "mobilevit_xxs": (64, {}),
    "vit_tiny_patch16_224": (32, {"img_size": 32}),
    "swin_tiny_patch4_window7_224": (56, {"img_size": 56}),
    "swinv2_cr_tiny_ns_224": (64, {"img_size": 64, "window_size": 4}),
    "maxvit_pico_rw_256": (64, {"img_size": 64}),
    "crossvit_tiny_240": (240, {}),
}


def check(name: str) -> dict[str, Any]:
    import timm

    side, kwargs = MODELS[name]
    t = time.perf_counter()
    row: dict[str, Any] = {"model": name, "nodes": NODES, "side": side, "refused": None}
    try:
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False, **kwargs).eval()
        x = torch.randn(2, 3, side, side)
        with torch.no_grad():
            ref = model(x)
    except Exception as e:  # a model that does not build at this size: say so, go on
        row["refused"] = f"timm could not build / run it: {type(e).__name__}: {e}"
        row["seconds"] = round(time.perf_counter() - t, 1)
        return row
    row["params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 1)
    try:
        pm = disco_fl.partition(model, NODES, x, capture="export").eval()
        with torch.no_grad():
            out = pm(x)
        err = float((out - ref).abs().max() / ref.abs().max())
        row["rel_error"] = err
        row["exchanges"] = len(pm.program.exchanges)
        if not err <= TOL:
            row["refused"] = f"open gates differ from the original: {err:.2e} of the output scale"
    except disco_fl.PartitionError as e:
        row["refused"] = str(e)[:400]
    row["seconds"] = round(time.perf_counter() - t, 1)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("bench/results_zoo_timm.json"))
    ap.add_argument("--only", nargs="*")
    args = ap.parse_args()
    import_torchvision()  # timm imports torchvision
    rows = []
    for name in args.only or list(MODELS):
        row = check(name)
        print(json.dumps(row), flush=True)
        rows.append(row)
    ok = sum(r["refused"] is None for r in rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    summary = {"nodes": NODES, "ok": ok, "total": len(rows), "tolerance": TOL, "rows": rows}
    args.out.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"{ok} of {len(rows)} partition and match the original at N={NODES}")


if __name__ == "__main__":
    main()

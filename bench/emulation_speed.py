"""Train-step time of the emulation (fused vs lock-step) against the original model.

Usage: ``python bench/emulation_speed.py [--json OUT]`` (narrow ResNet, batch 128, 28x28).
Prints the median of 7 steps (forward + backward) per configuration.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

import disco_fl
from disco_fl.core.heap import tune_heap
from disco_fl.models import resnet_narrow


def _median_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, reps: int = 7) -> float:
    for _ in range(2):
        F.cross_entropy(model(x), y).backward()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        F.cross_entropy(model(x), y).backward()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    tune_heap()  # as the disco-fl processes it compares with (disco_fl.core.heap)
    torch.manual_seed(0)
    model = resnet_narrow().train()
    x, y = torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,))
    rows = [{"mode": "original", "nodes": 1, "step_ms": 1000 * _median_step(model, x, y)}]
    for n in (2, 4, 8):
        pm = disco_fl.partition(model, n, x[:2]).train()
        for execution in ("fused", "lockstep"):
            pm.execution = execution  # type: ignore[assignment]
            rows.append({"mode": execution, "nodes": n, "step_ms": 1000 * _median_step(pm, x, y)})
    for r in rows:
        print(f"{r['mode']:>9} N={r['nodes']}: {r['step_ms']:.1f} ms per train step")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "threads": torch.get_num_threads()}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

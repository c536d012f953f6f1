"""``disco-fl train --latency-target-ms T --link MBPS/RTT_MS [--compute-ms C]``: the budget,
sync-point limit and codec chosen together for a latency on a link
(:mod:`disco_fl.runtime.serving.latency_target`), and the trained plan predicted again.

The chooser sees the gates before training; the trained gates pick their own channels, so the
exported plan's latency is predicted again from its hard masks (the same
:func:`~disco_fl.runtime.serving.link_plans.link_ms` that a plan ladder uses), recorded next to
the choice in the plan's ``meta["latency_target"]`` and the summary JSON, and a plan that
misses the target is flagged.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch

from disco_fl.emulation.model import PartitionedModel
from disco_fl.partition.plan import plan_of
from disco_fl.runtime.serving.latency_target import (
    LatencyChoice,
    LatencyTargetError,
    choose_for_latency,
    dense_compute_ms,
    format_candidates,
    parse_link,
)
from disco_fl.runtime.serving.link_plans import LinkEstimate, link_ms, plan_traffic

Log = Callable[[str], None]


def add_args(p: argparse.ArgumentParser) -> None:
    """``disco-fl train``'s latency-target options."""
    p.add_argument(
        "--latency-target-ms",
        type=float,
        default=None,
        help="choose budget, max sync points and codec together: the most accurate setting "
        "predicted to answer one request within this many ms on --link (not with --budget, "
        "--codec, --max-sync-points)",
    )
    p.add_argument(
        "--link",
        default=None,
        metavar="MBPS/RTT_MS",
        help="the household's link for --latency-target-ms, e.g. 100/2 (100 Mbit/s, 2 ms "
        "round trip; `disco-fl probe --peers` measures it)",
    )
    p.add_argument(
        "--compute-ms",
        type=float,
        default=None,
        help="one node's computation per request (ms) in the prediction; default an "
        "estimate: the dense model's forward at batch 1 on one thread (median after warm-up) "
        "divided by --nodes",
    )
    p.add_argument(
        "--input-dtype",
        choices=["float32", "uint8"],
        default="float32",
        help="what the requests' input travels as in the prediction: float32 (default, with "
        "the codec) or uint8 (image pixels, 1 byte each, as `disco-fl infer` sends them)",
    )


def target_link(args: argparse.Namespace) -> LinkEstimate | None:
    """The link of ``--latency-target-ms`` (None without a target). The settings a target
    chooses may not be given with it, and ``--link`` / ``--compute-ms`` need a target."""
    if args.latency_target_ms is None:
        for flag, val in (
            ("--link", args.link),
            ("--compute-ms", args.compute_ms),
            ("--input-dtype", None if args.input_dtype == "float32" else args.input_dtype),
        ):
            if val is not None:
                raise ValueError(f"{flag} goes with --latency-target-ms")
        return None
    given = [
        flag
        for flag, val in (
            ("--budget", args.budget),
            ("--codec", args.codec),
            ("--max-sync-points", args.max_sync_points),
        )
        if val is not None
    ]
    if given:
        raise ValueError(
            "--latency-target-ms chooses the budget, sync-point limit and codec; do not give "
            f"{', '.join(given)} with it"
        )
    if args.link is None:
        raise ValueError("--latency-target-ms needs --link MBPS/RTT_MS (e.g. 100/2)")
    if args.compute_ms is not None and not args.compute_ms >= 0:
        raise ValueError(f"--compute-ms must be >= 0, got {args.compute_ms}")
    return parse_link(args.link)


def choose(
    args: argparse.Namespace,
    model: torch.nn.Module,
    pm: PartitionedModel,
    x: torch.Tensor,
    link: LinkEstimate,
    log: Log,
) -> LatencyChoice:
    """The setting for ``--latency-target-ms`` (candidate table and choice logged)."""
    compute = args.compute_ms
    if compute is None:
        compute = dense_compute_ms(model, x, args.nodes)
        log(
            f"compute estimate (dense forward at batch 1 on one thread / {args.nodes} nodes): "
            f"{compute:.2f} ms per node"
        )
    log(
        f"candidates for {args.latency_target_ms:g} ms on a link of {link.describe()}, "
        f"{args.input_dtype} input (predicted ms, busiest-link kB; * the choice):"
    )
    try:
        choice = choose_for_latency(
            pm, link, args.latency_target_ms, compute, input_dtype=args.input_dtype
        )
    except LatencyTargetError as e:
        for line in format_candidates(e.candidates):
            log(f"  {line}")
        raise
    for line in format_candidates(choice.candidates, choice):
        log(f"  {line}")
    lim = "none" if choice.max_sync_points is None else choice.max_sync_points
    log(
        f"chosen: budget {choice.budget:g}, max sync points {lim}, codec {choice.codec}: "
        f"predicted {choice.predicted_ms:.2f} ms (target {choice.target_ms:g} ms)"
    )
    return choice


def trained(
    args: argparse.Namespace, choice: LatencyChoice, pm: PartitionedModel, codec: str
) -> dict[str, Any]:
    """The record of the choice and of the trained plan's prediction (its hard masks)."""
    traffic = plan_traffic(plan_of(pm, codec), input_dtype=choice.input_dtype)
    trained_ms = choice.compute_ms + link_ms(traffic, choice.link)
    return {
        **choice.to_json(),
        "compute_ms_source": "given" if args.compute_ms is not None else "estimate",
        "predicted_ms_trained": trained_ms,
        "meets_target": trained_ms <= choice.target_ms,
    }


def report(choice: LatencyChoice, latency: dict[str, Any], log: Log) -> None:
    """One line of the summary, and a warning when the trained plan misses the target."""
    trained_ms, target = latency["predicted_ms_trained"], choice.target_ms
    print(
        f"  latency on {choice.link.describe()}: predicted {choice.predicted_ms:.2f} ms "
        f"before training, {trained_ms:.2f} ms trained (target {target:g} ms)"
    )
    if trained_ms > target:
        log(
            f"WARNING: the trained plan misses the latency target: predicted {trained_ms:.2f} "
            f"ms > {target:g} ms (training opened more sync points or bytes than the "
            "candidate was counted with); a lower target chooses a smaller setting"
        )

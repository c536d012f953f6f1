"""Round trip of one small frame between two processes over the gRPC peer transport.

A diagnostic for ``bench/latency.py``: what one hop of the runtime costs on this machine
without any link emulation (Python gRPC streams: sender queue -> gRPC thread -> loopback ->
server thread -> mailbox -> waiting thread). Frame: an fp32 tensor of shape (1, 8, 14, 14)
(6,272 payload bytes), as an exchange of the small ResNet at batch 1.

Usage::

    python bench/hop_latency.py [--n 400] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from disco_fl.proto_gen.disco.v1 import peer_pb2
from disco_fl.transport.grpc_transport import GrpcTransport
from disco_fl.wire import encode_tensor


def _frame(src: int, dst: int, i: int, t: torch.Tensor) -> peer_pb2.Frame:
    f = peer_pb2.Frame(
        session_id=f"s{i}", layer=0, src=src, dst=dst, direction=peer_pb2.Frame.FORWARD
    )
    encode_tensor(t, "fp32", out=f.tensor)
    return f


def _echo(port_q: Any, addr_q: Any, n: int) -> None:
    torch.set_num_threads(1)
    t = GrpcTransport(1, 2, plan_hash="h", num_layers=1)
    port_q.put(t.address)
    t.set_peers([addr_q.get(), t.address])
    t.connect()
    x = torch.zeros(1, 8, 14, 14)
    for i in range(n):
        t.recv(f"s{i}", 0, 0, 30)
        t.send(_frame(1, 0, i, x))
    time.sleep(1.0)
    t.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    ctx = mp.get_context("spawn")
    pq, aq = ctx.Queue(), ctx.Queue()
    p = ctx.Process(target=_echo, args=(pq, aq, args.n))
    p.start()
    t = GrpcTransport(0, 2, plan_hash="h", num_layers=1)
    peer = pq.get(timeout=60)
    aq.put(t.address)
    t.set_peers([t.address, peer])
    t.connect()
    x = torch.zeros(1, 8, 14, 14)
    rtts = []
    for i in range(args.n):
        t0 = time.perf_counter()
        t.send(_frame(0, 1, i, x))
        t.recv(f"s{i}", 0, 1, 30)
        rtts.append((time.perf_counter() - t0) * 1e6)
    p.join(30)
    t.close()
    steady = rtts[args.n // 10 :]
    out = {
        "round_trip_us_median": statistics.median(steady),
        "round_trip_us_p10": sorted(steady)[len(steady) // 10],
        "round_trip_us_p90": sorted(steady)[9 * len(steady) // 10],
        "n": len(steady),
    }
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

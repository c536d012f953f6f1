"""Serving a plan ladder with real ``disco-fl serve`` processes on loopback: the requester
picks the plan for the measured link, switches when the (emulated) link changes, and switches
back; every reply equals shard-only execution of the plan it names."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from disco_fl.cli.deployment import free_port_blocks
from disco_fl.emulation.export import load_shard, run_shards
from disco_fl.partition.plan import Plan
from disco_fl.runtime.serving import InferenceSession
from disco_fl.runtime.serving.ladder_server import port_offset
from disco_fl.runtime.transport.link_emulation import LinkSchedule
from tests.test_link_plans import _export
from tests.test_serve import Household

# the link of both nodes: fast, then slow from 12 s after the schedule's epoch, then fast
# again from 27 s; a dense plan (~97 kB on the busiest link) meets 80 ms only on the fast one
SCHEDULE = "0:1000/0.5,12:5/2,27:1000/0.5"
SLOW, FAST_AGAIN = 12.0, 27.0
TARGET_MS = 80.0
# every node counts the schedule from one epoch, given on the command line: from their own
# "household ready" the two nodes' clocks differ by however long one waited for the other
# (under load, seconds), and the slow phase then spans both nodes' windows
EPOCH_AFTER_S = 20.0  # the epoch: this long after the processes are started (> startup)
REACT_S = 8.0  # a switch follows a change of the link within this (probes every 0.5 s)
WATCH_S = 60.0  # bound on watching for the switches, from the epoch


class LadderHousehold(Household):
    def __init__(self, plan_dir: Path, addrs: list[str], workdir: Path, extra: list[str]):
        self.plan_dir, self.n, self.workdir, self.extra = plan_dir, len(addrs), workdir, extra
        self.addrs = addrs
        self.procs = [None] * self.n
        for k in range(self.n):
            self.start(k)
        self.wait_ready(range(self.n))


def test_schedule_parses_and_changes_at_its_times() -> None:
    s = LinkSchedule.parse(SCHEDULE)
    assert s.at(1e9).rate_bps == 1e9  # not started: the first link
    s.start(100.0)
    assert s.at(111.0).rate_bps == 1e9 and s.at(112.5).rate_bps == 5e6
    assert s.at(112.5).rtt_s == pytest.approx(0.002) and s.at(130.0).rate_bps == 1e9
    with pytest.raises(ValueError, match="increasing"):
        LinkSchedule.parse("0:10/1,0:20/1")
    with pytest.raises(ValueError, match="bad link schedule step"):
        LinkSchedule.parse("0:fast")


@pytest.mark.slow(seconds=50)
def test_ladder_switches_plan_with_the_link_and_back(tmp_path: Path) -> None:
    dense = _export(tmp_path / "dense", 0, 0.95, accuracy=0.9)
    sparse = _export(tmp_path / "sparse", 0, 0.05, accuracy=0.6)
    hashes = {Plan.load(p / "plan.json").hash: name for p, name in [(dense, "D"), (sparse, "S")]}
    addrs = [f"127.0.0.1:{p}" for p in free_port_blocks(2, 2)]
    work = tmp_path / "hh"
    work.mkdir()
    extra = [
        "--ladder",
        str(sparse),
        "--link-schedule",
        SCHEDULE,
        "--latency-target-ms",
        str(TARGET_MS),
        "--probe-interval",
        "0.5",
        "--link-probe-bytes",
        "65536",
    ]
    epoch = time.time() + EPOCH_AFTER_S
    extra += ["--link-epoch", repr(epoch)]
    hh = LadderHousehold(dense, addrs, work, extra)
    try:
        assert time.time() < epoch + SLOW - REACT_S, "the household took too long to start"
        shards = {
            h: [load_shard(p / "plan.json", k) for k in range(2)]
            for p, h in [(dense, next(iter(hashes))), (sparse, list(hashes)[1])]
        }
        x = torch.rand(1, 1, 28, 28)
        seen: list[str] = []
        when: list[float] = []
        with InferenceSession(addrs[0], timeout=30) as s:
            while time.time() - epoch < WATCH_S:
                out = s.infer(x)
                h = s.last_plan_hash
                assert h in hashes, h
                want = run_shards(shards[h], x)
                assert torch.allclose(out, want, atol=1e-4), (out - want).abs().max()
                if not seen or seen[-1] != hashes[h]:
                    seen.append(hashes[h])
                    when.append(time.time() - epoch)
                if seen == ["D", "S", "D"]:
                    break
                time.sleep(0.2)
            st = s.status()
        assert seen == ["D", "S", "D"], f"plans in use {seen}:\n{hh.log(0)[-3000:]}"
        # the switches follow the link's changes, not noise
        ok = SLOW < when[1] < SLOW + REACT_S and FAST_AGAIN < when[2] < FAST_AGAIN + REACT_S
        if not ok:
            print(hh.log(0))  # shown by pytest with the failure
        assert ok, f"switches at {when[1:]} s; the link changed at {SLOW}, {FAST_AGAIN} s"
        assert st["ladder"]["switches"] == 2
        assert st["ladder"]["target_ms"] == TARGET_MS
        assert [p["accuracy"] for p in st["ladder"]["plans"]] == [0.9, 0.6]
        log0 = hh.log(0)
        assert log0.count("plan switch") == 2 and "predicted" in log0
        # plan 1 of the ladder is served on the next port, by both nodes
        with InferenceSession(port_offset(addrs[0], 1)) as s1:
            assert s1.status()["plan_hash"] == list(hashes)[1]
    finally:
        hh.stop()

"""The Flower deployment with real processes on loopback: SuperLink, SuperNodes, ``flwr run``.

- the demo path (``disco-fl demo``, small settings, devices of capacities 1:3) writes its
  JSON, slices by capacity (the SuperNodes report it, the strategy partitions, ``disco-fl
  serve`` serves the uneven plan) and DISCO's accuracy is within ``ACCURACY_TOLERANCE`` of
  dense;
- a SuperNode killed mid-round: the failure is logged, the round completes for the other
  household, the checkpoint is consistent, and a new deployment resumes the run from it;
- a household missing a shard: a clear error before any training;
- degraded training: a household goes on without a killed non-owner SuperNode.

Every wait is bounded; every process is stopped in ``finally``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from disco_fl.cli.deployment import Deployment, descendants, wait_for_run, write_app
from disco_fl.fl.federated import ModelSpec

# one xdist worker runs these one after the other (pyproject.toml: --dist loadgroup) while
# the other computes: two Flower deployments at once slow each other down more
pytestmark = pytest.mark.xdist_group("flower")

ACCURACY_TOLERANCE = 0.15  # DISCO at budget 0.2 after 2 short rounds vs the dense model
DEMO_TIMEOUT_S = 480
RUN_TIMEOUT_S = 300
# joint steps per round where a node is killed at step 10: the kill lands mid-round with 14
# steps (seconds) to spare, and the survivors' rounds stay short
KILL_STEPS = 24


def _config(run_dir: Path, **over: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        **ModelSpec(num_nodes=2).to_config(),
        "households": 2,
        "num-rounds": 2,
        "steps": 6,
        "batch-size": 16,
        "budget": 0.3,
        "finetune-rounds": 1,
        "evaluate": False,
        "step-timeout": 10.0,
        "rendezvous-timeout": 20.0,
        "query-timeout": 60.0,
        "round-timeout": 120.0,
        "run-dir": str(run_dir),
    }
    cfg.update(over)
    return cfg


def _deploy(
    tmp: Path, name: str, households: dict[int, list[int]], tls: dict[int, Path] | None = None
) -> Deployment:
    """SuperLink + SuperNodes; households in ``tls`` use mutual TLS on their peer channel
    (``tls-dir`` node setting, certificates from :func:`disco_fl.security.make_household_certs`)."""
    dep = Deployment(tmp / name, 2, 2)
    dep.start_superlink()
    for h, shards in households.items():
        for k in shards:
            extra = {"tls-dir": str(tls[h])} if tls and h in tls else None
            dep.start_supernode(h, k, f"builtin:{h}/2" if k == 0 else "", extra)
    return dep


def _run_demo(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run the demo; past ``DEMO_TIMEOUT_S`` kill it and every process it started."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        out, err = p.communicate(timeout=DEMO_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        for pid in [*descendants([p.pid]), p.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        out, err = p.communicate(timeout=30)
        pytest.fail(f"the demo did not finish within {DEMO_TIMEOUT_S} s:\n{err[-4000:]}")
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


@pytest.mark.slow(seconds=135)
def test_demo_writes_json_and_disco_is_close_to_dense(tmp_path: Path) -> None:
    out = tmp_path / "demo.json"
    cmd = [
        sys.executable, "-m", "disco_fl.cli.main", "demo",
        "--households", "2", "--nodes", "2", "--rounds", "2", "--steps", "25",
        "--budget", "0.2", "--dense-epochs", "3", "--capacities", "1,3",
        "--out", str(tmp_path / "work"), "--json", str(out),
    ]  # fmt: skip
    p = _run_demo(cmd, dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr[-4000:]
    s = json.loads(out.read_text())
    keys = {
        "accuracy_dense", "accuracy_disco", "bytes_per_sample_dense", "bytes_per_sample_disco",
        "epsilon", "nodes", "households", "rounds", "wall_s",
    }  # fmt: skip
    assert keys <= s.keys()
    assert (s["nodes"], s["households"], s["rounds"], s["epsilon"]) == (2, 2, 2, None)
    assert s["capacities"] == [1.0, 3.0] and 0.2 <= s["channel_shares"][0] <= 0.3
    assert s["bytes_per_sample_disco"] < 0.5 * s["bytes_per_sample_dense"]
    assert s["accuracy_dense"] > 0.8
    assert s["accuracy_disco"] >= s["accuracy_dense"] - ACCURACY_TOLERANCE, s
    assert "DISCO on Flower" in p.stdout


def _kill_tree(dep: Deployment, name: str) -> None:
    """A device dies: its SuperNode and the ClientApp it runs (SIGKILL)."""
    p = dep.procs.procs[name]
    for pid in [*descendants([p.pid]), p.pid]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    p.wait(10)


@pytest.mark.slow(seconds=150)
def test_killed_supernode_round_completes_and_run_resumes(tmp_path: Path) -> None:
    from disco_fl.security import make_household_certs

    run_dir = tmp_path / "run"
    # household 0 trains over mutual TLS (its own CA), household 1 in plaintext
    certs = {0: tmp_path / "certs_h0"}
    make_household_certs(certs[0], 2)
    dep = _deploy(tmp_path, "d1", {0: [0, 1], 1: [0, 1]}, tls=certs)
    try:
        app = write_app(tmp_path / "app", _config(run_dir, steps=KILL_STEPS))
        dep.flwr_run(app, {})
        # household 1's node 1 dies in the middle of round 1's joint steps (after its
        # ClientApp reported step 10 of KILL_STEPS; a step takes a fraction of a second)
        name = dep.supernode_name(1, 1)
        end = time.monotonic() + RUN_TIMEOUT_S
        while f"round 1: step 10/{KILL_STEPS}" not in dep.procs.log(name, tail=20_000):
            dep.procs.check(["superlink", "flwr_run"])
            assert time.monotonic() < end, dep.procs.log("flwr_run")
            time.sleep(0.1)
        _kill_tree(dep, name)
        summary = wait_for_run(dep, run_dir, RUN_TIMEOUT_S)
        log = dep.procs.log("flwr_run", tail=200_000)
        tls_log = dep.procs.log(dep.supernode_name(0, 1), tail=200_000)
        plain_log = dep.procs.log(dep.supernode_name(1, 0), tail=200_000)
    finally:
        dep.stop()
    assert "household h0 shard 1: peer endpoint" in tls_log and "(mutual TLS)" in tls_log
    assert "(plaintext)" in plain_log and "mutual TLS" not in plain_log
    first = summary["history"][0]
    assert "h1" in first["failed"] and "h0" not in first["failed"], first
    assert first["train"]["households-ok"] == 1
    # its surviving node aborted the step it was in, applying nothing
    assert (
        "StepAborted" in first["failed"]["h1"] and "no update was applied" in first["failed"]["h1"]
    )
    assert "household 'h1' failed" in log
    ckpt = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert ckpt["rounds_done"] == 2 and len(ckpt["history"]) == 2
    # the checkpoint's shards are the exported ones
    from disco_fl.emulation.export import load_shard

    node0 = load_shard(run_dir / "plan" / "plan.json", 0)
    assert node0.plan.hash == summary["plan_hash"]
    # resume: a new deployment with 3 rounds continues after round 2
    dep = _deploy(tmp_path, "d2", {0: [0, 1], 1: [0, 1]}, tls=certs)
    try:
        (run_dir / "summary.json").unlink()
        # the resumed run's check is the resumption (the delivery of the final shards to
        # every node of a live deployment is the demo tests'): no delivery round here
        cfg = _config(run_dir, steps=KILL_STEPS, deliver=False, **{"num-rounds": 3})
        app = write_app(tmp_path / "app", cfg)
        dep.flwr_run(app, {})
        summary2 = wait_for_run(dep, run_dir, RUN_TIMEOUT_S)
        log2 = dep.procs.log("flwr_run", tail=200_000)
    finally:
        dep.stop()
    assert "resumed from" in log2 and "after round 2" in log2
    assert [h["round"] for h in summary2["history"]] == [1, 2, 3]
    assert summary2["history"][0] == summary["history"][0]
    assert summary2["history"][2]["failed"] == {}


@pytest.mark.slow(seconds=50)
def test_degraded_training_goes_on_without_a_killed_supernode(tmp_path: Path) -> None:
    """``degraded-training = true``: a household's non-owner node dies mid-round 1; its survivor
    finishes the round's steps without it and the household counts, degraded. At round 2 the
    node is still gone (the SuperLink may list it yet; it was named missing and has not been
    heard from since): the survivor alone is invited, at once, told up front, and trains round 2
    degraded from step 0."""
    run_dir = tmp_path / "run"
    dep = _deploy(tmp_path, "d", {0: [0, 1]})
    try:
        cfg = _config(run_dir, steps=KILL_STEPS, households=1, deliver=False)
        cfg.update({"num-rounds": 2, "finetune-rounds": 0, "degraded-training": True})
        dep.flwr_run(write_app(tmp_path / "app", cfg), {})
        name = dep.supernode_name(0, 1)  # shard 1: no training data, not a batch owner
        end = time.monotonic() + RUN_TIMEOUT_S
        while f"round 1: step 10/{KILL_STEPS}" not in dep.procs.log(name, tail=20_000):
            dep.procs.check(["superlink", "flwr_run"])
            assert time.monotonic() < end, dep.procs.log("flwr_run")
            time.sleep(0.1)
        _kill_tree(dep, name)
        summary = wait_for_run(dep, run_dir, RUN_TIMEOUT_S)
        survivor = dep.procs.log(dep.supernode_name(0, 0), tail=200_000)
        log = dep.procs.log("flwr_run", tail=200_000)
    finally:
        dep.stop()
    first, second = summary["history"]
    for r in (first, second):
        assert r["failed"] == {}, r
        assert r["train"]["households-ok"] == 1 and r["train"]["households-degraded"] == 1
        assert r["train"]["missing/h0"] == [1]
    done = f"step {KILL_STEPS}/{KILL_STEPS}"
    assert f"round 1: {done}" in survivor and f"round 2: {done}" in survivor
    assert "round 1 train: degraded: household 'h0' trained without node(s) [1]" in log
    # round 2: found gone before it started (missing in round 1, or off the node list by now)
    assert (
        "round 2 train: degraded from the start: household 'h0' trains without node(s) [1]" in log
    )
    assert "missing in the last round, not heard from since" in log or "node list" in log
    assert "(plaintext), 0 peers connected" in survivor  # round 2: no peer to meet


@pytest.fixture(scope="module")
def incomplete_deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """One deployment for both ways of starting a run below (a run on it fails at the roster,
    before any training, and leaves the SuperLink and SuperNodes as they were): household 0
    complete, household 1 without its shard 1."""
    dep = _deploy(tmp_path_factory.mktemp("incomplete"), "d", {0: [0, 1], 1: [0]})
    try:
        # every live node has registered before a run starts (the roster's short wait below)
        names = [dep.supernode_name(h, k) for h, ks in {0: [0, 1], 1: [0]}.items() for k in ks]
        end = time.monotonic() + RUN_TIMEOUT_S
        while not all("SuperNode ID:" in dep.procs.log(n, tail=20_000) for n in names):
            dep.procs.check()
            assert time.monotonic() < end, [dep.procs.log(n) for n in names]
            time.sleep(0.2)
        yield dep
    finally:
        dep.stop()


@pytest.mark.slow(seconds=25)
@pytest.mark.parametrize("app_kind", ["app folder", "repository checkout"])
def test_household_missing_a_shard_fails_before_training(
    tmp_path: Path, app_kind: str, incomplete_deployment: Deployment
) -> None:
    """Also: ``flwr run <repository>`` works (components and config from pyproject.toml)."""
    run_dir = tmp_path / "run"
    dep = incomplete_deployment
    old_log = dep.procs.logdir / "flwr_run.log"  # an earlier run's: kept aside, not read here
    if old_log.exists():
        old_log.rename(old_log.with_name(f"flwr_run.before.{time.monotonic_ns()}.log"))
    try:
        # every live node has registered (the fixture): the roster waits 3 s for the missing
        # one, and as long as a ClientApp takes to start for the answers of the others
        config = _config(run_dir, **{"connect-timeout": 3.0, "query-timeout": 120.0})
        if app_kind == "app folder":
            p = dep.flwr_run(write_app(tmp_path / "app", config), {})
        else:
            p = dep.flwr_run(Path(__file__).resolve().parents[1], config)
        end = time.monotonic() + RUN_TIMEOUT_S
        while "missing shard" not in dep.procs.log("flwr_run", tail=200_000):
            assert time.monotonic() < end, dep.procs.log("flwr_run")
            assert p.poll() is None or "missing shard" in dep.procs.log("flwr_run", tail=200_000)
            dep.procs.check(["superlink"])
            time.sleep(0.5)
        log = dep.procs.log("flwr_run", tail=200_000)
    finally:
        dep.procs.kill("flwr_run")
    assert "household 'h1': missing shard 1 of 2" in log
    assert "no training started" in log
    assert "[ROUND" not in log
    assert not (run_dir / "checkpoint.pt").exists()
    # the ServerApp leaves the reason where the demo looks for it
    assert "RosterError" in json.loads((run_dir / "failed.json").read_text())["error"]


def _running(pid: int) -> bool:
    """``pid`` exists and is not a zombie (exited, waiting for its parent to reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.slow(seconds=125)
def test_demo_dp_ctrl_c_stops_everything_and_resume_finishes(tmp_path: Path) -> None:
    """``disco-fl demo --dp`` interrupted after round 1 (SIGINT, as Ctrl-C): it exits and no
    process it started survives; ``--resume`` runs the remaining round from the checkpoint
    and reports epsilon."""
    work, out = tmp_path / "work", tmp_path / "demo.json"
    cmd = [
        sys.executable, "-m", "disco_fl.cli.main", "demo", "--dp",
        "--households", "1", "--nodes", "2", "--rounds", "2", "--steps", "8",
        "--batch-size", "16", "--budget", "0.3", "--dense-epochs", "2",
        "--out", str(work), "--json", str(out),
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    err = tmp_path / "stderr.txt"
    with open(err, "wb") as f:
        # Ctrl-C reaches a foreground program with SIGINT at its default; a test run started in
        # the background by a non-interactive shell (`bash .ci/run &`) ignores SIGINT, and a
        # child would inherit that (and rightly keep ignoring it), so the demo starts with it
        p = subprocess.Popen(
            cmd,
            stdout=subprocess.DEVNULL,
            stderr=f,
            env=env,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # noqa: PLW1509
        )
    try:
        end = time.monotonic() + DEMO_TIMEOUT_S
        while "round 1/2 done" not in err.read_text(errors="replace"):
            assert p.poll() is None, err.read_text(errors="replace")[-4000:]
            assert time.monotonic() < end, err.read_text(errors="replace")[-4000:]
            time.sleep(0.2)
        started = descendants([p.pid])
        assert len(started) >= 3  # superlink, 2 supernodes (and Flower's own children)
        p.send_signal(signal.SIGINT)
        assert p.wait(60) == 130
    finally:
        if p.poll() is None:
            for pid in [*descendants([p.pid]), p.pid]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    # every process it started ends (a loaded machine may take a few seconds to tear down
    # the SuperNodes' ClientApp processes; a leaked one stays)
    gone_by = time.monotonic() + 15.0
    alive = [pid for pid in started if _running(pid)]
    while alive and time.monotonic() < gone_by:
        time.sleep(0.5)
        alive = [pid for pid in alive if _running(pid)]
    assert not alive, f"processes left running after Ctrl-C: {alive}"
    assert "interrupted" in err.read_text(errors="replace")
    assert not out.exists()
    ckpt = torch.load(work / "run" / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert ckpt["rounds_done"] >= 1
    first = ckpt["history"][0]

    r = _run_demo([*cmd, "--resume"], env)
    assert r.returncode == 0, r.stderr[-4000:]
    s = json.loads(out.read_text())
    assert [h["round"] for h in s["federated_history"]] == [1, 2]
    assert s["federated_history"][0] == first  # round 1 came from the checkpoint
    assert "resuming: dense model of the previous run" in r.stderr
    eps1 = first["train"]["epsilon"]
    assert isinstance(s["epsilon"], float) and s["epsilon"] > eps1 > 0
    assert s["accuracy_dense"] > 0.5


USER_NET = '''
import torch
from torch import nn


class Net(nn.Module):
    """A user's small residual CNN, defined outside disco_fl."""

    def __init__(self, num_classes=10, in_channels=1):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(16)
        self.conv = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.down = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn0(self.stem(x)))
        x = torch.relu(x + self.bn1(self.conv(x)))
        x = torch.relu(self.down(x))
        return self.fc(x.mean((2, 3)))


def build(num_classes=10, in_channels=1):
    return Net(num_classes, in_channels)
'''


@pytest.mark.slow(seconds=85)
def test_demo_with_a_users_model_delivers_shards_and_serves_from_node_folders(
    tmp_path: Path,
) -> None:
    """``disco-fl demo --model user_net:build`` with the model in a file outside the package
    (on the processes' PYTHONPATH): SuperLink, SuperNodes, the ServerApp importing the model,
    every node receiving the final plan and its shard into its data folder (checked against
    the plan hash; trained with node dropout, node 0's shard with BatchNorm statistics for
    node 1 missing, estimated by the household after the last round), ``disco-fl serve
    <data folder>`` (node index from its ``node.json``) answering == shard-only execution of
    the server's export."""
    from disco_fl.cli.deployment import Processes, free_ports
    from disco_fl.emulation.export import load_shard, run_shards
    from disco_fl.fl.federated import builtin_tensors
    from disco_fl.runtime.serving import InferenceSession

    mods = tmp_path / "user_code"
    mods.mkdir()
    (mods / "user_net.py").write_text(USER_NET)
    work, out = tmp_path / "work", tmp_path / "demo.json"
    cmd = [
        sys.executable, "-m", "disco_fl.cli.main", "demo", "--model", "user_net:build",
        "--households", "1", "--nodes", "2", "--rounds", "2", "--steps", "10",
        "--batch-size", "16", "--budget", "0.3", "--dense-epochs", "1", "--node-dropout", "0.3",
        "--out", str(work), "--json", str(out),
        "--codec", "fp32",  # serving == shard-only execution within 1e-5: the exact codec
    ]  # fmt: skip
    path = os.pathsep.join(p for p in [str(mods), os.environ.get("PYTHONPATH", "")] if p)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path)
    p = _run_demo(cmd, env)
    assert p.returncode == 0, p.stderr[-4000:]
    s = json.loads(out.read_text())
    # one short epoch of pretraining on 2 busy cores: better than chance (0.1), no more
    assert s["accuracy_dense"] > 0.15 and s["bytes_per_sample_disco"] < s["bytes_per_sample_dense"]
    summary = json.loads((work / "run" / "summary.json").read_text())
    assert summary["delivered"] == {"h0/0": "ok", "h0/1": "ok"}
    ref = [load_shard(work / "run" / "plan" / "plan.json", k) for k in range(2)]
    assert ref[0].plan.hash == summary["plan_hash"]
    assert ref[0].plan.meta["model"] == "user_net:build"
    folders = [work / "nodes" / f"h0_n{k}" for k in range(2)]
    for k, folder in enumerate(folders):
        assert sorted(f.name for f in folder.iterdir()) == [
            "node.json",
            f"node_{k}.pt",
            "plan.json",
        ]
        node = json.loads((folder / "node.json").read_text())
        assert node["node"] == k and node["plan_hash"] == summary["plan_hash"]
        assert load_shard(folder / "plan.json", k).plan.hash == summary["plan_hash"]
    # trained with node dropout: the household estimated BatchNorm statistics for node 1
    # missing (the requester alone) and node 0's delivered shard carries them
    assert summary["degraded_statistics"] == {
        "missing_sets": [[1]], "households": ["h0"], "failed": {},
    }  # fmt: skip
    delivered = load_shard(folders[0] / "plan.json", 0)
    assert delivered.degraded_sets == [frozenset({1})]
    assert load_shard(folders[1] / "plan.json", 1).degraded_sets == []
    bn = next(op for op in delivered.program.ops if op.kind == "batch_norm")
    assert not torch.equal(
        delivered.context({1}).state(bn)["running_var"], delivered.state(bn)["running_var"]
    )
    # a household serving from the delivered folders (the demo stopped its processes)
    ports = free_ports(2)
    peers = ",".join(f"127.0.0.1:{q}" for q in ports)
    procs = Processes(tmp_path / "serve_logs", dict(env))
    ready = [tmp_path / f"ready{k}.json" for k in range(2)]
    try:
        for k, folder in enumerate(folders):
            procs.start(f"serve{k}", [
                sys.executable, "-m", "disco_fl.cli.main", "serve", str(folder),
                "--peers", peers, "--threads", "1", "--ready-file", str(ready[k]),
            ])  # fmt: skip
        end = time.monotonic() + 120
        while not all(f.exists() for f in ready):
            procs.check()
            assert time.monotonic() < end, procs.log("serve0")
            time.sleep(0.2)
        x = builtin_tensors("test")[0][:40]
        with InferenceSession(f"127.0.0.1:{ports[0]}", timeout=60.0) as sess:
            served = sess.infer_many(x, batch_size=20)
    finally:
        procs.stop_all()
    want = run_shards(ref, x)
    assert served.shape == want.shape and torch.allclose(served, want, atol=1e-5)
    # the demo's own serving (from the same folders) is the export's accuracy
    x_test, y_test = builtin_tensors("test")
    acc = float((run_shards(ref, x_test).argmax(1) == y_test).float().mean())
    assert abs(s["accuracy_disco"] - acc) <= 0.002 and acc > 0.15  # an arg-max tie at most

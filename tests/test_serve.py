"""Collaborative inference with real ``disco-fl serve`` processes on loopback.

Runtime == emulation for 2, 3 and 4 processes (and every model family at N = 2), payload bytes
counted by each process == the plan's prediction per peer and layer, the ``disco-fl infer``
command, mutual TLS, and every failure the issue lists: a peer killed mid-request, a stalled
peer, garbage bytes on a port, a malformed frame, a wrong plan hash, a wrong token, an unknown
node, an oversized message, a missing client certificate.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch

import disco_fl
from disco_fl.cli.demo import free_ports
from disco_fl.core.pixels import pixels_to_input
from disco_fl.emulation.comm import program_traffic
from disco_fl.emulation.export import load_shard, run_shards
from disco_fl.emulation.statistics import calibrate_degraded
from disco_fl.partition.plan import Plan
from disco_fl.proto_gen.disco.v1 import peer_pb2, peer_pb2_grpc
from disco_fl.runtime.serving import InferenceError, InferenceSession
from disco_fl.runtime.transport.grpc_transport import GrpcTransport, HandshakeError
from disco_fl.security import TLSFiles, channel_credentials, make_household_certs
from tests.test_shards import _random_masks
from tests.zoo import ZOO

READY_S = 120.0  # bound on a household's start-up (processes import torch on 2 cores)
DEADLINE_S = 2.0  # the serving deadline in the failure tests
MEAN, STD = 0.5, 0.25


class Household:
    """``n`` serve processes of one exported plan (``per_node[k]``: more options of node k)."""

    per_node: list[list[str]] | None = None

    def __init__(
        self,
        plan_dir: Path,
        n: int,
        workdir: Path,
        extra: list[str],
        per_node: list[list[str]] | None = None,
    ) -> None:
        self.plan_dir = plan_dir
        self.n = n
        self.workdir = workdir
        self.extra = extra
        self.per_node = per_node
        self.addrs = [f"127.0.0.1:{p}" for p in free_ports(n)]
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * n
        for k in range(n):
            self.start(k)
        self.wait_ready(range(n))

    def _ready(self, k: int) -> Path:
        return self.workdir / f"ready{k}.json"

    def log(self, k: int) -> str:
        p = self.workdir / f"node{k}.log"
        return p.read_text() if p.exists() else ""

    def start(self, k: int) -> None:
        self._ready(k).unlink(missing_ok=True)
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        cmd = [
            sys.executable,
            "-m",
            "disco_fl.cli.main",
            "serve",
            str(self.plan_dir),
            "--node",
            str(k),
            "--peers",
            ",".join(self.addrs),
            "--threads",
            "1",
            "--ready-file",
            str(self._ready(k)),
            *self.extra,
            *(self.per_node[k] if self.per_node else []),
        ]
        with open(self.workdir / f"node{k}.log", "ab") as log:
            self.procs[k] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, nodes: Any) -> None:
        deadline = time.monotonic() + READY_S
        for k in nodes:
            while not self._ready(k).exists():
                p = self.procs[k]
                if p is not None and p.poll() is not None:
                    raise RuntimeError(f"node {k} exited with {p.returncode}:\n{self.log(k)}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"node {k} not ready:\n{self.log(k)}")
                time.sleep(0.1)

    def kill(self, k: int) -> None:
        p = self.procs[k]
        if p is not None:
            p.kill()
            p.wait(10)

    def alive(self, k: int) -> bool:
        p = self.procs[k]
        return p is not None and p.poll() is None

    def stop(self) -> None:
        for p in self.procs:
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.terminate()
        for p in self.procs:
            if p is not None:
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)


def _export(
    tmp: Path,
    name: str,
    n: int,
    codec: str = "fp32",
    capacities: list[float] | None = None,
    degraded: bool = False,
) -> tuple[Path, Any, torch.Tensor]:
    if name == "vit":
        from disco_fl.models import build_model

        build, shape = (lambda: build_model("vit_tiny_mnist")), (3, 1, 28, 28)
    else:
        build, shape = ZOO[name]
    torch.manual_seed(n)
    model = build().eval()
    x = torch.randn(*shape)
    pm = disco_fl.partition(model, n, x, capacities=capacities).eval()
    _random_masks(pm, 0.35, seed=n)
    if degraded:  # BatchNorm statistics for each single missing node
        calibrate_degraded(
            pm, torch.randn(64, *shape[1:], generator=torch.Generator().manual_seed(n))
        )
    meta = {"input": {"mean": [MEAN] * shape[1], "std": [STD] * shape[1]}}
    pm.export(tmp, codec=codec, meta=meta)
    return tmp, pm, x


@pytest.fixture
def start_household(tmp_path: Path) -> Iterator[Callable[..., Household]]:
    made: list[Household] = []

    def start(
        plan_dir: Path, n: int, *extra: str, per_node: list[list[str]] | None = None
    ) -> Household:
        work = tmp_path / f"hh{len(made)}"
        work.mkdir()
        hh = Household(plan_dir, n, work, list(extra), per_node)
        made.append(hh)
        return hh

    yield start
    for hh in made:
        hh.stop()


def _expected_payload(plan: Plan, batch: int, input_dtype: str = "float32") -> dict[str, int]:
    """The plan's bytes per (src, dst, layer) for one request, keyed "src:dst/layer"."""
    layer_of = {op.name: i for i, op in enumerate(plan.program.ops)}

    def open_count(name: str, s: int, d: int) -> int:
        return len(plan.open_channels(name, s, d))

    out: dict[str, int] = {}
    for layer in program_traffic(plan.program, open_count, plan.codec, input_dtype).layers:
        for pair, b in layer.pairs.items():
            s, d = pair.split("->")
            if b:
                out[f"{s}:{d}/{layer_of[layer.op]}"] = b * batch
    return out


def _payload(addr: str, k: int) -> dict[str, int]:
    with InferenceSession(addr) as s:
        st = s.status()
    assert st["node"] == k
    return {f"{k}:{key}": v for key, v in st["payload_bytes_sent"].items()}


# ---- runtime == emulation, bytes == plan --------------------------------------------------


@pytest.mark.parametrize("n", [2, 3, 4])
def test_processes_equal_emulation_and_bytes_equal_plan(
    tmp_path: Path, start_household: Callable[..., Household], n: int
) -> None:
    plan_dir, pm, x = _export(tmp_path / "plan", "resnet_narrow", n)
    with torch.no_grad():
        emulated = pm(x)
    ref = run_shards([load_shard(plan_dir / "plan.json", k) for k in range(n)], x)
    hh = start_household(plan_dir, n)
    with InferenceSession(hh.addrs[0]) as s:
        out = s.infer(x)
        assert (out - emulated).abs().max().item() <= 1e-5
        assert (out - ref).abs().max().item() <= 1e-5  # bitwise only with equal thread counts
        counted: dict[str, int] = {}
        for k in range(n):
            counted.update(_payload(hh.addrs[k], k))
        assert counted == _expected_payload(Plan.load(plan_dir / "plan.json"), x.shape[0])
        # several requests in flight at once, kept apart by session id
        xs = torch.randn(7 * x.shape[0], *x.shape[1:])
        many = s.infer_many(xs, batch_size=x.shape[0], max_inflight=4)
        with torch.no_grad():
            assert (many - pm(xs)).abs().max().item() <= 1e-5
        st = s.status()
        assert st["stats"]["requests_ok"] == 8 and st["stats"]["requests_failed"] == 0


def test_int8_plan_over_processes(
    tmp_path: Path, start_household: Callable[..., Household]
) -> None:
    plan_dir, pm, x = _export(tmp_path / "plan", "user", 2, "int8")
    ref = run_shards([load_shard(plan_dir / "plan.json", k) for k in range(2)], x)
    hh = start_household(plan_dir, 2)
    with InferenceSession(hh.addrs[0]) as s:
        out = s.infer(x)
    # int8 rounding may flip where thread counts differ; the codec's own error is larger
    assert (out - ref).abs().max().item() <= 1e-3
    counted = {**_payload(hh.addrs[0], 0), **_payload(hh.addrs[1], 1)}
    assert counted == _expected_payload(Plan.load(plan_dir / "plan.json"), x.shape[0])


def test_uneven_plan_over_processes(
    tmp_path: Path, start_household: Callable[..., Household]
) -> None:
    """Devices that differ: a plan sliced 1:3 (``capacities``) served by two processes (that
    poll while they wait for frames: ``--busy-poll-us``)."""
    plan_dir, pm, x = _export(tmp_path / "plan", "resnet_narrow", 2, capacities=[1.0, 3.0])
    plan = Plan.load(plan_dir / "plan.json")
    conv1 = plan.program.infos["conv1"].layout
    assert conv1 is not None and (conv1.count(0), conv1.count(1)) == (2, 6)
    hh = start_household(plan_dir, 2, "--busy-poll-us", "300")
    with InferenceSession(hh.addrs[0]) as s:
        out = s.infer(x)
    with torch.no_grad():
        assert (out - pm(x)).abs().max().item() <= 1e-5
    counted = {**_payload(hh.addrs[0], 0), **_payload(hh.addrs[1], 1)}
    assert counted == _expected_payload(plan, x.shape[0])


@pytest.mark.parametrize("name", ["bottleneck", "user", "vit"])
def test_other_model_families_over_processes(
    tmp_path: Path, start_household: Callable[..., Household], name: str
) -> None:
    plan_dir, pm, x = _export(tmp_path / "plan", name, 2)
    hh = start_household(plan_dir, 2)
    with InferenceSession(hh.addrs[0]) as s:
        out = s.infer(x)
    with torch.no_grad():
        assert (out - pm(x)).abs().max().item() <= 1e-5
    counted = {**_payload(hh.addrs[0], 0), **_payload(hh.addrs[1], 1)}
    assert counted == _expected_payload(Plan.load(plan_dir / "plan.json"), x.shape[0])


def test_uint8_request_over_processes(
    tmp_path: Path, start_household: Callable[..., Household]
) -> None:
    """A request of uint8 image pixels (issue 17): == the shards and the emulation on the
    normalized float input, == the same household's float request of it, bit for bit; bytes
    counted == the plan's prediction for a uint8 input, its input hop 4x fewer than fp32's;
    pixels that do not fit the plan are refused with INVALID_ARGUMENT."""
    plan_dir, pm, _ = _export(tmp_path / "plan", "user", 2)  # 3 channels, 16 px
    plan = Plan.load(plan_dir / "plan.json")
    g = torch.Generator().manual_seed(0)
    px = torch.randint(0, 256, (3, 3, 16, 16), generator=g, dtype=torch.uint8)
    x = pixels_to_input(px, [MEAN] * 3, [STD] * 3)
    ref = run_shards([load_shard(plan_dir / "plan.json", k) for k in range(2)], x)
    hh = start_household(plan_dir, 2)
    with InferenceSession(hh.addrs[0]) as s:
        out = s.infer(px)
        u8 = {**_payload(hh.addrs[0], 0), **_payload(hh.addrs[1], 1)}
        out_f = s.infer(x)
        both = {**_payload(hh.addrs[0], 0), **_payload(hh.addrs[1], 1)}
        with pytest.raises(InferenceError) as info:
            s.infer(px[:, :, :8])
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT, info.value
        assert "the plan expects [batch, 3, 16, 16]" in info.value.message
    assert (out - ref).abs().max().item() <= 1e-5
    with torch.no_grad():
        assert (out - pm(x)).abs().max().item() <= 1e-5
    assert torch.equal(out, out_f)
    assert u8 == _expected_payload(plan, 3, "uint8")
    f32 = {key: v - u8.get(key, 0) for key, v in both.items()}
    assert f32 == _expected_payload(plan, 3)
    assert u8["0:1/0"] == px.numel() and f32["0:1/0"] == 4 * px.numel()  # the input hop
    assert {k: v for k, v in u8.items() if k != "0:1/0"} == {
        k: v for k, v in f32.items() if k != "0:1/0"
    }


def test_uint8_request_for_a_plan_without_normalization(
    tmp_path: Path, start_household: Callable[..., Household]
) -> None:
    """A plan whose meta has no input mean and std: pixels are refused, clearly, before any
    frame leaves the requester; the node goes on serving float requests."""
    build, shape = ZOO["user"]
    torch.manual_seed(0)
    pm = disco_fl.partition(build().eval(), 2, torch.randn(*shape)).eval()
    pm.export(tmp_path / "plan")
    hh = start_household(tmp_path / "plan", 2)
    px = torch.zeros(shape, dtype=torch.uint8)
    with InferenceSession(hh.addrs[0]) as s:
        with pytest.raises(InferenceError) as info:
            s.infer(px)
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT, info.value
        assert "declares no image normalization" in info.value.message
        assert s.status()["payload_bytes_sent"] == {}
        s.infer(torch.zeros(shape))


def test_infer_command_with_npz_and_images(
    tmp_path: Path, start_household: Callable[..., Household]
) -> None:
    from PIL import Image

    plan_dir, pm, _ = _export(tmp_path / "plan", "resnet_narrow", 2)
    hh = start_household(plan_dir, 2)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(37, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=37)
    np.savez(tmp_path / "in.npz", images=images, labels=labels)
    Image.fromarray(images[0]).save(tmp_path / "a.png")
    out = tmp_path / "out.json"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "disco_fl.cli.main",
            "infer",
            str(tmp_path / "in.npz"),
            str(tmp_path / "a.png"),
            "--address",
            hh.addrs[0],
            "--batch-size",
            "8",
            "--json",
            str(out),
            "--show",
            "100",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    x = (torch.from_numpy(images).float().unsqueeze(1) / 255 - MEAN) / STD
    with torch.no_grad():
        want = pm(torch.cat([x, x[:1]])).argmax(-1).tolist()
    assert [p["prediction"] for p in res["predictions"]] == want
    assert res["n"] == 38 and res["accuracy"] is None  # the png has no label
    assert "a.png" in r.stdout and "Warning" not in r.stderr, r.stderr


# ---- failures -----------------------------------------------------------------------------


@pytest.fixture(params=["grpc", "socket"])
def failing(
    request: pytest.FixtureRequest, tmp_path: Path, start_household: Callable[..., Household]
) -> tuple[Household, torch.Tensor, torch.Tensor]:
    """A 3-node household for the failure tests, with each data path (``--data-path``)."""
    plan_dir, _, x = _export(tmp_path / "plan", "resnet_narrow", 3)
    ref = run_shards([load_shard(plan_dir / "plan.json", k) for k in range(3)], x)
    hh = start_household(
        plan_dir,
        3,
        "--deadline",
        str(DEADLINE_S),
        "--max-frame-mb",
        "1",
        "--max-inflight",
        "4",
        "--data-path",
        request.param,
    )
    return hh, x, ref


def _recovers(addr: str, x: torch.Tensor, ref: torch.Tensor, within: float = 20.0) -> int:
    """Requests until one succeeds (== ref); returns how many failed first."""
    failed = 0
    deadline = time.monotonic() + within
    with InferenceSession(addr, timeout=10) as s:
        while True:
            try:
                out = s.infer(x)
                assert (out - ref).abs().max().item() <= 1e-5
                return failed
            except InferenceError:
                failed += 1
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)


def test_peer_killed_mid_request_then_restarted(
    failing: tuple[Household, torch.Tensor, torch.Tensor],
) -> None:
    hh, x, ref = failing
    big = torch.cat([x] * 20)  # requests back to back: the kill lands in one of them
    errors: list[BaseException] = []
    t_fail = [0.0]

    def run() -> None:
        with InferenceSession(hh.addrs[0], timeout=30) as s:
            try:
                for _ in range(200):
                    s.infer(big)
            except InferenceError as e:
                t_fail[0] = time.monotonic()
                errors.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    time.sleep(1.0)
    t_kill = time.monotonic()
    hh.kill(2)
    t.join(30)
    assert not t.is_alive(), "the request hung"
    assert errors, "no request failed after the peer died"
    err = errors[0]
    assert isinstance(err, InferenceError)
    assert err.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    assert "node 2" in err.message or "peer 2" in err.message, err.message
    assert t_fail[0] - t_kill <= DEADLINE_S + 1.5
    assert hh.alive(0) and hh.alive(1)
    # while the peer is down, requests fail fast with a clear error, the others keep serving
    with InferenceSession(hh.addrs[0], timeout=10) as s:
        t0 = time.monotonic()
        with pytest.raises(InferenceError) as info:
            s.infer(x)
        took = time.monotonic() - t0
        assert took <= DEADLINE_S + 1.5, (took, info.value.message)
        assert "2" in info.value.message
    hh.start(2)
    hh.wait_ready([2])
    assert _recovers(hh.addrs[0], x, ref) <= 2


def test_stalled_peer_times_out_then_recovers(
    failing: tuple[Household, torch.Tensor, torch.Tensor],
) -> None:
    hh, x, ref = failing
    assert _recovers(hh.addrs[0], x, ref) == 0
    p = hh.procs[1]
    assert p is not None
    p.send_signal(signal.SIGSTOP)
    try:
        with InferenceSession(hh.addrs[0], timeout=30) as s:
            t0 = time.monotonic()
            with pytest.raises(InferenceError) as info:
                s.infer(x)
            took = time.monotonic() - t0
        assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "node 1" in info.value.message
        assert took <= DEADLINE_S + 1.5
    finally:
        p.send_signal(signal.SIGCONT)
    assert _recovers(hh.addrs[0], x, ref) <= 2


def test_garbage_bytes_and_malformed_frames_leave_nodes_serving(
    failing: tuple[Household, torch.Tensor, torch.Tensor],
) -> None:
    hh, x, ref = failing
    rng = np.random.default_rng(1)
    for addr in hh.addrs:
        host, port = addr.rsplit(":", 1)
        for size in (1, 100, 70000):
            with socket.create_connection((host, int(port)), timeout=5) as sock:
                sock.sendall(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
    plan = Plan.load(hh.plan_dir / "plan.json")
    # an authenticated stream (node 0 -> node 1) carrying a frame whose tensor lies about size
    bad = peer_pb2.Frame(session_id="evil", layer=1, src=0, dst=1, direction=1)
    bad.tensor.dtype = peer_pb2.Tensor.DTYPE_FLOAT32
    bad.tensor.codec = peer_pb2.Tensor.CODEC_FP32
    bad.tensor.shape.extend([1, 1 << 40])
    bad.tensor.data = b"\0" * 8
    with grpc.insecure_channel(hh.addrs[1]) as ch:
        md = [
            ("disco-plan-hash", plan.hash),
            ("disco-node", "0"),
            ("disco-expected-node", "1"),
            ("disco-token", ""),
            ("disco-protocol", "2"),  # the current peer protocol version
        ]
        replies = list(peer_pb2_grpc.PeerStub(ch).Exchange(iter([bad]), metadata=md, timeout=5))
    assert len(replies) == 1 and replies[0].error, replies
    assert all(hh.alive(k) for k in range(3))
    assert _recovers(hh.addrs[0], x, ref) == 0


def test_refusals_plan_token_node_size(
    failing: tuple[Household, torch.Tensor, torch.Tensor],
) -> None:
    hh, x, ref = failing
    plan = Plan.load(hh.plan_dir / "plan.json")

    def dial(index: int, n: int, plan_hash: str, token: str = "") -> None:
        peers = ["127.0.0.1:1"] * n
        peers[1] = hh.addrs[1]
        t = GrpcTransport(
            index, n, plan_hash=plan_hash, peers=peers, household_token=token, connect_timeout=5
        )
        try:
            t.connect([1])
        finally:
            t.close()

    with pytest.raises(HandshakeError, match="plan mismatch"):
        dial(2, 3, "f" * 64)
    with pytest.raises(HandshakeError, match="household token"):
        dial(2, 3, plan.hash, token="guess")
    with pytest.raises(HandshakeError, match="not a peer"):
        dial(5, 6, plan.hash)
    with InferenceSession(hh.addrs[0], token="guess") as s:
        with pytest.raises(InferenceError) as info:
            s.infer(x)
        assert info.value.code == grpc.StatusCode.PERMISSION_DENIED
    with InferenceSession(hh.addrs[0]) as s:
        with pytest.raises(InferenceError) as info:
            s.infer(torch.randn(400, 1, 28, 28))  # 1.25 MB > --max-frame-mb 1
        assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        with pytest.raises(InferenceError) as info:
            s.infer(torch.randn(2, 3, 28, 28))
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "plan expects" in info.value.message
    with InferenceSession(hh.addrs[1]) as s, pytest.raises(InferenceError) as info:
        s.infer(x)
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert _recovers(hh.addrs[0], x, ref) == 0


def test_a_household_on_data_ports_given(
    tmp_path: Path, start_household: Callable[..., Household]
) -> None:
    plan_dir, pm, x = _export(tmp_path / "plan", "resnet_narrow", 2)
    ports = free_ports(2)
    hh = start_household(
        plan_dir, 2, "--data-path", "socket", per_node=[["--data-port", str(p)] for p in ports]
    )
    with InferenceSession(hh.addrs[0]) as s:
        out = s.infer(x)
    with torch.no_grad():
        assert (out - pm(x)).abs().max().item() <= 1e-5
    for p in ports:  # each node's data listener is on the port it was given
        socket.create_connection(("127.0.0.1", p), timeout=5).close()


# ---- mutual TLS ---------------------------------------------------------------------------


@pytest.mark.parametrize("data_path", ["grpc", "socket"])
def test_mutual_tls_household(
    tmp_path: Path, start_household: Callable[..., Household], data_path: str
) -> None:
    plan_dir, pm, x = _export(tmp_path / "plan", "resnet_narrow", 2)
    certs = tmp_path / "certs"
    make_household_certs(certs, 2)
    (tmp_path / "token").write_text("s3cret\n")
    hh = start_household(
        plan_dir,
        2,
        "--tls-dir",
        str(certs),
        "--token-file",
        str(tmp_path / "token"),
        "--data-path",
        data_path,
    )
    client = channel_credentials(TLSFiles.from_dir(certs, "client"))
    with InferenceSession(hh.addrs[0], token="s3cret", channel_credentials=client) as s:
        out = s.infer(x)
    with torch.no_grad():
        assert (out - pm(x)).abs().max().item() <= 1e-5
    # no client certificate: the TLS handshake fails, bounded by the client's timeout
    ca_only = grpc.ssl_channel_credentials(root_certificates=(certs / "ca.pem").read_bytes())
    with InferenceSession(hh.addrs[0], token="s3cret", channel_credentials=ca_only, timeout=3) as s:
        t0 = time.monotonic()
        with pytest.raises(InferenceError):
            s.infer(x)
        assert time.monotonic() - t0 < 5
    # plaintext against the TLS node: refused
    with (
        InferenceSession(hh.addrs[0], token="s3cret", timeout=3) as s,
        pytest.raises(InferenceError),
    ):
        s.infer(x)
    # the client's certificate is not a node's: it cannot join the peer channel
    plan = Plan.load(plan_dir / "plan.json")
    t = GrpcTransport(
        0,
        2,
        plan_hash=plan.hash,
        peers=["127.0.0.1:1", hh.addrs[1]],
        household_token="s3cret",
        channel_credentials=client,
        connect_timeout=3,
    )
    try:
        with pytest.raises(HandshakeError, match="not node 0's"):
            t.connect([1])
    finally:
        t.close()


def test_degraded_household_answers_without_a_killed_node_then_recovers(
    tmp_path: Path, start_household: Callable[..., Household]
) -> None:
    """Degraded mode over processes: node 2 killed, nodes 0 and 1 still answer, with node 2's
    channels closed (== the shards run without it) and the reply naming it. The first such
    request finds node 2 missing mid-session (all-up statistics: == a plan without degraded
    statistics run without node 2); the next ones start without it and normalize with the
    plan's statistics for {2} (== run_shards with missing={2}). Node 2 back: full answers
    again once the requester retries it (--degraded-retry)."""
    plan_dir, pm, x = _export(tmp_path / "plan", "user", 3, degraded=True)
    plain_dir, _, _ = _export(tmp_path / "plain", "user", 3)  # the same plan, no statistics
    hh = start_household(
        plan_dir, 3, "--degraded-wait", "2.0", "--deadline", "10", "--degraded-retry", "3"
    )
    hh.wait_ready(range(3))
    nodes = [load_shard(plan_dir / "plan.json", k) for k in range(3)]
    plain = [load_shard(plain_dir / "plan.json", k) for k in range(3)]
    assert nodes[1].degraded_sets == [frozenset({2})] and not plain[1].degraded_sets
    with InferenceSession(hh.addrs[0], timeout=30) as s:
        out = s.infer(x)
        assert s.last_missing == ()
        assert (out - run_shards(nodes, x)).abs().max().item() <= 1e-5
        hh.kill(2)
        out = s.infer(x)
        assert s.last_missing == (2,)
        assert (out - run_shards(plain, x, missing={2})).abs().max().item() <= 1e-5
        assert not torch.allclose(out, run_shards(nodes, x), atol=1e-3)
        t0 = time.monotonic()
        out = s.infer(x)  # starts without node 2: no wait for it, its statistics
        assert time.monotonic() - t0 < 1.5  # no --degraded-wait for node 2
        assert s.last_missing == (2,)
        assert (out - run_shards(nodes, x, missing={2})).abs().max().item() <= 1e-5
        assert not torch.allclose(out, run_shards(plain, x, missing={2}), atol=1e-4)
        hh.start(2)
        hh.wait_ready([2])
        deadline = time.monotonic() + 60
        while s.last_missing and time.monotonic() < deadline:  # the peers reconnect
            out = s.infer(x)
        assert s.last_missing == ()
        assert (out - run_shards(nodes, x)).abs().max().item() <= 1e-5

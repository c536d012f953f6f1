"""``disco-fl demo``: a real local Flower deployment of DISCO on loopback.

Steps: pretrain a dense model on the public part of the built-in data (or load
``--checkpoint``); start ``flower-superlink`` and one ``flower-supernode`` per node (each
with its household, shard, peer address and private data partition in ``--node-config``);
``flwr run`` the DISCO app (``strategies.server_app:app`` / ``clients.client_app:app``) from a
small app folder whose components point into the installed package; wait for the exported
plan and shards; start ``disco-fl serve`` on every node of one household; run collaborative
inference on the held-out split through :class:`~disco_fl.serving.InferenceSession`; print a
summary and write the JSON.

Every process runs in its own process group with a private ``FLWR_HOME``; all of them are
stopped on success, failure, Ctrl-C and SIGTERM. Every wait has a deadline.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from disco_fl.federated import ModelSpec, builtin_tensors
from disco_fl.files import load_torch, save_torch

FLWR_ENV = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
}
START_S = 120.0  # bound on any one start-up (processes import torch on 2 busy cores)


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def _bin(name: str) -> str:
    """A console script next to this interpreter (the venv's), else on PATH."""
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found next to {sys.executable} or on PATH")
    return found


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))


class Processes:
    """Child processes, each in its own process group, stopped together."""

    def __init__(self, logdir: Path, env: dict[str, str]) -> None:
        self.logdir = logdir
        self.env = env
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        logdir.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, cmd: list[str]) -> subprocess.Popen[bytes]:
        with open(self.logdir / f"{name}.log", "ab") as out:
            p = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
            )
        self.procs[name] = p
        return p

    def log(self, name: str, tail: int = 3000) -> str:
        p = self.logdir / f"{name}.log"
        return p.read_text(errors="replace")[-tail:] if p.exists() else ""

    def check(self, names: list[str] | None = None) -> None:
        for name in names or list(self.procs):
            p = self.procs[name]
            if p.poll() is not None:
                raise RuntimeError(f"{name} exited with code {p.returncode}:\n{self.log(name)}")

    def kill(self, name: str) -> None:
        p = self.procs.get(name)
        if p is not None and p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)

    def stop_all(self, grace: float = 5.0) -> None:
        """SIGTERM every child's process group and every descendant (Flower starts its
        SuperExec and app processes in sessions of their own), then SIGKILL what is left."""
        alive = [p for p in self.procs.values() if p.poll() is None]
        extra = descendants([p.pid for p in alive])
        for p in alive:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        for pid in extra:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGTERM)
        end = time.monotonic() + grace
        for p in alive:
            try:
                p.wait(max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)
        while extra and time.monotonic() < end:
            extra = [pid for pid in extra if _exists(pid)]
            time.sleep(0.1)
        for pid in extra:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        for p in self.procs.values():  # grandchildren left in the groups
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)


def _exists(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def descendants(roots: list[int]) -> list[int]:
    """Every live descendant of ``roots`` (Linux ``/proc``; empty elsewhere)."""
    children: dict[int, list[int]] = {}
    proc = Path("/proc")
    if not proc.is_dir():
        return []
    for d in proc.iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d.name))
    out: list[int] = []
    todo = list(roots)
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.append(c)
                todo.append(c)
    return out


def write_app(folder: Path, config: dict[str, Any]) -> Path:
    """A minimal Flower app folder: its components live in the installed package."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [
        "[build-system]",
        'requires = ["hatchling"]',
        'build-backend = "hatchling.build"',
        "",
        "[project]",
        'name = "disco-fl-demo"',
        'version = "0.1.0"',
        "dependencies = []",
        "",
        "[tool.flwr.app]",
        'publisher = "disco-fl"',
        "",
        "[tool.flwr.app.components]",
        'serverapp = "strategies.server_app:app"',
        'clientapp = "clients.client_app:app"',
        "",
        "[tool.flwr.app.config]",
        *[f"{k} = {_toml_value(v)}" for k, v in config.items()],
        "",
    ]
    (folder / "pyproject.toml").write_text("\n".join(lines))
    (folder / "disco_demo_app.py").write_text(
        '"""Components: strategies.server_app:app and clients.client_app:app (installed)."""\n'
    )
    return folder


def _node_config(items: dict[str, Any]) -> str:
    return " ".join(f"{k}={_toml_value(v)}" for k, v in items.items())


class Deployment:
    """SuperLink + SuperNodes (+ households' serve processes) on loopback."""

    def __init__(self, workdir: Path, households: int, nodes: int) -> None:
        self.workdir = workdir
        self.households = households
        self.nodes = nodes
        self.flwr_home = workdir / "flwr_home"
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, **FLWR_ENV)
        env.update(FLWR_HOME=str(self.flwr_home), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        # Flower starts its own helpers (flower-superexec) by name: the venv's bin first
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        self.env = env
        self.procs = Processes(workdir / "logs", env)
        total = households * nodes
        ports = free_ports(2 + 2 * total)
        self.link_port = ports[0]
        self.node_ports = ports[2 : 2 + total]
        self.peer_ports = ports[2 + total :]

    def peer_address(self, h: int, k: int) -> str:
        return f"127.0.0.1:{self.peer_ports[h * self.nodes + k]}"

    def start_superlink(self) -> None:
        # a fresh SuperLink state each time: nodes of an earlier deployment are gone (the
        # run's own state, checkpoints included, lives in the run folder)
        for old in self.workdir.glob("superlink.db*"):
            old.unlink()
        self.procs.start(
            "superlink",
            [
                _bin("flower-superlink"),
                "--insecure",
                "--port",
                str(self.link_port),
                "--database",
                str(self.workdir / "superlink.db"),
            ],
        )
        (self.flwr_home / "config.toml").write_text(
            f'[superlink.demo]\naddress = "127.0.0.1:{self.link_port}"\ninsecure = true\n'
        )
        _wait_port(self.link_port, self.procs, "superlink")

    def supernode_name(self, h: int, k: int) -> str:
        return f"supernode_h{h}_n{k}"

    def start_supernode(
        self, h: int, k: int, data: str, extra: dict[str, Any] | None = None
    ) -> None:
        cfg = {
            "household": f"h{h}",
            "shard": k,
            "peer-address": self.peer_address(h, k),
            "data": data,
            **(extra or {}),
        }
        self.procs.start(
            self.supernode_name(h, k),
            [
                _bin("flower-supernode"),
                "--insecure",
                "--superlink",
                f"127.0.0.1:{self.link_port}",
                "--port",
                str(self.node_ports[h * self.nodes + k]),
                "--node-config",
                _node_config(cfg),
            ],
        )

    def flwr_run(self, app: Path, overrides: dict[str, Any]) -> subprocess.Popen[bytes]:
        cmd = [_bin("flwr"), "run", str(app), "demo", "--stream"]
        if overrides:
            cmd += ["--run-config", _node_config(overrides)]
        return self.procs.start("flwr_run", cmd)

    def stop(self) -> None:
        self.procs.stop_all()


def _wait_port(port: int, procs: Processes, name: str, timeout: float = START_S) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        procs.check([name])
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"{name} did not listen on port {port} within {timeout:g} s")


def wait_for_run(
    dep: Deployment, run_dir: Path, timeout: float, progress_every: float = 10.0
) -> dict[str, Any]:
    """Wait for the ServerApp's ``summary.json``, reporting progress from its checkpoints."""
    end = time.monotonic() + timeout
    summary = run_dir / "summary.json"
    seen_round = -1
    last = time.monotonic()
    while time.monotonic() < end:
        if summary.exists():
            return dict(json.loads(summary.read_text()))
        failed = run_dir / "failed.json"  # written by the ServerApp (strategies.server_app)
        if failed.exists():
            why = json.loads(failed.read_text()).get("error", "unknown error")
            raise RuntimeError(f"the ServerApp failed: {why} (log: {dep.procs.logdir})")
        dep.procs.check(["superlink"])
        p = dep.procs.procs.get("flwr_run")
        if p is not None and p.poll() is not None and p.returncode != 0:
            raise RuntimeError(f"flwr run failed ({p.returncode}):\n{dep.procs.log('flwr_run')}")
        ckpt = run_dir / "checkpoint.pt"
        if ckpt.exists():
            with contextlib.suppress(Exception):  # being replaced right now: next time
                st = load_torch(ckpt)
                if st["rounds_done"] != seen_round:
                    seen_round = st["rounds_done"]
                    h = st["history"][-1] if st["history"] else {}
                    tr = h.get("train", {})
                    ev = h.get("evaluate", {})
                    acc = ev.get("accuracy")
                    _log(
                        f"round {seen_round}/{st['num_rounds']} done: target "
                        f"{h.get('target', 0):.3f}, loss {tr.get('loss', float('nan')):.3f}, "
                        + (f"accuracy {acc:.3f}, " if acc is not None else "")
                        + f"failed households {tr.get('households-failed', 0)}"
                    )
        if time.monotonic() - last > progress_every:
            last = time.monotonic()
            _log("federated fine-tuning running ...")
        time.sleep(0.5)
    tail = dep.procs.log("flwr_run")
    raise TimeoutError(f"the Flower run did not finish within {timeout:g} s:\n{tail}")


def _save_dense(model: torch.nn.Module, path: Path) -> None:
    save_torch(model.state_dict(), path)  # checksummed; read by load_checkpoint_strict


def serve_and_infer(
    dep: Deployment, plan_dir: Path, x: torch.Tensor, y: torch.Tensor, timeout: float = START_S
) -> tuple[float, int]:
    """``disco-fl serve`` on the nodes of household 0, inference on ``x``: accuracy and the
    payload bytes the nodes counted per sample."""
    from disco_fl.serving import InferenceSession

    n = dep.nodes
    ports = free_ports(n)
    peers = ",".join(f"127.0.0.1:{p}" for p in ports)
    ready = [dep.workdir / f"serve_ready_{k}.json" for k in range(n)]
    for f in ready:
        f.unlink(missing_ok=True)
    names = []
    for k in range(n):
        name = f"serve_n{k}"
        names.append(name)
        dep.procs.start(
            name,
            [
                sys.executable,
                "-m",
                "disco_fl.cli",
                "serve",
                str(plan_dir),
                "--node",
                str(k),
                "--peers",
                peers,
                "--threads",
                "1",
                "--ready-file",
                str(ready[k]),
            ],
        )
    end = time.monotonic() + timeout
    while not all(f.exists() for f in ready):
        dep.procs.check(names)
        if time.monotonic() > end:
            raise TimeoutError(f"serve processes not ready within {timeout:g} s")
        time.sleep(0.2)
    with InferenceSession(f"127.0.0.1:{ports[0]}", timeout=60.0) as sess:
        before = sess.status()
        logits = sess.infer_many(x, batch_size=100)
        after = sess.status()
    acc = float((logits.argmax(1) == y).float().mean())
    sent = _payload(after) - _payload(before)
    for name in names:
        dep.procs.kill(name)
    return acc, sent


def _payload(status: dict[str, Any]) -> int:
    v = status.get("payload_bytes_sent", 0)
    if isinstance(v, dict):
        return int(sum(v.values()))
    return int(v) if isinstance(v, (int, float)) else 0


def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    """The whole demo; returns the summary (also written to ``--json``)."""
    from disco_fl.emulation import partition
    from disco_fl.models import load_checkpoint_strict
    from disco_fl.train import evaluate, train_model

    t0 = time.time()
    if not 0.0 < args.budget <= 1.0:
        raise ValueError(f"--budget must be in (0, 1], got {args.budget}")
    for name in ("households", "nodes", "rounds", "steps", "batch_size", "dense_epochs"):
        if getattr(args, name) < 1 and not (name == "dense_epochs" and args.checkpoint):
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    torch.manual_seed(args.seed)
    workdir = Path(args.out).resolve()
    if workdir.exists() and not args.resume:
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    run_dir = workdir / "run"
    spec = ModelSpec(name=args.model, num_nodes=args.nodes, norm="group" if args.dp else "batch")
    x_pub, y_pub = builtin_tensors("public")
    x_test, y_test = builtin_tensors("test")
    dense = spec.build_dense(args.seed)
    dense_path = workdir / "dense.pth"
    if args.checkpoint:
        load_checkpoint_strict(dense, args.checkpoint)
        _log(f"loaded dense checkpoint {args.checkpoint}")
    elif args.resume and dense_path.exists():
        load_checkpoint_strict(dense, dense_path)
        _log(f"resuming: dense model of the previous run ({dense_path})")
    else:
        _log(
            f"pretraining dense {args.model}{' (GroupNorm, for DP)' if args.dp else ''} for "
            f"{args.dense_epochs} epochs on the public part ({len(y_pub)} images)"
        )
        train_model(
            dense,
            x_pub,
            y_pub,
            epochs=args.dense_epochs,
            lr=0.01,
            batch_size=32,
            augment_shift=1,
            seed=args.seed,
            log=_log,
        )
    _save_dense(dense, dense_path)
    acc_dense = evaluate(dense, x_test, y_test)
    dense_bytes = int(
        partition(dense, args.nodes, x_test[:2]).comm_report(args.codec).bytes_per_sample
    )
    _log(f"dense accuracy {acc_dense:.4f} on {len(y_test)} held-out images")

    config = {
        **spec.to_config(),
        "households": args.households,
        "num-rounds": args.rounds,
        "steps": args.steps,
        "batch-size": args.batch_size,
        "lr": args.lr,
        "budget": args.budget,
        "finetune-rounds": min(args.finetune_rounds, args.rounds),
        "codec": args.codec,
        "seed": args.seed,
        "dp": bool(args.dp),
        "dp-noise": args.dp_noise,
        "dp-clip": args.dp_clip,
        "evaluate": True,
        "step-timeout": args.step_timeout,
        "round-timeout": args.round_timeout,
        "initial-checkpoint": str(dense_path),
        "run-dir": str(run_dir),
    }
    app = write_app(workdir / "app", config)
    dep = Deployment(workdir, args.households, args.nodes)
    stop_signal = {"sig": 0}

    def on_signal(sig: int, frame: Any) -> None:
        stop_signal["sig"] = sig
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, on_signal)
    try:
        _log(f"starting flower-superlink on 127.0.0.1:{dep.link_port} (FLWR_HOME {dep.flwr_home})")
        dep.start_superlink()
        for h in range(args.households):
            for k in range(args.nodes):
                data = f"builtin:{h}/{args.households}" if k == 0 else ""
                dep.start_supernode(h, k, data)
        _log(
            f"started {args.households * args.nodes} flower-supernodes: {args.households} "
            f"households x {args.nodes} nodes (node 0 of each holds its private partition)"
        )
        (run_dir / "summary.json").unlink(missing_ok=True)  # a resumed run writes a new one
        dep.flwr_run(app, {})
        _log(
            f"flwr run: {args.rounds} rounds x {args.steps} steps, budget {args.budget}"
            f"{', DP' if args.dp else ''} (logs: {dep.procs.logdir})"
        )
        fl = wait_for_run(dep, run_dir, args.timeout)
        _log(f"federated fine-tuning done in {fl['seconds']:.0f}s; serving the exported shards")
        acc_disco, sent = serve_and_infer(dep, run_dir / "plan", x_test, y_test)
    finally:
        dep.stop()
        signal.signal(signal.SIGTERM, old)
    eps = fl.get("epsilon")
    summary = {
        "accuracy_dense": acc_dense,
        "accuracy_disco": acc_disco,
        "bytes_per_sample_dense": dense_bytes,
        "bytes_per_sample_disco": int(fl["bytes_per_sample"]),
        "bytes_per_sample_requester_sent": sent / max(len(y_test), 1),
        "epsilon": max(eps.values()) if isinstance(eps, dict) and eps else None,
        "epsilon_per_household": eps if isinstance(eps, dict) else None,
        "nodes": args.nodes,
        "households": args.households,
        "rounds": args.rounds,
        "budget": args.budget,
        "exchange_fraction": fl["exchange_fraction"],
        "federated_history": fl["history"],
        "wall_s": time.time() - t0,
    }
    rows = [
        ("accuracy (held-out)", f"{acc_dense:.4f}", f"{acc_disco:.4f}"),
        ("bytes / sample", f"{dense_bytes:,}", f"{summary['bytes_per_sample_disco']:,}"),
    ]
    print(
        f"\nDISCO on Flower: {args.households} households x {args.nodes} nodes, "
        f"{args.rounds} rounds"
    )
    print(f"  {'':<22} {'dense TP':>12} {'DISCO':>12}")
    for name, a, b in rows:
        print(f"  {name:<22} {a:>12} {b:>12}")
    print(
        f"  serving: node 0 sent {summary['bytes_per_sample_requester_sent']:,.0f} B/sample "
        f"(payload it counted); "
        f"epsilon: {summary['epsilon'] if summary['epsilon'] is not None else 'n/a (no --dp)'}"
        f"\n  wall time {summary['wall_s']:.0f}s; work folder {workdir}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
        _log(f"wrote {args.json}")
    return summary


def add_demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default="resnet_narrow", help="registered model (default resnet_narrow)"
    )
    p.add_argument(
        "--checkpoint", default=None, help="dense state dict to start from (skips pretraining)"
    )
    p.add_argument("--households", type=int, default=2, help="households (default 2)")
    p.add_argument("--nodes", type=int, default=2, help="nodes per household (default 2)")
    p.add_argument("--rounds", type=int, default=3, help="federated rounds (default 3)")
    p.add_argument("--steps", type=int, default=80, help="joint steps per round (default 80)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument(
        "--budget",
        type=float,
        default=0.1,
        help="final fraction of dense exchange bytes (default 0.1)",
    )
    p.add_argument(
        "--finetune-rounds", type=int, default=1, help="last rounds with masks fixed (default 1)"
    )
    p.add_argument("--codec", default="fp32", choices=["fp32", "fp16", "int8"])
    p.add_argument(
        "--dp", action="store_true", help="differential privacy inside households (GroupNorm model)"
    )
    p.add_argument("--dp-noise", type=float, default=1.0, help="DP noise multiplier (default 1.0)")
    p.add_argument("--dp-clip", type=float, default=1.0, help="DP clipping bound (default 1.0)")
    p.add_argument("--dense-epochs", type=int, default=4)
    p.add_argument("--step-timeout", type=float, default=30.0)
    p.add_argument("--round-timeout", type=float, default=300.0)
    p.add_argument("--timeout", type=float, default=900.0, help="bound on the federated run, s")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="disco_demo", help="work folder (default disco_demo)")
    p.add_argument("--resume", action="store_true", help="keep the work folder (resume the run)")
    p.add_argument("--json", default=None, help="write the summary JSON here")

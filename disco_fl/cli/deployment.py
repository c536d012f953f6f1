"""A local Flower deployment on loopback, as processes: ``flower-superlink``, one
``flower-supernode`` per node (household, shard, peer address and data partition in
``--node-config``), ``flwr run`` of an app folder, and ``disco-fl serve``.

Every process runs in its own process group with a private ``FLWR_HOME`` and its log in the
work folder; :meth:`Processes.stop_all` stops them and their descendants. Every wait has a
deadline. Used by ``disco-fl demo`` (:mod:`disco_fl.cli.demo`) and the end-to-end tests.
"""

from __future__ import annotations

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

from disco_fl.core.files import load_torch

FLWR_ENV = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
}
START_S = 120.0  # bound on any one start-up (processes import torch on 2 busy cores)


def progress(msg: str) -> None:
    """A timestamped progress line on stderr."""
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


def free_port_blocks(n: int, k: int, tries: int = 200) -> list[int]:
    """``n`` base ports on 127.0.0.1, each free together with its ``k - 1`` next ports, the
    blocks disjoint (a plan ladder of ``k`` plans serves plan ``i`` on port ``+ i``)."""
    out: list[int] = []
    for _ in range(tries):
        if len(out) == n:
            break
        base = free_ports(1)[0]
        want = range(base, base + k)
        if any(p in range(b, b + k) for b in out for p in want):
            continue
        socks = [socket.socket() for _ in want]
        try:
            for s, p in zip(socks, want, strict=True):
                s.bind(("127.0.0.1", p))
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
        out.append(base)
    if len(out) < n:
        raise RuntimeError(f"no {n} blocks of {k} free consecutive ports found")
    return out


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
        'serverapp = "disco_fl.fl.server.server_app:app"',
        'clientapp = "disco_fl.fl.client_app:app"',
        "",
        "[tool.flwr.app.config]",
        *[f"{k} = {_toml_value(v)}" for k, v in config.items()],
        "",
    ]
    (folder / "pyproject.toml").write_text("\n".join(lines))
    (folder / "disco_demo_app.py").write_text(
        '"""Components: disco_fl.fl.server.server_app:app and disco_fl.fl.client_app:app"""\n'
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

    def data_dir(self, h: int, k: int) -> Path:
        """Node ``(h, k)``'s data folder (node setting ``data-dir``): the run's final plan and
        its shard are delivered there (:mod:`disco_fl.fl.delivery`)."""
        return self.workdir / "nodes" / f"h{h}_n{k}"

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
            "data-dir": str(self.data_dir(h, k)),
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
        failed = run_dir / "failed.json"  # written by the ServerApp (disco_fl.fl.server.server_app)
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
                    progress(
                        f"round {seen_round}/{st['num_rounds']} done: target "
                        f"{h.get('target', 0):.3f}, loss {tr.get('loss', float('nan')):.3f}, "
                        + (f"accuracy {acc:.3f}, " if acc is not None else "")
                        + f"failed households {tr.get('households-failed', 0)}"
                    )
        if time.monotonic() - last > progress_every:
            last = time.monotonic()
            progress("federated fine-tuning running ...")
        time.sleep(0.5)
    tail = dep.procs.log("flwr_run")
    raise TimeoutError(f"the Flower run did not finish within {timeout:g} s:\n{tail}")

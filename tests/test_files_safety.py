"""Files another local user can plant, corrupted checkpoints, killed writes (issue 13, 4-6).

- The ClientApp's partition path never unpickles anything: a malicious pickle planted at the
  old cache path (shared temporary folder) or in ``cache-dir`` is never executed.
- A corrupted checkpoint (one flipped bit anywhere, a truncation) is refused with
  :class:`~disco_fl.core.files.ChecksumError` naming the file: the NodeTrainer's, the strategy's
  and :func:`~disco_fl.models.save_checkpoint_atomic`'s; nothing is loaded from it.
- Temporary files of killed writes are removed on the next write / start; SIGKILL during a
  write never loses the last checkpoint; the folder is fsynced after the rename.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from disco_fl.core.files import ChecksumError
from disco_fl.fl.federated import ModelSpec
from disco_fl.models import (
    CheckpointChecksumError,
    CheckpointError,
    load_checkpoint_strict,
    resnet_narrow,
    save_checkpoint_atomic,
)

ROOT = Path(__file__).resolve().parents[1]
SPEC = ModelSpec(num_nodes=2)


# ---- 4. no pickle from the shared temporary folder ----------------------------------------


class _Planted:
    """Unpickling this runs code: it creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def _old_cache_name(spec: ModelSpec) -> str:
    """The file name the ClientApp's partition cache used (``pm_<key>_<torch>.pt``)."""
    canon = json.dumps(spec.to_config(), sort_keys=True)
    return f"pm_{hashlib.sha256(canon.encode()).hexdigest()[:16]}_{torch.__version__}.pt"


def _train_message() -> Any:
    from flwr.app import ConfigRecord

    from disco_fl.fl.server import DiscoStrategy, NodeInfo, build_roster

    s = DiscoStrategy(SPEC, steps=1, batch_size=4)
    infos = [NodeInfo(101, "a", 0, "127.0.0.1:7100", 8, 0), NodeInfo(102, "a", 1, "x:1", 0, 0)]
    s.roster = build_roster(infos, 2)
    s.roster["a"].token = "t"
    s.num_rounds = 1
    msgs = list(s.configure_train(1, s.initial_arrays(), ConfigRecord(), grid=None))  # type: ignore[arg-type]
    return next(m for m in msgs if m.content.config_records["config"]["shard"] == 0)


def test_planted_pickle_in_temp_folder_never_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flower_run_identity: None
) -> None:
    from flwr.app import Context, RecordDict

    import disco_fl.fl.client_app as ca

    shared_tmp = tmp_path / "shared_tmp"  # stands for /tmp: every local user can write there
    cache_dir = tmp_path / "cache"
    marker = tmp_path / "PWNED"
    targets = [
        shared_tmp / "disco_fl_cache" / _old_cache_name(SPEC),
        cache_dir / _old_cache_name(SPEC),
    ]
    for t in targets:
        t.parent.mkdir(parents=True)
        torch.save(_Planted(marker), t)
    # the planted file is live: a weights_only=False load runs it
    torch.load(targets[0], weights_only=False)
    assert marker.exists()
    marker.unlink()

    monkeypatch.setattr(tempfile, "tempdir", str(shared_tmp))
    loads: list[Any] = []
    real_load = torch.load

    def spy_load(*a: Any, **kw: Any) -> Any:
        loads.append((a, kw))
        return real_load(*a, **kw)

    monkeypatch.setattr(torch, "load", spy_load)
    ctx = Context(
        run_id=1,
        node_id=101,
        node_config={
            "household": "a",
            "shard": 0,
            "peer-address": "127.0.0.1:7100",
            "cache-dir": str(cache_dir),
        },
        state=RecordDict(),
        run_config={},
    )
    _, shard, plan, _, k = ca._setup(_train_message(), ctx)  # what train() and evaluate() call
    assert k == 0 and shard.index == 0 and plan.num_nodes == 2
    assert not marker.exists(), "a planted pickle was executed by the ClientApp"
    assert all(kw.get("weights_only") is True for _, kw in loads), loads
    assert sorted(p.name for p in (shared_tmp / "disco_fl_cache").iterdir()) == [targets[0].name]


def _torch_load_calls(path: Path) -> list[tuple[int, ast.Call]]:
    tree = ast.parse(path.read_text(), str(path))
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if not (isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name)):
            continue
        if f.attr == "load" and f.value.id == "torch":
            out.append((node.lineno, node))
    return out


def test_every_torch_load_in_the_library_is_weights_only() -> None:
    """An extra guard: every ``torch.load(...)`` call in the library passes
    ``weights_only=True`` literally."""
    bad = []
    for folder in ("disco_fl",):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for line, call in _torch_load_calls(path):
                kw = {k.arg: k.value for k in call.keywords}
                v = kw.get("weights_only")
                if not (isinstance(v, ast.Constant) and v.value is True):
                    bad.append(f"{path.relative_to(ROOT)}:{line}")
    assert not bad, bad


# ---- 5. checksummed checkpoints ---------------------------------------------------------


def _bit_positions(n: int) -> list[int]:
    """Bytes to flip: the start, spread through the payload, the zip directory at the end,
    the checksum trailer (the magic, the digest) and the last byte."""
    spread = [n * i // 13 for i in range(1, 13)]
    tail = [n - d for d in (150, 100, 90, 82, 81, 80, 75, 65, 64, 30, 1)]
    return sorted({p for p in [0, 1, 7, 40, 200, *spread, *tail] if 0 <= p < n})


def _corruptions(good: bytes) -> list[tuple[str, bytes]]:
    out = []
    for pos in _bit_positions(len(good)):
        for bit in (0, 5):
            b = bytearray(good)
            b[pos] ^= 1 << bit
            out.append((f"bit {bit} of byte {pos}", bytes(b)))
    for cut in (1, 64, 81, len(good) // 3, len(good) - 10):
        out.append((f"truncated by {cut}", good[:-cut]))
    out.append(("empty", b""))
    return out


def _two_trainers() -> tuple[list[Any], Any]:
    from disco_fl.runtime.training import NodeTrainer, default_param_groups, plan_of
    from disco_fl.runtime.transport import InProcessHub

    torch.manual_seed(0)
    pm = SPEC.partition()
    plan = plan_of(pm)
    hub = InProcessHub(2)
    trainers = [
        NodeTrainer(
            pm.shard(k),
            plan,
            hub[k],
            torch.optim.Adam(default_param_groups(pm.shard(k), 1e-3)),
            timeout=60.0,
        )
        for k in range(2)
    ]
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    errors: list[BaseException] = []

    def go(k: int) -> None:
        try:
            own = trainers[k].owner_of(0) == k
            trainers[k].step(0, x if own else None, y if own else None)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=go, args=(k,), daemon=True) for k in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert not errors, errors
    return trainers, hub


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_corrupted_trainer_checkpoint_is_refused(tmp_path: Path) -> None:
    trainers, hub = _two_trainers()
    try:
        tr = trainers[0]
        path = tmp_path / "node_0.ckpt"
        tr.save_checkpoint(path)
        good = path.read_bytes()
        # still an ordinary torch file (zip comment = checksum), plain data only
        assert torch.load(path, weights_only=True)["steps_done"] == 1
        before = _snapshot(tr.shard)
        opt_before = tr.optimizer.state_dict()["state"]
        assert opt_before, "Adam has state after one step"
        for what, data in _corruptions(good):
            path.write_bytes(data)
            with pytest.raises(ChecksumError, match="node_0.ckpt") as e:
                tr.load_checkpoint(path)
            assert "cannot read training checkpoint" in str(e.value), what
            after = _snapshot(tr.shard)
            assert all(torch.equal(before[k], after[k]) for k in before), what
        path.write_bytes(good)
        assert tr.load_checkpoint(path) == 1
        after = _snapshot(tr.shard)
        assert all(torch.equal(before[k], after[k]) for k in before)
    finally:
        hub.close()


def _strategy(tmp_path: Path) -> Any:
    from disco_fl.fl.server import DiscoStrategy

    return DiscoStrategy(SPEC, steps=2, batch_size=4, checkpoint_dir=tmp_path)


def test_corrupted_strategy_checkpoint_is_refused(tmp_path: Path) -> None:
    s = _strategy(tmp_path)
    arrays = s.initial_arrays()
    s.history.append({"round": 1, "target": 0.5, "evaluate": {"accuracy": 0.25}})
    s.save_checkpoint(1, arrays)
    path = tmp_path / "checkpoint.pt"
    good = path.read_bytes()
    assert torch.load(path, weights_only=True)["rounds_done"] == 1
    for what, data in _corruptions(good):
        path.write_bytes(data)
        fresh = _strategy(tmp_path)
        with pytest.raises(ChecksumError, match="checkpoint.pt") as e:
            fresh.resume()
        assert "cannot read run checkpoint" in str(e.value), what
        assert fresh.round_offset == 0, what
    path.write_bytes(good)
    fresh = _strategy(tmp_path)
    restored = fresh.resume()
    assert restored is not None and fresh.round_offset == 1
    want, got = arrays.to_torch_state_dict(), restored.to_torch_state_dict()
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert fresh.history == s.history


def test_corrupted_model_checkpoint_is_refused(tmp_path: Path) -> None:
    src = resnet_narrow()
    path = tmp_path / "model.pth"
    save_checkpoint_atomic(src.state_dict(), path)
    good = path.read_bytes()
    for what, data in _corruptions(good):
        path.write_bytes(data)
        dst = resnet_narrow()
        before = _snapshot(dst)
        err = CheckpointChecksumError if what.startswith("bit") else CheckpointError
        with pytest.raises(err, match="model.pth"):
            load_checkpoint_strict(dst, path)
        after = _snapshot(dst)
        assert all(torch.equal(before[k], after[k]) for k in before), what
    path.write_bytes(good)
    dst = resnet_narrow()
    load_checkpoint_strict(dst, path)
    want, got = src.state_dict(), dst.state_dict()
    assert all(torch.equal(want[k], got[k]) for k in want)
    # a plain .pth of another tool (no checksum) is still read, weights_only
    plain = tmp_path / "other.pth"
    torch.save(src.state_dict(), plain)
    load_checkpoint_strict(resnet_narrow(), plain)


def test_checkpoints_hold_plain_data_only(tmp_path: Path) -> None:
    from disco_fl.core.files import save_torch

    class Obj:
        pass

    with pytest.raises(TypeError, match=r"\['bad'\]"):
        save_torch({"ok": torch.zeros(1), "bad": Obj()}, tmp_path / "x.pt")
    assert not list(tmp_path.iterdir())


# ---- 6. stale temporary files, kills, directory fsync -------------------------------------


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temp_files_are_removed_on_next_write_and_start(tmp_path: Path) -> None:
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = tmp_path / f".disco-tmp.{_dead_pid()}.x1y2z3.checkpoint.pt"
        live = tmp_path / f".disco-tmp.{sleeper.pid}.a1b2c3.checkpoint.pt"
        legacy = tmp_path / ".checkpoint.pt.ab12cd34"  # the writers before this change
        for f in (dead, live, legacy):
            f.write_bytes(b"x" * 1000)
        old = time.time() - 7200
        os.utime(legacy, (old, old))
        s = _strategy(tmp_path)
        s.save_checkpoint(1, s.initial_arrays())  # the next write
        assert not dead.exists() and not legacy.exists()
        assert live.exists(), "a write in progress in another process was removed"
        sleeper.kill()
        sleeper.wait()
        # the next start: resume cleans up what the killed writer left
        assert _strategy(tmp_path).resume() is not None
        assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]
    finally:
        sleeper.kill()
        sleeper.wait()


def test_trainer_start_removes_stale_temp_files(tmp_path: Path) -> None:
    trainers, hub = _two_trainers()
    try:
        path = tmp_path / "node_0.ckpt"
        trainers[0].save_checkpoint(path)
        stale = tmp_path / f".disco-tmp.{_dead_pid()}.q9w8e7.node_0.ckpt"
        stale.write_bytes(b"partial")
        assert trainers[0].load_checkpoint(path) == 1
        assert sorted(p.name for p in tmp_path.iterdir()) == ["node_0.ckpt"]
    finally:
        hub.close()


_WRITER = textwrap.dedent(
    """
    import sys, torch
    from disco_fl.models import save_checkpoint_atomic
    path, start = sys.argv[1], int(sys.argv[2])
    model = torch.nn.Linear(2000, 2000, bias=False)
    for i in range(start, start + 1000):
        with torch.no_grad():
            model.weight.fill_(float(i))
        save_checkpoint_atomic(model.state_dict(), path)
        print(i, flush=True)
    """
)


def _saved_value(path: Path) -> int:
    model = torch.nn.Linear(2000, 2000, bias=False)
    load_checkpoint_strict(model, path)
    w = model.weight.detach()
    assert bool((w == w[0, 0]).all()), "a mix of two checkpoints"
    return int(w[0, 0])


def test_sigkill_during_writes_never_loses_the_last_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pth"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = -1
    mid_write_kills = 0
    for round_ in range(4):
        p = subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(path), str(100 * round_)],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        try:
            assert p.stdout is not None
            first = p.stdout.readline()  # one save completed
            assert first.strip(), "the writer died before its first save"
            done = int(first)
            # kill it while its next temporary file is being written
            end = time.monotonic() + 20
            while time.monotonic() < end:
                if any(f.name.startswith(".") for f in tmp_path.iterdir()):
                    break
                time.sleep(0.0005)
            p.send_signal(signal.SIGKILL)
            p.wait(30)
            out = p.stdout.read()
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        lines = [int(x) for x in out.split()]
        if lines:
            done = lines[-1]
        if any(f.name.startswith(".") for f in tmp_path.iterdir()):
            mid_write_kills += 1
        # the last completed save (or a later one whose rename happened) is there, whole
        assert _saved_value(path) >= done
    assert mid_write_kills >= 1, "no kill landed during a write"
    # the next write removes what the killed writers left behind
    save_checkpoint_atomic({"weight": torch.zeros(2000, 2000)}, path)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["ckpt.pth"]


def test_directory_is_fsynced_after_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import stat

    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append("fsync-dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync-file")
        real_fsync(fd)

    def replace(a: Any, b: Any) -> None:
        events.append("replace")
        real_replace(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    save_checkpoint_atomic({"w": torch.ones(3)}, tmp_path / "m.pth")
    assert events == ["fsync-file", "replace", "fsync-dir"], events

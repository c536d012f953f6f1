"""The committed generated protocol code is exactly what ``protos/generate.py`` produces."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "disco_fl" / "proto_gen"


def _files(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    out = tmp_path / "proto_gen"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "protos" / "generate.py"), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    fresh, committed = _files(out), _files(COMMITTED)
    assert sorted(fresh) == sorted(committed)
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"regenerate with `python protos/generate.py`: {stale} differ"


def test_generated_code_imports_as_a_package() -> None:
    from disco_fl.proto_gen.disco.v1 import peer_pb2, peer_pb2_grpc

    assert peer_pb2.Frame.BACKWARD != peer_pb2.Frame.FORWARD
    assert hasattr(peer_pb2_grpc, "PeerStub") and hasattr(peer_pb2_grpc, "PeerServicer")
    text = (COMMITTED / "disco" / "v1" / "peer_pb2_grpc.py").read_text()
    assert "from disco.v1 import" not in text

"""The console script: help, the demo path end to end (small settings), report, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from disco_fl.cli.main import main


def test_help_lists_commands() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "disco_fl.cli.main", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    for cmd in ("demo", "train", "report", "probe", "serve", "infer"):
        assert cmd in out.stdout


@pytest.mark.slow(seconds=45)
def test_train_small_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The emulation path (`disco-fl train`); the Flower demo is tests/test_flower_e2e.py."""
    out_json = tmp_path / "demo.json"
    rc = main(
        [
            "train",
            "--nodes", "2",
            "--budget", "0.2",
            "--dense-epochs", "2",
            "--gate-epochs", "1",
            "--finetune-epochs", "1",
            "--out", str(tmp_path / "run"),
            "--json", str(out_json),
        ]
    )  # fmt: skip
    assert rc == 0
    summary = json.loads(out_json.read_text())
    assert summary["nodes"] == 2
    assert summary["bytes_per_sample_disco"] < summary["bytes_per_sample_dense"]
    assert summary["exchange_fraction"] <= 0.2
    assert summary["shard_vs_emulation_max_abs_diff"] < 1e-4
    assert summary["accuracy_disco"] > 0.5
    assert (tmp_path / "run" / "plan" / "plan.json").exists()
    assert main(["report", str(tmp_path / "run" / "plan")]) == 0
    assert "sync points" in capsys.readouterr().out


def test_train_a_dense_task(tmp_path: Path) -> None:
    """`disco-fl train --task super_resolution`: the task's built-in model (ESPCN), data (x2,
    14x14 -> 28x28), loss and metric (PSNR); the plan says its task (for `disco-fl infer`)."""
    out_json = tmp_path / "sr.json"
    rc = main(
        [
            "train", "--task", "super_resolution",
            "--nodes", "2",
            "--budget", "0.2",
            "--dense-epochs", "2",
            "--gate-epochs", "1",
            "--finetune-epochs", "1",
            "--out", str(tmp_path / "run"),
            "--json", str(out_json),
        ]
    )  # fmt: skip
    assert rc == 0
    s = json.loads(out_json.read_text())
    assert s["model"] == "espcn" and s["task"] == "super_resolution"
    assert s["metric"] == "psnr_db" and "accuracy_dense" not in s
    # a trained ESPCN on digits: far above a blank image (~7 dB), below a perfect copy
    assert 15.0 < s["metric_dense"] < 60.0 and 10.0 < s["metric_disco"] < 60.0
    assert s["bytes_per_sample_disco"] < s["bytes_per_sample_dense"]
    assert s["shard_vs_emulation_max_abs_diff"] < 1e-4
    plan = json.loads((tmp_path / "run" / "plan" / "plan.json").read_text())
    assert plan["meta"]["task"] == "super_resolution"
    assert plan["meta"]["input"] == {"mean": [0.0], "std": [1.0]}
    # a built-in model of another task is refused with a clear error, not trained
    refused = ["train", "--task", "segmentation", "--model", "espcn", "--out", str(tmp_path)]
    assert main(refused) == 2


def test_errors_are_reported_not_raised(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "error" in capsys.readouterr().err
    assert main(["train", "--budget", "3", "--dense-epochs", "1", "--out", str(tmp_path)]) == 2
    # the demo checks its settings before starting any process
    assert main(["demo", "--budget", "3", "--out", str(tmp_path / "d")]) == 2
    assert main(["demo", "--households", "0", "--out", str(tmp_path / "d")]) == 2
    assert main(["demo", "--capacities", "1,0", "--out", str(tmp_path / "d")]) == 2


def test_train_capacities_give_uneven_slices(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`disco-fl train --capacities 1,3` at N = 2: node 1 owns about 3/4 of every layer's
    channels (node 0 at least one per layer), in the exported plan as in the summary."""
    import numpy as np

    from disco_fl.data import load_builtin
    from disco_fl.emulation.capacity import channel_shares
    from disco_fl.partition.plan import Plan

    images, labels = load_builtin()
    data = tmp_path / "small.npz"
    pick = np.random.default_rng(0).choice(len(labels), 300, replace=False)  # every class
    np.savez(data, images=images[pick], labels=labels[pick])
    out_json = tmp_path / "s.json"
    rc = main(
        [
            "train", "--data", str(data), "--nodes", "2", "--capacities", "1,3",
            "--budget", "0.5", "--dense-epochs", "1", "--gate-epochs", "1",
            "--finetune-epochs", "1", "--out", str(tmp_path / "run"), "--json", str(out_json),
        ]
    )  # fmt: skip
    assert rc == 0
    summary = json.loads(out_json.read_text())
    assert summary["capacities"] == [1.0, 3.0]
    plan = Plan.load(tmp_path / "run" / "plan" / "plan.json")
    shares = channel_shares(plan.program)
    assert shares == pytest.approx(summary["channel_shares"])
    assert 0.2 <= shares[0] <= 0.32 and shares[0] + shares[1] == pytest.approx(1.0)
    conv1 = plan.program.infos["conv1"].layout
    assert conv1 is not None and (conv1.count(0), conv1.count(1)) == (2, 6)  # 8 channels
    assert summary["shard_vs_emulation_max_abs_diff"] < 1e-4
    shard_bytes = [s.param_bytes for s in plan.shards]
    assert shard_bytes[1] > 2 * shard_bytes[0]
    capsys.readouterr()
    assert main(["report", str(tmp_path / "run" / "plan")]) == 0
    assert f"channel shares per node {shares[0]:.2f}/{shares[1]:.2f}" in capsys.readouterr().out
    # a wrong count of capacities is a clear error before any training
    assert main(["train", "--capacities", "1,2,3", "--nodes", "2", "--dense-epochs", "1",
                 "--out", str(tmp_path / "bad")]) == 2  # fmt: skip

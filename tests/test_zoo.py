"""torchvision's model zoo through the ``torch.export`` capture (see ``tests/tv_zoo.py``).

For every classification and segmentation model of at most 60M parameters, at N = 2 and 4:
gates open, the emulation equals the original (1e-4 of the output's scale); with random
sparse hard masks, shard-only execution of the exported shards equals the emulation. The
models the capture still refuses are listed in ``tv_zoo.KNOWN_REFUSALS`` with the reason; for
them the test asserts a :class:`PartitionError` that names the layer, and it fails when such a
model starts to partition (update the list) or when any other model is refused.
``bench/zoo_table.py`` writes the table (``docs/zoo.md``). The default suite runs every model
(about 4 minutes on 2 cores: each export serves both node counts);
``DISCO_FL_ZOO=smallest python -m pytest tests/test_zoo.py`` runs the smallest model of each
family (a quick loop while developing an op).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from disco_fl.emulation.export import load_shard, run_shards
from disco_fl.emulation.model import PartitionedModel
from disco_fl.partition.plan import Plan
from tests import tv_zoo

TOL = 1e-4  # relative to the output's scale (max |y|)


def _cases() -> list[object]:
    """Every model; the smallest of each family with ``DISCO_FL_ZOO=smallest``."""
    every = os.environ.get("DISCO_FL_ZOO") != "smallest"
    return [
        pytest.param(name, nodes, id=f"{name}-{nodes}")
        for name in tv_zoo.zoo_names()
        if every or not tv_zoo.is_heavy(name)
        for nodes in (2, 4)
    ]


def _random_masks(pm: PartitionedModel, p_open: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _, _, d, gates in pm.gate_items():
        gates.set_mask(d, (torch.rand(gates.num_channels, generator=g) < p_open).float())


def _close(a: torch.Tensor, b: torch.Tensor, scale: float) -> bool:
    return a.shape == b.shape and float((a - b).abs().max()) <= TOL * scale


@pytest.mark.parametrize("name,nodes", _cases())
def test_zoo_model(name: str, nodes: int, tmp_path: Path) -> None:
    why = tv_zoo.refusal(name, nodes)
    if name in tv_zoo.KNOWN_REFUSALS:
        assert why is not None, f"{name} partitions now: remove it from tv_zoo.KNOWN_REFUSALS"
        assert tv_zoo.KNOWN_REFUSALS[name] in why and "layer '" in why, why
        return
    assert why is None, f"{name} at N={nodes} is refused: {why}"
    e = tv_zoo.entry(name)
    pm = PartitionedModel(*tv_zoo.program(name, nodes)).eval()
    scale = float(e.reference.abs().max())
    with torch.no_grad():
        out = tv_zoo.output_tensor(pm(e.x))
    assert _close(out, e.reference, scale), (out - e.reference).abs().max() / scale
    _random_masks(pm, 0.35, seed=nodes)
    x = e.x[:1]  # one sample (the batch size is free at run time): half the work
    with torch.no_grad():
        masked = tv_zoo.output_tensor(pm(x))
    assert not _close(masked, e.reference[:1], scale)  # the masks really change the function
    pm.export(tmp_path)
    plan = Plan.load(tmp_path / "plan.json")
    shards = [load_shard(tmp_path / "plan.json", k, plan=plan) for k in range(nodes)]
    got = tv_zoo.output_tensor(run_shards(shards, x))
    m_scale = float(masked.abs().max())
    assert _close(got, masked, m_scale), (got - masked).abs().max() / m_scale

"""Differential privacy that holds against the server (issue 13, item 1).

The noise and the Poisson sample come from each node's OS CSPRNG, never from the run config
(which the server holds); the accountant's sample rate is the Poisson rate the batch owner
uses; an empty batch is a noise-only step that the accountant counts; seeded noise exists only
behind ``DPConfig(insecure_seed=...)``, which warns every time, and the ClientApp never sets it.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import threading
from typing import Any

import pytest
import torch

from disco_fl.runtime.training import NodeTrainer, plan_of
from disco_fl.runtime.training.dp import DPConfig, gaussian_noise, poisson_sample
from disco_fl.runtime.transport import InProcessHub
from tests.conftest import run_nodes
from tests.test_training_distributed import _dp_distributed_grads, _dp_setup, _run, _snapshot

SIGMA, CLIP, BATCH = 0.5, 2.0, 8


def _noisy_update(sigma: float, **dp: Any) -> torch.Tensor:
    """One DP step of the 3-node UserNet (the same config, data and weights every call) with
    SGD(lr=1): every node's applied gradient, flattened."""
    pm, _, (x, y, cfg) = _dp_setup(3, sigma, CLIP)
    cfg = dataclasses.replace(cfg, **dp)
    grads, _ = _dp_distributed_grads(pm, (x, y, cfg))
    return torch.cat([g[key].flatten() for g in grads for key in sorted(g)])


def test_same_config_data_and_seed_give_independent_noise() -> None:
    """Two runs with everything equal (config, data, weights, every seed) draw independent
    noise: nobody holding the run config can regenerate it. (On the seeded generator the two
    noises were equal: correlation 1.)"""
    clean = _noisy_update(0.0)
    n1 = _noisy_update(SIGMA) - clean
    n2 = _noisy_update(SIGMA) - clean
    n = n1.numel()
    assert n > 5000
    expected = SIGMA * CLIP / BATCH
    # std of n normal samples: relative standard error 1/sqrt(2n) < 1 %; 5 % is > 5 SE
    for noise in (n1, n2):
        assert abs(float(noise.std()) / expected - 1.0) < 0.05
    # independent: the sample correlation is ~N(0, 1/n); 5/sqrt(n) is 5 SE (~0.06 here)
    corr = float(torch.corrcoef(torch.stack([n1, n2]))[0, 1])
    assert abs(corr) < 5 / n**0.5, corr
    assert not torch.equal(n1, n2)


def test_noise_std_on_a_zero_gradient_and_epsilon_equal_opacus() -> None:
    """An empty Poisson batch is a noise-only step: the applied gradient is pure noise of std
    sigma*C/B on every trainable tensor, the step commits on every node and the accountant
    counts it; epsilon equals Opacus's RDPAccountant (same sigma, q, steps, delta) exactly."""
    from opacus.accountants import RDPAccountant

    pm, _, (x, y, cfg) = _dp_setup(3, SIGMA, CLIP)
    before = _snapshot(pm)
    plan = plan_of(pm)
    batches = [(x[:0], y[:0]), (x, y), (x[:0], y[:0])]  # empty, full, empty
    with InProcessHub(3) as hub:
        trainers = [
            NodeTrainer(
                pm.shard(k), plan, hub[k], torch.optim.SGD(pm.shard(k).parameters(), lr=1.0), dp=cfg
            )
            for k in range(3)
        ]
        results, errors = _run(trainers, batches[:1], range(1))
        assert errors == [None] * 3
        after = _snapshot(pm)
        noise = torch.cat(
            [(before[k][key] - after[k][key]).flatten() for k in range(3) for key in before[k]
             if "gates" not in key]
        )  # fmt: skip
        assert all(r[0].dp is not None and r[0].dp.batch == 0 for r in results)
        assert all(r[0].loss is None for r in results)
        # a gradient of exactly zero: what moved is the noise alone, on every tensor
        expected = SIGMA * CLIP / BATCH
        assert noise.numel() > 5000 and bool((noise != 0).all())
        assert abs(float(noise.std()) / expected - 1.0) < 0.05  # > 5 standard errors
        assert abs(float(noise.mean())) < 5 * expected / noise.numel() ** 0.5
        results2, errors = _run(trainers, batches, range(1, 3))
        assert errors == [None] * 3
    q = BATCH / 800
    assert cfg.sample_rate(0) == q
    acc = RDPAccountant()
    for _ in range(3):
        acc.step(noise_multiplier=SIGMA, sample_rate=q)
    for tr in trainers:
        assert tr.dp_state is not None
        assert tr.dp_state.accountants[0].history == [(SIGMA, q, 3)]
        assert tr.dp_state.epsilon(0) == acc.get_epsilon(delta=1e-5)
    last = results2[0][-1].dp
    assert last is not None and last.epsilon == acc.get_epsilon(delta=1e-5)


def test_gaussian_noise_is_fresh_normal_with_the_right_std() -> None:
    """2^20 draws: std within 0.5 % (the relative standard error of a std estimate is
    1/sqrt(2n) = 0.07 %, so 0.5 % is 7 SE), mean within 5 SE, fourth moment of a normal,
    Kolmogorov-Smirnov against N(0, std^2); two draws differ."""
    from scipy import stats

    n, std = 1 << 20, 0.7
    a = gaussian_noise(n, std)
    assert a.dtype == torch.float64 and a.shape == (n,)
    assert abs(float(a.std()) / std - 1.0) < 0.005
    assert abs(float(a.mean())) < 5 * std / n**0.5
    kurt = float(((a / a.std()) ** 4).mean()) - 3.0  # SE sqrt(24/n) = 0.005
    assert abs(kurt) < 0.03
    assert stats.kstest(a.numpy(), "norm", args=(0.0, std)).pvalue > 1e-6
    b = gaussian_noise(n, std)
    assert not torch.equal(a, b)
    assert abs(float(torch.corrcoef(torch.stack([a, b]))[0, 1])) < 5 / n**0.5


def _sampler(n: int, batch: int, node: int = 0, **dp: Any) -> NodeTrainer:
    """Node ``node`` of a 2-node UserNet household whose owner 0 holds ``n`` examples."""
    pm, _, (_, _, cfg) = _dp_setup(2, SIGMA, CLIP)
    cfg = dataclasses.replace(cfg, dataset_sizes={0: n}, batch_size=batch, **dp)
    hub = InProcessHub(2)
    opt = torch.optim.SGD(pm.shard(node).parameters())
    return NodeTrainer(pm.shard(node), plan_of(pm), hub[node], opt, dp=cfg)


def test_poisson_sampling_varies_with_rate_q_and_the_accountant_uses_q() -> None:
    """The owner takes each example independently with q = B/n: the batch sizes vary, with
    mean q*n and variance n*q*(1-q) (binomial); every example is drawn about q*steps times;
    the accountant's sample rate is that same q."""
    n, batch, steps = 500, 20, 2000
    tr = _sampler(n, batch)
    dp = tr.dp_state
    assert dp is not None
    q = dp.config.sample_rate(0)
    assert q == batch / n
    idx = [dp.sample_batch(t) for t in range(steps)]
    sizes = torch.tensor([len(i) for i in idx], dtype=torch.float64)
    for i in idx:
        assert i.dtype == torch.long and bool((i[1:] > i[:-1]).all())
        assert not len(i) or (int(i[0]) >= 0 and int(i[-1]) < n)
    assert len(set(sizes.tolist())) > 10
    # mean of 2000 binomial(500, 0.04) sizes: SE sqrt(19.2/2000) = 0.098; 0.5 is > 5 SE
    assert abs(float(sizes.mean()) - q * n) < 0.5
    assert abs(float(sizes.var()) / (n * q * (1 - q)) - 1.0) < 0.2  # SE ~3.2 %
    counts = torch.bincount(torch.cat(idx), minlength=n).double()
    # each count ~ binomial(2000, 0.04): mean 80, sd 8.8
    assert abs(float(counts.mean()) - q * steps) < 1.0 and float(counts.min()) > 30
    # the accountant steps with q whatever the batch size was
    for _ in range(3):
        dp.after_commit(0)
    assert dp.accountants[0].history == [(SIGMA, q, 3)]
    # a non-owner cannot sample; a fresh node with the same config draws other batches
    other = _sampler(n, batch)
    assert other.dp_state is not None
    assert any(not torch.equal(other.dp_state.sample_batch(t), idx[t]) for t in range(5))
    peer = _sampler(n, batch, node=1).dp_state
    assert peer is not None
    with pytest.raises(ValueError, match="node 1 does not own step 0"):
        peer.sample_batch(0)


def test_poisson_sample_edge_rates() -> None:
    assert poisson_sample(50, 0.0).numel() == 0
    assert torch.equal(poisson_sample(50, 1.0), torch.arange(50))
    with pytest.raises(ValueError, match="sample_rate"):
        poisson_sample(10, 1.5)


def test_insecure_seed_reproduces_and_warns_every_time(caplog: pytest.LogCaptureFixture) -> None:
    """The test-only switch: the same insecure_seed gives the same noise and batches, another
    seed other ones, and each use logs a warning."""
    clean = _noisy_update(0.0)
    with caplog.at_level(logging.WARNING, logger="disco_fl.runtime.training.dp"):
        a = _noisy_update(SIGMA, insecure_seed=7) - clean
        warned = [r for r in caplog.records if "INSECURE" in r.getMessage()]
        assert len(warned) == 3  # one per node for the step's noise
        b = _noisy_update(SIGMA, insecure_seed=7) - clean
        c = _noisy_update(SIGMA, insecure_seed=8) - clean
        assert len([r for r in caplog.records if "INSECURE" in r.getMessage()]) == 9
        caplog.clear()
        s1 = _sampler(200, 10, insecure_seed=7).dp_state
        s2 = _sampler(200, 10, insecure_seed=7).dp_state
        assert s1 is not None and s2 is not None
        assert all(torch.equal(s1.sample_batch(t), s2.sample_batch(t)) for t in range(5))
        assert len([r for r in caplog.records if "INSECURE" in r.getMessage()]) == 10
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert abs(float(a.std()) / (SIGMA * CLIP / BATCH) - 1.0) < 0.05
    assert DPConfig(dataset_sizes={0: 10}, noise_multiplier=1.0, batch_size=2).insecure_seed is None


# ---- the Flower client path ----------------------------------------------------------------


def _client_round(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any, configs: list[Any]
) -> tuple[list[Any], list[DPConfig], list[Any], list[int]]:
    """One DP training round of household "a" through the ClientApp's ``train`` handler
    (peers over the in-process transport); returns the replies, the DPConfigs the ClientApp
    built, the node trainers and the sizes of the batches drawn by ``sample_batch``."""
    from flwr.app import Context, RecordDict

    import disco_fl.fl.client_app as ca
    import disco_fl.runtime.training as training
    from disco_fl.fl.federated import ModelSpec, NodeData
    from disco_fl.runtime.training.dp import DPState

    n_train = 40
    g = torch.Generator().manual_seed(5)
    owner_data = NodeData(
        torch.randn(n_train, 1, 12, 12, generator=g),
        torch.randint(0, 10, (n_train,), generator=g),
        torch.zeros(0),
        torch.zeros(0, dtype=torch.long),
    )
    none = NodeData(torch.zeros(0), torch.zeros(0, dtype=torch.long), torch.zeros(0),
                    torch.zeros(0, dtype=torch.long))  # fmt: skip
    hub = InProcessHub(2)
    for k in range(2):
        hub[k].close = lambda *a, **kw: None  # type: ignore[method-assign]
    built: list[DPConfig] = []
    trainers: list[Any] = []
    real = training.NodeTrainer

    class SpyTrainer(real):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kw: Any) -> None:
            built.append(kw["dp"])
            super().__init__(*args, **kw)
            trainers.append(self)

    monkeypatch.setattr(training, "NodeTrainer", SpyTrainer)
    # the nodes are threads here (processes in a deployment): torch.fx tracing is not
    # thread-safe, so the two nodes partition the model one after the other
    lock = threading.Lock()
    partition = ModelSpec.partition

    def one_at_a_time(self: ModelSpec, *a: Any, **kw: Any) -> Any:
        with lock:
            return partition(self, *a, **kw)

    monkeypatch.setattr(ModelSpec, "partition", one_at_a_time)
    drawn: list[int] = []
    sample = getattr(DPState, "sample_batch", None)

    def spy_sample(self: DPState, step: int) -> torch.Tensor:
        assert sample is not None
        idx = sample(self, step)
        drawn.append(len(idx))
        return idx

    monkeypatch.setattr(DPState, "sample_batch", spy_sample, raising=False)
    monkeypatch.setattr(ca, "_transport", lambda cfg, plan, k, *a: hub[k])
    monkeypatch.setattr(
        ca, "_data", lambda ctx, *_: owner_data if int(ctx.node_config["shard"]) == 0 else none
    )

    def go(k: int) -> Any:
        ctx = Context(
            run_id=1,
            node_id=k,
            node_config={
                "household": "a",
                "shard": k,
                "peer-address": f"127.0.0.1:{7100 + k}",
                "cache-dir": str(tmp_path),
            },
            state=RecordDict(),
            run_config={},
        )
        return ca.train(configs[k], ctx)

    try:
        replies = run_nodes(go, 2)
    finally:
        hub.close()
    return replies, built, trainers, drawn


def test_client_app_noise_and_batches_not_from_the_run_config(
    tmp_path: Any, flower_run_identity: None, caplog: pytest.LogCaptureFixture
) -> None:
    """Through the ClientApp: two rounds with identical messages (config, seed, shards) give
    different updates; the DPConfig it builds has no seed, even when the run config carries
    seed-like keys; batches are Poisson samples (the accountant's rate is q); no insecure
    warning is ever logged."""
    from flwr.app import ConfigRecord

    from disco_fl.fl.federated import ModelSpec, unpack_state
    from disco_fl.fl.server import DiscoStrategy, NodeInfo, build_roster
    from disco_fl.fl.server.strategy import DPSettings

    spec = ModelSpec(num_nodes=2, norm="group", image_size=12)
    s = DiscoStrategy(spec, steps=3, batch_size=8, dp=DPSettings(1.0, 1.0, 1e-5), seed=0)
    infos = [NodeInfo(101, "a", 0, "127.0.0.1:7100", 40, 0), NodeInfo(102, "a", 1, "x:1", 0, 0)]
    s.roster = build_roster(infos, 2)
    s.roster["a"].token = "t"
    s.num_rounds = 2
    msgs = list(s.configure_train(1, s.initial_arrays(), ConfigRecord(), grid=None))  # type: ignore[arg-type]
    msgs.sort(key=lambda m: int(m.content.config_records["config"]["shard"]))  # type: ignore[arg-type]
    for m in msgs:  # whatever the server adds, the ClientApp takes no noise seed from it
        cfg = m.content.config_records["config"]
        cfg["dp-insecure-seed"] = 0
        cfg["insecure-seed"] = 0
        cfg["dp-seed"] = 0
    runs = []
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            with pytest.MonkeyPatch.context() as mp:
                runs.append(_client_round(mp, tmp_path, copy.deepcopy(msgs)))
    (r1, built1, tr1, drawn1), (r2, built2, tr2, drawn2) = runs
    # identical messages, different updates (from the run config's seed they were equal)
    for k in range(2):
        a1 = unpack_state(r1[k].content.array_records["arrays"])
        a2 = unpack_state(r2[k].content.array_records["arrays"])
        weights = [key for key in a1 if "gates" not in key and key.endswith("weight")]
        assert weights and all(not torch.equal(a1[key], a2[key]) for key in weights)
    # no seed for the noise, whatever the run config carries; never the insecure switch
    for dpc in built1 + built2:
        assert dpc is not None and dpc.insecure_seed is None
        assert [f.name for f in dataclasses.fields(dpc) if "seed" in f.name] == ["insecure_seed"]
    assert not [r for r in caplog.records if "INSECURE" in r.getMessage()]
    # Poisson batches drawn by the owner, every step counted at rate q
    q = 8 / 40
    for trs, drawn in ((tr1, drawn1), (tr2, drawn2)):
        assert len(trs) == 2 and len(drawn) == 3
        for tr in trs:
            assert [h.dp.batch for h in tr.history if h.dp is not None] == drawn
            assert tr.dp_state.accountants[0].history == [(1.0, q, 3)]
    for k in range(2):
        m1 = r1[k].content["metrics"]
        assert m1["dp-rate"] == (q if k == 0 else 0.0) and m1["dp-steps"] == (3 if k == 0 else 0)
        # the training loss (no noise) and the count of non-empty steps stay on the node
        assert "loss" not in m1 and "owner-steps" not in m1

"""Differential privacy for the distributed training step (DP-SGD, flat clipping).

Method (one step, after the ordinary distributed backward pass):

1. **Per-sample gradients per shard**, with ``torch.func`` (``vmap`` of a ``vjp``) over each
   op's own small graph: for every op with trainable parameters, the op's ``compute`` is
   re-run per sample with the op's inputs, received messages and output gradient of that
   sample (all kept from the step). Every op's output for sample ``b`` depends only on sample
   ``b``'s inputs (BatchNorm in training mode is refused, see :func:`fix_batchnorm`), so this
   is exact. Gate logits are not trained under DP (``gate_mode="hard"`` is required).

   **Model tensors used without a batch input** (``param`` ops: a ViT's class token and
   positional embedding) are the same for every sample, so their output gradient from the
   backward pass is already summed over the batch. Their per-sample gradient is pulled back
   from the ops that combine them with an activation (``expand`` + ``cat`` of a class token,
   ``add`` of a positional embedding): those ops are re-run per sample like the others, with
   the shared tensor whole, and the ``vjp`` also gives the gradient towards it for sample
   ``b``; per shared value these are summed over its consumers and pulled back through any ops
   on shared values alone down to the ``param`` op, one sample at a time. Also exact. A
   shared tensor that reaches a communicating op (exchange, normalization statistics) or a
   random one (dropout) before meeting an activation is refused with a clear error (capture
   never produces one: a model tensor becomes a trainable ``param`` op only where it is added
   to or concatenated with an activation).

   **Attention**: partitioned attention is linear ops (``qkv`` / in-projection rows of the
   node's heads, output projection) around per-head ``scaled_dot_product_attention``, all
   per-sample, so step 1 covers it; nothing is swapped for Opacus's ``DPMultiheadAttention``.
   The tests compare with Opacus's ``make_private`` on the same dense ViT (its hand-written
   attention needs no ``ModuleValidator.fix``: Opacus's ``Linear``, ``Conv2d`` and
   ``LayerNorm`` grad samplers, functorch for the class token and positional embedding).
   ``nn.MultiheadAttention`` models must be batch first (sequence-first attention is refused:
   dim 0 is taken as the samples), and dropout on the attention weights must be 0 (the
   per-sample re-run could not redraw the step's mask; dropout ops elsewhere are fine: they
   are not re-run, their kept inputs and gradients carry the step's mask). Stochastic depth
   (``drop_path``) likewise: it has no parameters and is not re-run, and the ops around it
   are re-run with the kept inputs and gradients, which carry the step's per-sample mask
   (drawn from ``gate_generator(gate_seed, step, op, -1, -1)``, the same on every node).
2. **Whole-model norms**: each node sends the per-sample squared norms of its own
   coordinates (fp32, ``(B,)``) to every peer (sub-channel NORMS, ``NORMS`` frames); each
   node sums them into the norm of the whole model's per-sample gradient.
3. **Flat clipping** with factor ``min(1, C / (norm_b + 1e-6))`` (Opacus's formula), summed
   over the batch; each node adds Gaussian noise ``N(0, (sigma C)^2)`` to its own
   coordinates only (every trainable tensor of its shard), drawn from the operating
   system's CSPRNG (see *Randomness* below), then divides by the **expected** batch size
   ``DPConfig.batch_size`` (Opacus's ``loss_reduction="mean"`` with Poisson sampling,
   ``expected_batch_size``).
4. **Accounting**: an Opacus accountant (``"rdp"`` default, or ``"prv"``) per data owner is
   stepped after every committed step that owner's data took, with the sample rate
   ``q = batch_size / dataset size`` of that owner (:meth:`DPConfig.sample_rate`), the same
   ``q`` the sampler uses; :meth:`DPState.epsilon` reports epsilon per owner. With
   ``target_epsilon`` set, the noise multiplier is calibrated by
   :func:`opacus.accountants.utils.get_noise_multiplier` for the planned steps.

**Poisson sampling** (what the accountant assumes): the batch owner draws each step's batch
with :meth:`DPState.sample_batch`: every one of its examples is taken independently with
probability ``q`` (as Opacus's ``UniformWithReplacementSampler``), so the batch size varies
from step to step (mean ``q * n = batch_size``). A caller that feeds
:meth:`~disco_fl.runtime.training.NodeTrainer.step` batches of its own gets the same clipping and
noise, but the reported epsilon then rests on an assumption its batches do not meet (as with
Opacus's ``poisson_sampling=False``). **An empty batch** (probability ``(1 - q)^n``) is a
noise-only step, as in Opacus: the owner feeds ``x`` and ``y`` with 0 rows; the input frame
tells every node, no layer is computed, no norms are exchanged, every node sets the gradient
of every trainable tensor of its shard to ``N(0, (sigma C)^2) / batch_size``, the step commits
and the optimizer steps; the accountant counts it like any other step (one invocation of the
sampled Gaussian mechanism). Skipping it instead would show, without noise, that the batch
was empty.

**Randomness** (noise and the Poisson sample) is in :mod:`disco_fl.runtime.training.dp_random`:
fresh from the operating system's CSPRNG on every node, never derivable from the run config.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from disco_fl.core.wire import WireError, decode_tensor
from disco_fl.node.shard import NodeShard
from disco_fl.partition.plan import Plan
from disco_fl.proto_gen.disco.v1 import peer_pb2
from disco_fl.runtime.training.dp_grads import per_sample_grads
from disco_fl.runtime.training.dp_grads import shared_values as _shared_values
from disco_fl.runtime.training.dp_random import gaussian_noise, insecure_bits, poisson_sample
from disco_fl.runtime.training.errors import PeerFailure
from disco_fl.runtime.training.trace import StepTrace

log = logging.getLogger(__name__)

# sends this node's per-sample squared norms (fp32, ``(B,)``) to every peer and returns each
# peer's message, not yet decoded (:meth:`disco_fl.runtime.training.commit.StepIO.exchange_norms`)
NormsExchange = Callable[[torch.Tensor], Mapping[int, peer_pb2.Tensor]]


class DPNode(Protocol):
    """What :class:`DPState` reads of the node it privatizes (a
    :class:`~disco_fl.runtime.training.NodeTrainer`)."""

    index: int
    plan: Plan
    shard: NodeShard

    @property
    def gate_mode(self) -> str: ...

    def owner_of(self, step: int) -> int: ...


@dataclass
class DPConfig:
    """Settings of differentially private training.

    Attributes
    ----------
    max_grad_norm : float
        Clipping bound C of the whole model's per-sample gradient; default 1.0.
    noise_multiplier : float or None
        sigma; the noise std is ``sigma * C``. Default None: calibrated from
        ``target_epsilon`` (one of the two must be given).
    target_epsilon : float or None
        Calibrate sigma so that every owner's epsilon after ``planned_steps`` of its own
        steps is at most this; default None.
    target_delta : float
        delta of the (epsilon, delta) guarantee; default 1e-5.
    dataset_sizes : mapping of int to int
        Size of each data owner's dataset (node index -> samples); sets the sample rate.
    batch_size : int
        Expected samples per step (Poisson sampling: each of an owner's ``n`` examples is
        taken with probability ``batch_size / n``); the noisy sum is divided by it. Default 32.
    planned_steps : int
        Steps per owner for the target-epsilon calibration; default 100.
    accountant : {"rdp", "prv"}
        Opacus accountant; default "rdp".
    insecure_seed : int or None
        **Tests only.** Draw the noise and the Poisson sample from a generator seeded by
        ``(insecure_seed, node, step)`` instead of the OS's CSPRNG: anyone who knows the seed
        can subtract the noise (no privacy at all). Every use logs a warning. Default None
        (secure).
    """

    dataset_sizes: Mapping[int, int]
    max_grad_norm: float = 1.0
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    target_delta: float = 1e-5
    batch_size: int = 32
    planned_steps: int = 100
    accountant: str = "rdp"
    insecure_seed: int | None = None

    def __post_init__(self) -> None:
        if not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be positive, got {self.max_grad_norm}")
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError("give exactly one of noise_multiplier and target_epsilon")
        if self.noise_multiplier is not None and not self.noise_multiplier >= 0:
            raise ValueError(f"noise_multiplier must be >= 0, got {self.noise_multiplier}")
        if self.target_epsilon is not None and not self.target_epsilon > 0:
            raise ValueError(f"target_epsilon must be positive, got {self.target_epsilon}")
        if not 0 < self.target_delta < 1:
            raise ValueError(f"target_delta must be in (0, 1), got {self.target_delta}")
        if self.accountant not in ("rdp", "prv"):
            raise ValueError(f"accountant must be 'rdp' or 'prv', got {self.accountant!r}")
        if self.batch_size < 1 or self.planned_steps < 1:
            raise ValueError("batch_size and planned_steps must be >= 1")
        if not self.dataset_sizes or any(v < self.batch_size for v in self.dataset_sizes.values()):
            raise ValueError("dataset_sizes must give every owner at least batch_size samples")

    def sample_rate(self, owner: int) -> float:
        """``q`` of ``owner``: the Poisson sample rate and the accountant's sample rate."""
        if owner not in self.dataset_sizes:
            raise ValueError(f"no dataset size for data owner {owner}")
        return self.batch_size / self.dataset_sizes[owner]

    def resolved_noise_multiplier(self) -> float:
        """sigma, calibrated with Opacus for the smallest-dataset owner if needed."""
        if self.noise_multiplier is not None:
            return float(self.noise_multiplier)
        from opacus.accountants.utils import get_noise_multiplier

        assert self.target_epsilon is not None
        rate = max(self.sample_rate(o) for o in self.dataset_sizes)
        return float(
            get_noise_multiplier(
                target_epsilon=self.target_epsilon,
                target_delta=self.target_delta,
                sample_rate=rate,
                steps=self.planned_steps,
                accountant=self.accountant,
            )
        )


@dataclass
class DPStepInfo:
    """What DP did in one step (this node's view)."""

    noise_multiplier: float
    max_grad_norm: float
    clipped_fraction: float  # samples whose whole-model norm exceeded C
    mean_norm: float  # mean whole-model per-sample gradient norm (before clipping)
    epsilon: float | None = None  # the owner's epsilon after this step (set on commit)
    batch: int = 0  # samples in the step's batch (0: a noise-only step)


def fix_batchnorm(model: nn.Module) -> nn.Module:
    """Replace BatchNorm with GroupNorm (Opacus's ``ModuleValidator.fix``), saying so.

    DP-SGD needs per-sample gradients; BatchNorm mixes the samples of a batch. Call this on
    the dense model before :func:`~disco_fl.partition` when training with DP.
    """
    from opacus.validators import ModuleValidator

    bns = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return model
    log.warning(
        "differential privacy: BatchNorm mixes samples, so it is replaced by GroupNorm in %s "
        "(opacus ModuleValidator.fix); retrain or fine-tune the model afterwards",
        ", ".join(bns),
    )
    fixed = ModuleValidator.fix(model)
    assert isinstance(fixed, nn.Module)
    return fixed


def _accountant(kind: str) -> Any:
    if kind == "prv":
        from opacus.accountants import PRVAccountant

        return PRVAccountant()
    from opacus.accountants import RDPAccountant

    return RDPAccountant()


class DPState:
    """DP of one node: clipping with household norms, its own noise, the accountants."""

    def __init__(self, config: DPConfig, trainer: DPNode) -> None:
        program = trainer.plan.program
        bad = [op.name for op in program.ops if op.kind == "batch_norm"]
        if bad:
            raise ValueError(
                f"differential privacy needs per-sample gradients but the model has BatchNorm "
                f"({', '.join(bad)}); replace it with GroupNorm before partitioning: "
                f"disco_fl.runtime.training.dp.fix_batchnorm(model) (as opacus ModuleValidator.fix)"
            )
        self._shared, self._grad_shared = _shared_values(program)
        seq = [op.name for op in program.ops if op.attrs.get("seq_first")]
        if seq:
            raise ValueError(
                f"differential privacy takes dim 0 as the samples, but attention "
                f"{', '.join(seq)} is sequence first (nn.MultiheadAttention / "
                f"nn.TransformerEncoderLayer with batch_first=False); use batch_first=True"
            )
        windows = [op.name for op in program.ops if program.infos[op.name].batch_mult > 1]
        if windows:
            raise ValueError(
                f"differential privacy takes each row of dim 0 as one sample, but "
                f"{', '.join(windows[:3])}{' ...' if len(windows) > 3 else ''} hold several rows "
                f"per sample (windows merged into the batch dim, as Swin's window attention "
                f"does); per-sample gradients of such models are not supported yet"
            )
        drop = [
            op.name
            for op in program.ops
            if op.kind == "attention" and float(op.attrs.get("dropout", 0.0)) > 0
        ]
        if drop:
            raise ValueError(
                f"differential privacy re-runs attention per sample, which cannot redraw the "
                f"step's dropout mask on the attention weights ({', '.join(drop)}): set the "
                f"attention dropout to 0 (e.g. build_model(..., dropout=0.0))"
            )
        if trainer.gate_mode != "hard":
            raise ValueError(
                "differential privacy trains weights with fixed masks: use gate_mode='hard'"
            )
        self.config = config
        self.t = trainer
        self.sigma = config.resolved_noise_multiplier()
        self.accountants = {o: _accountant(config.accountant) for o in config.dataset_sizes}

    def epsilon(self, owner: int) -> float:
        """epsilon of ``owner``'s dataset after the committed steps (``target_delta``)."""
        acc = self.accountants[owner]
        if not acc.history:
            return 0.0
        return float(acc.get_epsilon(delta=self.config.target_delta))

    def after_commit(self, owner: int) -> float:
        """Count one committed step of ``owner``'s data (empty batches included) at the
        Poisson sample rate ``q`` of that owner; its epsilon after it."""
        rate = self.config.sample_rate(owner)
        self.accountants[owner].step(noise_multiplier=self.sigma, sample_rate=rate)
        return self.epsilon(owner)

    def sample_batch(self, step: int) -> torch.Tensor:
        """The batch of ``step`` on its owner (this node): ascending indices into the owner's
        dataset of ``dataset_sizes[owner]`` examples, each taken independently with
        probability ``q = batch_size / dataset_sizes[owner]`` (Poisson sampling, as the
        accountant assumes), from the OS's CSPRNG. The batch may be empty: feed it anyway
        (``x[idx]``, ``y[idx]``), the step is then a noise-only step."""
        owner = self.t.owner_of(step)
        if owner != self.t.index:
            raise ValueError(f"node {self.t.index} does not own step {step} (node {owner} does)")
        n = self.config.dataset_sizes[owner]
        return poisson_sample(n, self.config.sample_rate(owner), self._bits("sample", step))

    def _bits(self, purpose: str, step: int) -> np.random.PCG64 | None:
        """None (the OS's CSPRNG) or, with ``insecure_seed``, a seeded generator (warned)."""
        seed = self.config.insecure_seed
        if seed is None:
            return None
        return insecure_bits(seed, purpose, self.t.index, step)

    def _trainable(self, per: Mapping[nn.Parameter, torch.Tensor]) -> list[nn.Parameter]:
        """Every tensor of this shard that DP updates (the same set in every step, empty
        batches included, so that a step's noise never tells whether its batch was empty):
        the ops' trainable parameters, then any other with a per-sample gradient."""
        out: list[nn.Parameter] = []
        seen: set[int] = set()
        for st in self.t.shard.ops.values():
            for p in st._parameters.values():
                if p is not None and p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        out.extend(p for p in per if id(p) not in seen)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"history": {o: list(a.history) for o, a in self.accountants.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for o, hist in state["history"].items():
            if o in self.accountants:
                self.accountants[o].history = [tuple(h) for h in hist]

    # ---- the step -----------------------------------------------------------------------
    def per_sample_grads(self, trace: StepTrace) -> dict[nn.Parameter, torch.Tensor]:
        """``param -> (B, *param.shape)``: per-sample gradients of the step's (mean) loss
        (:func:`~disco_fl.runtime.training.dp_grads.per_sample_grads`)."""
        return per_sample_grads(trace, self.t.shard, self._shared, self._grad_shared)

    def privatize(self, trace: StepTrace, exchange_norms: NormsExchange) -> DPStepInfo:
        """Replace this node's gradients with its part of the clipped, noised DP gradient
        (the household's whole-model norms through ``exchange_norms``)."""
        cfg = self.config
        batch = trace.batch
        if batch == 0:  # empty Poisson batch: a noise-only step (nothing was computed)
            return self._noise_step(trace.step, {}, torch.zeros(0, dtype=torch.float64))
        per = self.per_sample_grads(trace)
        # per-sample gradients of the per-sample losses (the step's loss is their mean)
        local = torch.zeros(batch, dtype=torch.float64)
        for g in per.values():
            local += (g.reshape(batch, -1).double() * batch).pow(2).sum(1)
        total = local.clone()
        for j, msg in sorted(exchange_norms(local.float()).items()):
            try:
                v = decode_tensor(msg, max_bytes=4 * batch)
            except WireError as e:
                raise PeerFailure(j, f"bad per-sample norms: {e}") from e
            if v.shape != (batch,) or not bool(torch.isfinite(v).all()) or bool((v < 0).any()):
                raise PeerFailure(j, f"per-sample squared norms must be {batch} finite values >= 0")
            total += v.double()
        norms = total.sqrt()
        clip = (cfg.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        summed = {
            p: torch.einsum("b,b...->...", clip.to(g.dtype), g * batch) for p, g in per.items()
        }
        return self._noise_step(trace.step, summed, norms)

    def _noise_step(
        self, step: int, summed: Mapping[nn.Parameter, torch.Tensor], norms: torch.Tensor
    ) -> DPStepInfo:
        """Set every DP-updated tensor's gradient to (its clipped sum, zero where none, plus
        this node's noise) / the expected batch size."""
        cfg = self.config
        std = self.sigma * cfg.max_grad_norm
        bits = self._bits("noise", step) if std > 0 else None
        for p in self.t.shard.parameters():
            p.grad = None
        for p in self._trainable(summed):
            s = summed.get(p)
            if s is None:
                s = torch.zeros(p.shape, dtype=p.dtype)
            if std > 0:
                noise = gaussian_noise(s.numel(), std, bits).reshape(s.shape)
                p.grad = ((s.double() + noise) / cfg.batch_size).to(p.dtype)
            else:
                p.grad = (s / cfg.batch_size).to(p.dtype)
        batch = int(norms.numel())
        return DPStepInfo(
            self.sigma,
            cfg.max_grad_norm,
            float((norms > cfg.max_grad_norm).double().mean()) if batch else 0.0,
            float(norms.mean()) if batch else 0.0,
            batch=batch,
        )


__all__ = [
    "DPConfig",
    "DPNode",
    "DPState",
    "DPStepInfo",
    "fix_batchnorm",
    "gaussian_noise",
    "poisson_sample",
]

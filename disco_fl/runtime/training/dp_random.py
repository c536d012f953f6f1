"""Randomness for differential privacy: Gaussian noise and Poisson samples that nobody can
regenerate.

The server holds the run config (seeds included) and is the party DP protects
against, so nothing DP draws may be derivable from it. Noise and the Poisson sample come from
``os.urandom`` (the kernel's CSPRNG, ``getrandom(2)``), fresh for every draw on every node;
no seed, no state that could be saved or sent. Gaussian noise is Box-Muller in float64 over
53-bit uniforms ``u1`` in ``(0, 1]`` and ``u2`` in ``[0, 1)``, and every coordinate is the
sum of 4 such normals of std ``sigma C`` divided by 2 (Opacus's ``secure_mode``, after
Holohan and Braghin, arXiv 2107.10138, section 5.1: a defence against attacks on the
floating-point representation of a single Gaussian sample). Limits: each Box-Muller normal
is bounded by ``sqrt(-2 ln 2^-53) ~ 8.57`` (mass beyond it ``~1e-16``), so the sum is bounded
by ``~17 sigma C``, a truncation far below any delta used in practice; the noisy sum is
rounded to the parameter's dtype (float32) as in Opacus. ``DPConfig(insecure_seed=...)``
(:func:`insecure_bits`) makes the noise and the sample reproducible from
``(insecure_seed, node, step)`` for tests only: every use logs a warning, and the ClientApp
never sets it (the run config cannot turn it on).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os

import numpy as np
import torch

log = logging.getLogger(__name__)

_NOISE_CHUNK = 1 << 18  # coordinates per round of random words (bounds the float64 scratch)
_TWO_POW_M53 = 2.0**-53


def _random_words(count: int, bits: np.random.PCG64 | None) -> np.ndarray:
    """``count`` uniform 64-bit words: ``os.urandom`` or (tests only) a seeded generator."""
    if count == 0:
        return np.zeros(0, dtype=np.uint64)
    if bits is None:
        return np.frombuffer(os.urandom(8 * count), dtype=np.uint64)
    return np.asarray(bits.random_raw(count), dtype=np.uint64)


def _uniform53(words: np.ndarray) -> np.ndarray:
    """Exact float64 ``k * 2^-53`` for ``k`` = the top 53 bits of each word: ``[0, 1)``."""
    return (words >> np.uint64(11)).astype(np.float64) * _TWO_POW_M53


def _standard_normals(count: int, bits: np.random.PCG64 | None) -> np.ndarray:
    """``count`` N(0, 1) samples, Box-Muller in float64 (both outputs of every pair)."""
    pairs = (count + 1) // 2
    w = _random_words(2 * pairs, bits)
    u1 = _uniform53(w[:pairs]) + _TWO_POW_M53  # (0, 1]: log never sees 0
    theta = (2.0 * math.pi) * _uniform53(w[pairs:])
    r = np.sqrt(-2.0 * np.log(u1))
    out = np.empty(2 * pairs, dtype=np.float64)
    out[0::2] = r * np.cos(theta)
    out[1::2] = r * np.sin(theta)
    return out[:count]


def gaussian_noise(numel: int, std: float, bits: np.random.PCG64 | None = None) -> torch.Tensor:
    """``numel`` samples of N(0, std^2) (float64), from the OS's CSPRNG unless ``bits`` is
    given; each the sum of 4 N(0, std^2) samples divided by 2 (Opacus's ``secure_mode``)."""
    out = np.empty(numel, dtype=np.float64)
    for a in range(0, numel, _NOISE_CHUNK):
        m = min(_NOISE_CHUNK, numel - a)
        z = _standard_normals(4 * m, bits).reshape(4, m).sum(axis=0)
        out[a : a + m] = z * (0.5 * std)
    return torch.from_numpy(out)


def poisson_sample(
    num_samples: int, sample_rate: float, bits: np.random.PCG64 | None = None
) -> torch.Tensor:
    """Ascending indices in ``[0, num_samples)``, each taken independently with probability
    ``sample_rate`` (Opacus's ``UniformWithReplacementSampler``), from the OS's CSPRNG unless
    ``bits`` is given."""
    if not 0.0 <= sample_rate <= 1.0:
        raise ValueError(f"sample_rate must be in [0, 1], got {sample_rate}")
    u = _uniform53(_random_words(num_samples, bits))
    return torch.from_numpy(np.flatnonzero(u < sample_rate).astype(np.int64))


def insecure_bits(seed: int, purpose: str, node: int, step: int) -> np.random.PCG64:
    log.warning(
        "differential privacy: INSECURE seeded %s (DPConfig.insecure_seed=%d) on node %d, step "
        "%d: anyone who knows the seed can remove the noise; for tests only",
        purpose, seed, node, step,
    )  # fmt: skip
    key = hashlib.sha256(f"disco-dp-insecure/{seed}/{purpose}/{node}/{step}".encode()).digest()
    return np.random.PCG64(int.from_bytes(key[:16], "little"))


__all__ = ["gaussian_noise", "insecure_bits", "poisson_sample"]

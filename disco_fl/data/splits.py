"""Seeded index splits: stratified train/test splits and household (client) partitions."""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import numpy as np

__all__ = ["largest_remainder", "split_households", "stratified_split"]

_MODES = ("iid", "dirichlet")


def largest_remainder(
    quotas: np.ndarray,
    total: int,
    rng: np.random.Generator | None = None,
    capacity: np.ndarray | None = None,
) -> np.ndarray:
    """Round non-negative ``quotas`` to integers summing exactly to ``total``.

    Every entry gets ``floor(quota)``; the remaining units go to the entries with the largest
    fractional parts (ties broken by ``rng`` if given, else by position), never exceeding
    ``capacity`` when given.

    Parameters
    ----------
    quotas : np.ndarray
        Non-negative real quotas, 1-D.
    total : int
        Required sum; ``sum(floor(quotas)) <= total``.
    rng : np.random.Generator or None, default None
        Breaks ties between equal fractional parts.
    capacity : np.ndarray or None, default None
        Upper bounds per entry.

    Returns
    -------
    np.ndarray
        int64 counts, same length as ``quotas``.
    """
    quotas = np.asarray(quotas, dtype=np.float64)
    counts: np.ndarray = np.floor(quotas).astype(np.int64)
    if capacity is not None:
        counts = np.minimum(counts, np.asarray(capacity, dtype=np.int64))
    remainder = int(total - counts.sum())
    if remainder < 0:
        raise ValueError(f"quotas exceed the total {total}")
    if remainder == 0:
        return counts
    frac = quotas - counts
    tiebreak = rng.permutation(len(quotas)) if rng is not None else np.arange(len(quotas))
    order = np.lexsort((tiebreak, -frac))
    room = capacity - counts if capacity is not None else np.full(len(quotas), remainder)
    # Hand out one unit per pass in largest-remainder order until the total is reached.
    while remainder > 0:
        progressed = False
        for i in order:
            if remainder == 0:
                break
            if room[i] > 0:
                counts[i] += 1
                room[i] -= 1
                remainder -= 1
                progressed = True
        if not progressed:
            raise ValueError(f"capacity is too small to reach the total {total}")
    return counts


def _as_labels(labels: np.ndarray | Sequence[int]) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {arr.dtype}")
    return arr


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _sizes_to_counts(sizes: Sequence[int] | Sequence[float], n: int) -> np.ndarray:
    values = list(sizes)
    if not values:
        raise ValueError("sizes must not be empty")
    if all(_is_int(v) for v in values):
        counts = np.array([int(v) for v in values], dtype=np.int64)
        if (counts < 0).any():
            raise ValueError(f"sizes must be non-negative, got {values}")
        if counts.sum() > n:
            raise ValueError(f"sizes sum to {int(counts.sum())} but there are only {n} examples")
        return counts
    if all(isinstance(v, numbers.Real) and not _is_int(v) for v in values):
        fractions = np.array([float(v) for v in values], dtype=np.float64)
        if not np.isfinite(fractions).all() or (fractions < 0).any() or (fractions > 1).any():
            raise ValueError(f"fractional sizes must lie in [0, 1], got {values}")
        total_fraction = float(fractions.sum())
        if total_fraction > 1 + 1e-9:
            raise ValueError(f"fractional sizes sum to {total_fraction} > 1")
        total = n if total_fraction > 1 - 1e-9 else int(np.floor(total_fraction * n + 1e-9))
        return largest_remainder(fractions * n, total)
    raise ValueError(f"sizes must be all ints (counts) or all floats (fractions), got {values!r}")


def stratified_split(
    labels: np.ndarray | Sequence[int],
    sizes: Sequence[int] | Sequence[float],
    seed: int = 0,
) -> list[np.ndarray]:
    """Split indices into disjoint parts with (almost) the class proportions of ``labels``.

    Parameters
    ----------
    labels : array-like of int
        Class label of every example, shape [N].
    sizes : sequence of int or sequence of float
        Part sizes, either counts (ints summing to at most N) or fractions (floats in [0, 1]
        summing to at most 1; turned into counts by largest-remainder rounding, so fractions
        summing to 1 cover all N examples). Indices left over are in no part.
    seed : int, default 0
        Seed of ``np.random.default_rng``; the same seed gives the same split.

    Returns
    -------
    list of np.ndarray
        One sorted int64 index array per part, with exactly the requested sizes. Within each
        part the count of class c is ``size * n_c / n_remaining`` rounded by largest remainder
        (parts are allocated in order, each from what earlier parts left), so e.g.
        ``stratified_split(mnist_5k_labels, [4000, 1000])`` gives 400 and 100 per class.
    """
    y = _as_labels(labels)
    n = len(y)
    counts = _sizes_to_counts(sizes, n)
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    pools = [rng.permutation(np.flatnonzero(y == c)) for c in classes]
    remaining = np.array([len(p) for p in pools], dtype=np.int64)
    taken = np.zeros(len(classes), dtype=np.int64)
    parts: list[np.ndarray] = []
    for size in counts:
        pool_total = int(remaining.sum())
        if size == 0 or pool_total == 0:
            parts.append(np.empty(0, dtype=np.int64))
            continue
        alloc = largest_remainder(
            remaining * int(size) / pool_total, int(size), rng=rng, capacity=remaining
        )
        chunks = [pools[c][taken[c] : taken[c] + alloc[c]] for c in range(len(classes))]
        taken += alloc
        remaining -= alloc
        parts.append(np.sort(np.concatenate(chunks)).astype(np.int64))
    return parts


def split_households(
    labels: np.ndarray | Sequence[int],
    num_households: int,
    mode: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
    min_size: int = 1,
    max_tries: int = 1000,
) -> list[np.ndarray]:
    """Partition all indices among ``num_households`` households (federated clients).

    Parameters
    ----------
    labels : array-like of int
        Class label of every example, shape [N].
    num_households : int
        Number of parts, ``1 <= num_households``.
    mode : str, default "iid"
        "iid": stratified split into parts of sizes differing by at most one (each with the
        global class mix). "dirichlet": for each class, proportions drawn from
        Dirichlet(alpha, ..., alpha) across households decide how that class' examples are
        divided (label skew; smaller alpha is more skewed).
    alpha : float, default 0.5
        Dirichlet concentration (> 0); only used by "dirichlet".
    seed : int, default 0
        Seed of ``np.random.default_rng``.
    min_size : int, default 1
        Every household gets at least this many examples. "dirichlet" redraws all
        proportions until this holds.
    max_tries : int, default 1000
        Maximum number of Dirichlet draws before giving up with a ``ValueError``.

    Returns
    -------
    list of np.ndarray
        ``num_households`` sorted int64 index arrays, disjoint, together covering 0..N-1.
    """
    y = _as_labels(labels)
    n = len(y)
    if not _is_int(num_households) or num_households < 1:
        raise ValueError(f"num_households must be a positive int, got {num_households!r}")
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    if not _is_int(min_size) or min_size < 0:
        raise ValueError(f"min_size must be a non-negative int, got {min_size!r}")
    if num_households * min_size > n:
        raise ValueError(
            f"cannot give {num_households} households at least {min_size} examples each "
            f"from {n} examples"
        )
    if mode == "iid":
        base, extra = divmod(n, num_households)
        sizes = [base + (1 if i < extra else 0) for i in range(num_households)]
        return stratified_split(y, sizes, seed=seed)

    if not isinstance(alpha, numbers.Real) or not np.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha must be a positive finite number, got {alpha!r}")
    if not _is_int(max_tries) or max_tries < 1:
        raise ValueError(f"max_tries must be a positive int, got {max_tries!r}")
    rng = np.random.default_rng(seed)
    class_indices = [np.flatnonzero(y == c) for c in np.unique(y)]
    smallest = 0
    for _ in range(max_tries):
        buckets: list[list[np.ndarray]] = [[] for _ in range(num_households)]
        for idx in class_indices:
            shuffled = rng.permutation(idx)
            proportions = rng.dirichlet(np.full(num_households, float(alpha)))
            cuts = (np.cumsum(proportions)[:-1] * len(idx)).astype(np.int64)
            for h, chunk in enumerate(np.split(shuffled, cuts)):
                buckets[h].append(chunk)
        parts = [
            np.sort(np.concatenate(b)).astype(np.int64) if b else np.empty(0, dtype=np.int64)
            for b in buckets
        ]
        smallest = min(len(p) for p in parts)
        if smallest >= min_size:
            return parts
    raise ValueError(
        f"no Dirichlet(alpha={alpha}) split of {n} examples into {num_households} households "
        f"gave every household at least {min_size} examples in {max_tries} tries (smallest "
        f"had {smallest}); raise alpha, lower min_size or num_households, or raise max_tries"
    )

"""Exact and near-duplicate detection, and the n-gram hashes used for decontamination.

Near duplicates use MinHash LSH over token n-grams. Signatures are one-permutation MinHash with
rotation densification (Shrivastava, ICML 2017): one hash per shingle instead of one per
permutation, so a worker signs a document in a few vectorised numpy passes. Only the LSH band
keys (``bands`` uint64 per document) travel to the driver, which groups equal keys band by band
and joins the groups into clusters (connected components), without per-pair Python work.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

import numpy as np

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_ROLL = np.uint64(0x100000001B3)
_EMPTY = np.uint64(np.iinfo(np.uint64).max)
NUM_PERM = 128
SHINGLE = 5


def exact_key(text: str) -> int:
    """64-bit key of the text with case and whitespace differences removed."""
    # str.split() splits on exactly the characters of ``\s`` (str.isspace) and drops the ends:
    # the same text as ``re.sub(r"\s+", " ", ...).strip()``, several times faster.
    normalized = " ".join(text.lower().split())
    return int.from_bytes(hashlib.blake2b(normalized.encode(), digest_size=8).digest(), "little")


def mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finalizer: spreads any uint64 array over all 64 bits."""
    x = x.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(30)
        x *= _M1
        x ^= x >> np.uint64(27)
        x *= _M2
        x ^= x >> np.uint64(31)
    return x


def ngram_hashes(ids: np.ndarray, n: int) -> np.ndarray:
    """One mixed uint64 hash per run of ``n`` consecutive token ids (one for shorter input)."""
    values = ids.astype(np.uint64)
    if len(values) == 0:
        return np.zeros(0, dtype=np.uint64)
    if len(values) <= n:
        n = len(values)
    width = len(values) - n + 1
    h = np.zeros(width, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(n):
            h = h * _ROLL + values[j : j + width] + np.uint64(1)
    return mix64(h)


def minhash(ids: np.ndarray, num_perm: int = NUM_PERM, shingle: int = SHINGLE) -> np.ndarray:
    """One-permutation MinHash signature (``num_perm`` uint64, a power of two) of token shingles."""
    hashes = ngram_hashes(ids, shingle)
    signature = np.full(num_perm, _EMPTY, dtype=np.uint64)
    if len(hashes) == 0:
        return signature
    bits = num_perm.bit_length() - 1
    bins = (hashes >> np.uint64(64 - bits)).astype(np.intp)
    values = hashes & np.uint64((1 << (64 - bits)) - 1)
    np.minimum.at(signature, bins, values)
    empty = signature == _EMPTY
    if empty.any():
        # Rotation densification: an empty bin borrows the next non-empty bin's value (circular),
        # offset by the distance so borrowed values stay distinct.
        filled = np.flatnonzero(~empty)
        targets = np.flatnonzero(empty)
        nxt = np.searchsorted(filled, targets) % len(filled)
        distance = (filled[nxt] - targets) % num_perm
        with np.errstate(over="ignore"):
            signature[targets] = signature[filled[nxt]] + distance.astype(np.uint64) * _GOLDEN
    return signature


@lru_cache
def lsh_params(threshold: float, num_perm: int = NUM_PERM) -> tuple[int, int]:
    """Bands and rows per band minimising weighted false positives and false negatives around
    ``threshold`` (datasketch MinHashLSH's criterion). Misses weigh more: candidates are
    verified on their signatures, so a false positive only costs a comparison."""
    grid = np.linspace(0.0, 1.0, 201)
    best = (1, num_perm)
    best_error = float("inf")
    for rows in range(1, num_perm + 1):
        bands = num_perm // rows
        candidate = 1 - (1 - grid**rows) ** bands
        below, above = grid <= threshold, grid >= threshold
        error = float(
            0.2 * np.trapezoid(candidate[below], grid[below])
            + 0.8 * np.trapezoid(1 - candidate[above], grid[above])
        )
        if error < best_error:
            best, best_error = (bands, rows), error
    return best


def near_duplicate_clusters(
    signatures: np.ndarray, threshold: float, num_perm: int = NUM_PERM
) -> np.ndarray:
    """Cluster label per document (the smallest index in its cluster) from ``[n, num_perm]``
    MinHash signatures.

    Documents sharing an LSH band key are candidates; a candidate pair is joined only when its
    estimated Jaccard similarity (the share of equal signature slots) reaches ``threshold``, so
    LSH's false positives cannot chain unrelated documents into one cluster. Joins are
    transitive (connected components by minimum-label propagation).
    """
    n = len(signatures)
    labels = np.arange(n, dtype=np.int64)
    if n < 2:
        return labels
    bands, rows = lsh_params(threshold, num_perm)
    keys = band_keys_many(signatures, bands, rows)
    firsts, others = [], []
    for band in range(bands):
        order = np.argsort(keys[:, band], kind="stable")
        sorted_keys = keys[order, band]
        same = np.r_[False, sorted_keys[1:] == sorted_keys[:-1]]
        group_first = order[np.maximum.accumulate(np.where(~same, np.arange(n), 0))]
        firsts.append(group_first[same])
        others.append(order[same])
    a, b = np.concatenate(firsts), np.concatenate(others)
    if len(a):
        pairs = np.unique(np.stack([np.minimum(a, b), np.maximum(a, b)], axis=1), axis=0)
        a, b = pairs[:, 0], pairs[:, 1]
        similar = np.empty(len(a), dtype=bool)
        for lo in range(0, len(a), 65536):  # bounded memory for many candidate pairs
            hi = lo + 65536
            similar[lo:hi] = (signatures[a[lo:hi]] == signatures[b[lo:hi]]).mean(
                axis=1
            ) >= threshold
        a, b = a[similar], b[similar]
    while len(a):
        low = np.minimum(labels[a], labels[b])
        before = labels.copy()
        np.minimum.at(labels, a, low)
        np.minimum.at(labels, b, low)
        labels = labels[labels]  # pointer jumping
        if (labels == before).all():
            break
    return labels


def band_keys_many(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """``band_keys`` for every row of ``[n, num_perm]`` signatures: ``[n, bands]``."""
    n = len(signatures)
    block = signatures[:, : bands * rows].astype(np.uint64).reshape(n, bands, rows)
    with np.errstate(over="ignore"):
        weights = mix64(np.arange(1, rows + 1, dtype=np.uint64))
        combined = (mix64(block) * weights).sum(axis=2, dtype=np.uint64)
    return mix64(combined + np.arange(bands, dtype=np.uint64) * _GOLDEN)

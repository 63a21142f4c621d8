"""Exact and near-duplicate detection, and the n-gram hashes used for decontamination.

Near duplicates use MinHash LSH over token n-grams. Signatures are one-permutation MinHash with
rotation densification (Shrivastava, ICML 2017): one hash per shingle instead of one per
permutation, so a worker signs a document in a few vectorised numpy passes. The dedup runs
as shuffles on the cluster (``engine.duplicate_edges``): each record's exact-key and LSH band
buckets are gathered by partition (``bucket_rows``) and turned into pairs with each bucket's
first record (``bucket_pairs``); the LSH pairs' signatures alone are then gathered
(``pair_sides``) to confirm them (``similar_pairs``); the confirmed pairs are joined into
clusters (``components``), all without per-pair Python work.
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
    MinHash signatures, in one process: the distributed dedup's steps (``bucket_rows``,
    ``bucket_pairs``, ``pair_sides``, ``similar_pairs``, ``components``) on one partition.

    Documents sharing an LSH band key are candidates; a candidate pair is joined only when its
    estimated Jaccard similarity (the share of equal signature slots) reaches ``threshold``, so
    LSH's false positives cannot chain unrelated documents into one cluster. Joins are
    transitive (connected components).
    """
    n = len(signatures)
    doc = np.arange(n, dtype=np.int64)
    rows = bucket_rows(
        doc, np.zeros(n, np.int8), doc.astype(np.uint64), signatures, {0: threshold}, 1
    )
    pairs = bucket_pairs(rows)
    needed = np.stack([pairs["a"], pairs["b"]])
    sides = pair_sides(doc, signatures, needed, 1)
    similar = similar_pairs(sides, np.full(needed.shape[1], threshold))["pair"]
    nodes, labels = components(needed[0, similar], needed[1, similar])
    out = doc.copy()
    out[nodes] = labels
    return out


def band_keys_many(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """``band_keys`` for every row of ``[n, num_perm]`` signatures: ``[n, bands]``."""
    n = len(signatures)
    block = signatures[:, : bands * rows].astype(np.uint64).reshape(n, bands, rows)
    with np.errstate(over="ignore"):
        weights = mix64(np.arange(1, rows + 1, dtype=np.uint64))
        combined = (mix64(block) * weights).sum(axis=2, dtype=np.uint64)
    return mix64(combined + np.arange(bands, dtype=np.uint64) * _GOLDEN)


EXACT_BAND = -1
"""The band of an exact-duplicate bucket row: its key is the record's ``exact_key``."""


def bucket_rows(
    doc: np.ndarray,
    group: np.ndarray,
    exact: np.ndarray,
    signatures: np.ndarray,
    thresholds: dict[int, float | None],
    partitions: int,
) -> dict[str, np.ndarray]:
    """The rows one worker sends to the bucket shuffle for its records: one exact-key row per
    record, plus one row per LSH band for groups with a near-duplicate threshold; 23 bytes
    each, no signature. ``part`` (a hash of group, band and key) decides which shuffle
    partition gathers the bucket, so every record sharing a bucket meets in one
    ``bucket_pairs`` call.

    Args:
        doc: global record ids (unit index << 32 | record); group: dedup group per record
            (documents, chats); exact: ``exact_key`` per record; signatures: ``[n, NUM_PERM]``.
        thresholds: near-duplicate threshold per group (None: exact duplicates only).
        partitions: shuffle partitions.
    """
    docs, groups, keys = [doc], [group], [exact]
    bands = [np.full(len(doc), EXACT_BAND)]
    for g, threshold in thresholds.items():
        chosen = group == g
        if threshold is None or not chosen.any():
            continue
        band_count, rows = lsh_params(threshold, signatures.shape[1])
        band_keys = band_keys_many(signatures[chosen], band_count, rows)
        for band in range(band_count):
            docs.append(doc[chosen])
            groups.append(group[chosen])
            bands.append(np.full(int(chosen.sum()), band))
            keys.append(band_keys[:, band])
    out: dict[str, np.ndarray] = {
        "doc": np.concatenate(docs).astype(np.int64),
        "group": np.concatenate(groups).astype(np.int8),
        "band": np.concatenate(bands).astype(np.int16),
        "key": np.concatenate(keys).astype(np.uint64),
    }
    salt = out["group"].astype(np.uint64) * _M1 + (out["band"] + 1).astype(np.uint64) * _GOLDEN
    with np.errstate(over="ignore"):
        out["part"] = (mix64(out["key"] ^ salt) % np.uint64(partitions)).astype(np.int32)
    return out


def bucket_pairs(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Candidate pairs of one shuffle partition (whole buckets): each record of a bucket is
    paired with the bucket's first record (smallest id). An exact bucket's pairs are
    duplicates; an LSH bucket's are candidates for ``similar_pairs`` to confirm.

    Returns:
        ``a`` (the earlier record), ``b`` (the later one), ``group`` and ``exact`` per pair.
    """
    order = np.lexsort((rows["doc"], rows["key"], rows["band"], rows["group"]))
    doc, key = rows["doc"][order], rows["key"][order]
    band, group = rows["band"][order], rows["group"][order]
    n = len(doc)
    same = np.zeros(n, dtype=bool)
    if n > 1:
        same[1:] = (key[1:] == key[:-1]) & (band[1:] == band[:-1]) & (group[1:] == group[:-1])
    first = np.maximum.accumulate(np.where(~same, np.arange(n), 0))
    others = np.flatnonzero(same)
    return {
        "a": doc[first[others]],
        "b": doc[others],
        "group": group[others],
        "exact": band[others] == EXACT_BAND,
    }


def pair_sides(
    doc: np.ndarray, signatures: np.ndarray, needed: np.ndarray, partitions: int
) -> dict[str, np.ndarray]:
    """The signatures of a batch's records that some candidate pair names, one row per pair
    side, for the shuffle that brings each pair's two signatures together.

    Args:
        doc, signatures: a batch of records.
        needed: ``[2, m]`` record ids of the candidate pairs (row 0: ``a``, row 1: ``b``).
    """
    flat = needed.reshape(-1)
    order = np.argsort(flat, kind="stable")
    sorted_ids = flat[order]
    lo = np.searchsorted(sorted_ids, doc, "left")
    counts = np.searchsorted(sorted_ids, doc, "right") - lo
    rows = np.repeat(np.arange(len(doc)), counts)
    starts = np.repeat(lo, counts)
    offsets = np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)
    entries = order[starts + offsets]
    m = needed.shape[1]
    pair = (entries % m).astype(np.int64)
    return {
        "pair": pair,
        "side": (entries // m).astype(np.int8),
        "sig": signatures[rows],
        "part": (pair % partitions).astype(np.int32),
    }


def similar_pairs(rows: dict[str, np.ndarray], thresholds: np.ndarray) -> dict[str, np.ndarray]:
    """The candidate pairs (of one shuffle partition, both sides of each) whose estimated
    Jaccard similarity, the share of equal signature slots, reaches the pair's threshold: LSH
    false positives never chain unrelated records into one cluster."""
    order = np.lexsort((rows["side"], rows["pair"]))
    pair, side, sig = rows["pair"][order], rows["side"][order], rows["sig"][order]
    # Each pair has exactly its two sides here: a (0) then b (1).
    at = np.flatnonzero((side[:-1] == 0) & (side[1:] == 1) & (pair[:-1] == pair[1:]))
    keep = np.zeros(len(at), dtype=bool)
    for lo in range(0, len(at), 65536):  # bounded memory for many candidate pairs
        chunk = at[lo : lo + 65536]
        similarity = (sig[chunk] == sig[chunk + 1]).mean(axis=1)
        keep[lo : lo + 65536] = similarity >= thresholds[pair[chunk]]
    return {"pair": pair[at[keep]]}


def components(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Connected components of the duplicate edges, on the records they name only (a compact
    union-find: memory follows the duplicates, not the corpus).

    Returns:
        The records in some edge (sorted) and each one's cluster label (the smallest record
        id in its cluster).
    """
    nodes = np.unique(np.concatenate([a, b])) if len(a) else np.zeros(0, np.int64)
    labels = np.arange(len(nodes), dtype=np.int64)
    ia, ib = np.searchsorted(nodes, a), np.searchsorted(nodes, b)
    while len(ia):
        low = np.minimum(labels[ia], labels[ib])
        before = labels.copy()
        np.minimum.at(labels, ia, low)
        np.minimum.at(labels, ib, low)
        labels = labels[labels]  # pointer jumping
        if (labels == before).all():
            break
    return nodes, nodes[labels]

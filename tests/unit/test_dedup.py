"""Near-duplicate detection: edited copies cluster, unrelated and templated texts do not."""

from __future__ import annotations

import numpy as np

from pipeline.data import dedup


def _sig(ids: np.ndarray) -> np.ndarray:
    return dedup.minhash(ids).astype(np.uint32)


def test_signature_agreement_estimates_jaccard() -> None:
    rng = np.random.default_rng(0)
    a = rng.integers(0, 5000, 2000)
    b = a.copy()
    b[1000:] = rng.integers(5000, 9000, 1000)  # second half replaced
    sa, sb = _sig(a), _sig(b)
    sh_a, sh_b = set(dedup.ngram_hashes(a, 5).tolist()), set(dedup.ngram_hashes(b, 5).tolist())
    jaccard = len(sh_a & sh_b) / len(sh_a | sh_b)
    assert abs(float((sa == sb).mean()) - jaccard) < 0.1


def test_edited_copies_cluster_and_distinct_documents_stay_apart() -> None:
    rng = np.random.default_rng(1)
    originals = [rng.integers(0, 30000, 800) for _ in range(30)]
    copies = []
    for doc in originals:
        edited = doc.copy()
        edited[rng.choice(len(doc), 3, replace=False)] = 1  # three single-token edits
        copies.append(edited)
    signatures = np.stack([_sig(d) for d in originals + copies])
    labels = dedup.near_duplicate_clusters(signatures, 0.8)
    assert labels.tolist() == list(range(30)) * 2


def test_no_transitive_chaining_through_lsh_false_positives() -> None:
    # A corpus of moderately similar texts (shared template, Jaccard ~0.5) stays apart at 0.8.
    rng = np.random.default_rng(2)
    template = rng.integers(0, 30000, 200)
    docs = []
    for _ in range(300):
        doc = template.copy()
        doc[rng.choice(200, 40, replace=False)] = rng.integers(30000, 60000, 40)
        docs.append(doc)
    signatures = np.stack([_sig(d) for d in docs])
    assert len(np.unique(dedup.near_duplicate_clusters(signatures, 0.8))) == 300


def test_exact_key_ignores_case_and_whitespace() -> None:
    assert dedup.exact_key("Hello   World\n") == dedup.exact_key("hello world")
    assert dedup.exact_key("hello world") != dedup.exact_key("hello, world")


def test_lsh_params_fill_the_signature() -> None:
    bands, rows = dedup.lsh_params(0.8)
    assert bands * rows <= dedup.NUM_PERM
    assert (1 - (1 - 0.9**rows) ** bands) > 0.95  # a 0.9-similar pair is almost surely found


def _split(rows: dict[str, np.ndarray], parts: int) -> list[dict[str, np.ndarray]]:
    """A shuffle's partitions, by the rows' ``part`` column."""
    return [{k: v[rows["part"] == p] for k, v in rows.items()} for p in range(parts)]


def test_the_shuffle_steps_give_the_same_pairs_on_any_number_of_partitions() -> None:
    """What the cluster computes with ``parts`` partitions is what one process computes: the
    same exact pairs and the same confirmed near pairs, whatever the partitioning."""
    rng = np.random.default_rng(3)
    originals = [rng.integers(0, 30000, 400) for _ in range(40)]
    edited = []
    for doc in originals[:20]:
        copy = doc.copy()
        copy[rng.choice(len(doc), 4, replace=False)] = 7
        edited.append(copy)
    docs = originals + edited + originals[:5]  # five exact repeats at the end
    signatures = np.stack([_sig(d) for d in docs])
    ids = np.arange(len(docs), dtype=np.int64)
    exact = np.array([dedup.exact_key(" ".join(map(str, d))) for d in docs], dtype=np.uint64)
    group = np.zeros(len(docs), np.int8)
    results = []
    for parts in (1, 3, 7):
        rows = dedup.bucket_rows(ids, group, exact, signatures, {0: 0.8}, parts)
        pairs = [dedup.bucket_pairs(p) for p in _split(rows, parts)]
        a = np.concatenate([p["a"] for p in pairs])
        b = np.concatenate([p["b"] for p in pairs])
        is_exact = np.concatenate([p["exact"] for p in pairs])
        near = np.unique(np.stack([a[~is_exact], b[~is_exact]]), axis=1)
        sides = dedup.pair_sides(ids, signatures, near, parts)
        confirmed = np.concatenate([
            dedup.similar_pairs(p, np.full(near.shape[1], 0.8))["pair"] for p in _split(sides, parts)
        ])  # fmt: skip
        exact_pairs = sorted(zip(a[is_exact].tolist(), b[is_exact].tolist(), strict=True))
        near_pairs = sorted(map(tuple, near[:, confirmed].T.tolist()))
        results.append((exact_pairs, near_pairs))
    assert results[0][0] == [(i, 60 + i) for i in range(5)]
    assert set(results[0][1]) >= {(i, 40 + i) for i in range(20)}
    assert results[1] == results[0] and results[2] == results[0]
    # The components of those pairs: the originals are every cluster's representative.
    nodes, labels = dedup.components(
        np.array([p[0] for p in results[0][0] + results[0][1]]),
        np.array([p[1] for p in results[0][0] + results[0][1]]),
    )
    assert dict(zip(nodes.tolist(), labels.tolist(), strict=True))[45] == 5

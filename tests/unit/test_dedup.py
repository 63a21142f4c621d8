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

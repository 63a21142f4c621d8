"""The data watch announces every new file at least once: a listing becomes the last one seen
only after the Asset event announcing it is committed."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.data_watch import check_for_new_data, commit_listing


def test_a_crash_between_the_event_and_the_listing_announces_the_files_again(
    tmp_path: Path,
) -> None:
    data, root = tmp_path / "data", str(tmp_path / "artifacts")
    data.mkdir()
    (data / "old.jsonl").write_text('{"text": "old"}\n')
    uri = data.as_uri()
    change, first = check_for_new_data(root, uri)
    assert first and change.files == 1  # the baseline, stored at once

    (data / "fresh.jsonl").write_text('{"text": "fresh"}\n')
    change, first = check_for_new_data(root, uri)
    assert not first and change.added == [str(data / "fresh.jsonl")]
    # The watch task crashed here, before its event was committed: nothing was recorded.
    again, _ = check_for_new_data(root, uri)
    assert again.added == [str(data / "fresh.jsonl")] and again.digest == change.digest

    commit_listing(root, uri, again.digest)  # the event is committed: record the listing
    after, _ = check_for_new_data(root, uri)
    assert not after.fresh and after.files == 2
    with pytest.raises(FileNotFoundError, match=f"pending-{again.digest}"):
        commit_listing(root, uri, again.digest)


def test_removed_files_alone_update_the_listing_without_an_event(tmp_path: Path) -> None:
    data, root = tmp_path / "data", str(tmp_path / "artifacts")
    data.mkdir()
    for name in ("a.jsonl", "b.jsonl"):
        (data / name).write_text("{}\n")
    check_for_new_data(root, data.as_uri())
    (data / "b.jsonl").unlink()
    change, _ = check_for_new_data(root, data.as_uri())
    assert (change.fresh, change.removed) == (False, [str(data / "b.jsonl")])
    (data / "b.jsonl").write_text("{}\n")  # back: new again against the updated listing
    change, _ = check_for_new_data(root, data.as_uri())
    assert change.added == [str(data / "b.jsonl")]

"""CheckpointManager policy in milliseconds: interval, completeness, newest-complete lookup, pruning."""

import pytest

from gdt_tune.checkpointing import (
    COMPLETE_MARKER,
    METADATA,
    CheckpointManager,
    latest_complete,
    list_checkpoints,
    should_save,
    to_prune,
)


def make(root, step, complete=True, metadata=True):
    d = root / f"step_{step}"
    d.mkdir()
    if metadata:
        (d / METADATA).write_bytes(b"x")
    if complete:
        (d / COMPLETE_MARKER).write_text("")
    return d


def test_interval():
    assert [s for s in range(1, 11) if should_save(s, 3)] == [3, 6, 9]
    assert not any(should_save(s, None) for s in range(1, 5))


def test_latest_complete_skips_incomplete_newer_ones(tmp_path):
    assert latest_complete(tmp_path) == (None, [])
    make(tmp_path, 5)
    make(tmp_path, 10)
    make(tmp_path, 15, complete=False)  # killed before the marker
    make(tmp_path, 20, metadata=False, complete=False)  # killed mid-write
    (tmp_path / "epoch_0").mkdir()
    (tmp_path / "step_x").mkdir()
    path, skipped = latest_complete(tmp_path)
    assert path == tmp_path / "step_10"
    assert skipped == [tmp_path / "step_20", tmp_path / "step_15"]
    assert [s for s, _, _ in list_checkpoints(tmp_path)] == [5, 10, 15, 20]


def test_marker_without_metadata_is_incomplete(tmp_path):
    make(tmp_path, 3, metadata=False, complete=True)
    assert latest_complete(tmp_path) == (None, [tmp_path / "step_3"])


def test_prune_keeps_k_newest_complete_and_never_the_newest(tmp_path):
    for s in (2, 4, 6, 8):
        make(tmp_path, s)
    make(tmp_path, 3, complete=False)  # stale crash leftover, older than the newest complete
    make(tmp_path, 10, complete=False)  # in flight: newer than every complete one
    assert to_prune(tmp_path, 2) == [tmp_path / "step_2", tmp_path / "step_4", tmp_path / "step_3"]
    assert to_prune(tmp_path, 1) == [tmp_path / "step_2", tmp_path / "step_4", tmp_path / "step_6", tmp_path / "step_3"]
    assert tmp_path / "step_8" not in to_prune(tmp_path, 1)
    empty = tmp_path / "empty"
    empty.mkdir()
    make(empty, 7, complete=False)
    assert to_prune(empty, 2) == []  # nothing complete yet: never delete


def test_keep_one_with_async_is_refused():
    with pytest.raises(ValueError, match="'keep_last_n_checkpoints' must be >= 2 with async_checkpointing=true"):
        CheckpointManager("/tmp/x", model=None, optimizer=None, lr_scheduler=None, progress=None, rank=0,
                          keep_last_n_checkpoints=1, async_checkpointing=True)

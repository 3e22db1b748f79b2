"""Checkpoint policy in milliseconds: interval, completeness, damaged checkpoints, resume choice, pruning."""

import logging
import shutil
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp

from gdt_tune.training.checkpointing import saved_model_shapes
from gdt_tune.training.model_shapes import refuse_other_model
from gdt_tune.training.resume import find_resume
from gdt_tune.training.step_dirs import (
    MARKER,
    METADATA,
    checkpoint_problem,
    list_checkpoints,
    should_save,
    to_prune,
)


def check_model_shapes(path, model_state):
    refuse_other_model(f"checkpoint {path}", saved_model_shapes(path), model_state, "fix")

warnings.filterwarnings("ignore", message=".*process group.*")


def make(root, step, complete=True, metadata=True):
    d = root / f"step_{step}"
    d.mkdir()
    if metadata:
        (d / METADATA).write_bytes(b"x")
    if complete:
        (d / MARKER).write_text("")
    return d


def test_interval():
    assert [s for s in range(1, 11) if should_save(s, 3)] == [3, 6, 9]
    assert not any(should_save(s, None) for s in range(1, 5))


def test_list_checkpoints_ignores_other_folders(tmp_path):
    for s in (10, 5):
        make(tmp_path, s)
    (tmp_path / "epoch_0").mkdir()
    (tmp_path / "step_x").mkdir()
    assert [(s, c) for s, _, c in list_checkpoints(tmp_path)] == [(5, True), (10, True)]
    make(tmp_path, 3, metadata=False, complete=True)
    assert list_checkpoints(tmp_path)[0] == (3, tmp_path / "step_3", False)


def real(root, step, world=1, shape=(4, 3)):
    """A small real DCP checkpoint laid out as the manager writes it."""
    path = root / f"step_{step}"
    state = {"train_state": {"model": {"w": torch.full(shape, float(step)), "b": torch.zeros(3)}}}
    dcp.save(state, checkpoint_id=str(path))
    for r in range(world):
        torch.save({"rng": None, "world_size": world}, path / f"rank_{r}.pt")
    (path / MARKER).write_text("")
    return path


def shard_of(path):
    return next(p for p in path.iterdir() if p.suffix == ".distcp")


@pytest.mark.parametrize("damage, problem", [
    (lambda p: (p / MARKER).unlink(), "no COMPLETE marker"),
    (lambda p: (p / METADATA).unlink(), "no .metadata file"),
    (lambda p: (p / METADATA).write_bytes(b"garbage"), "unreadable .metadata"),
    (lambda p: shard_of(p).write_bytes(shard_of(p).read_bytes()[:-9]), "is truncated"),
    (lambda p: shard_of(p).unlink(), "is missing"),
    (lambda p: (p / "rank_0.pt").unlink(), "rank_0.pt is missing"),
    (lambda p: (p / "rank_0.pt").write_bytes(b"\x80garbage"), "unreadable rank_0.pt"),
    # a 2-rank checkpoint: every rank's file is read (rank 1 would fail to unpickle it on resume)
    (lambda p: (p / "rank_1.pt").write_bytes(b"\x80garbage"), "unreadable rank_1.pt"),
    (lambda p: (p / "rank_1.pt").write_bytes((p / "rank_1.pt").read_bytes()[:40]), "unreadable rank_1.pt"),
    (lambda p: (p / "rank_1.pt").unlink(), "rank_1.pt is missing"),
])
def test_damaged_newest_is_skipped_with_a_warning(tmp_path, caplog, damage, problem):
    real(tmp_path, 2, world=2)
    damage(real(tmp_path, 4, world=2))
    assert checkpoint_problem(tmp_path / "step_2") is None
    assert problem in checkpoint_problem(tmp_path / "step_4")
    with caplog.at_level(logging.WARNING, logger="gdt_tune"):
        assert find_resume(tmp_path, True, rank=0) == tmp_path / "step_2"
    warning = next(r.message for r in caplog.records if r.name == "gdt_tune")
    assert warning.startswith("checkpoint: skipping step_4 (") and problem in warning
    # named explicitly, or with nothing older to fall back on: a clear error
    with pytest.raises(ValueError, match=rf"step_4 is not usable \(.*{problem}"):
        find_resume(tmp_path, str(tmp_path / "step_4"), rank=0)
    shutil.rmtree(tmp_path / "step_2")
    with pytest.raises(ValueError, match="no usable step_N checkpoint in .*resume_from_checkpoint=false"):
        find_resume(tmp_path, True, rank=0)


def test_resume_off_run_record_and_model_shape(tmp_path):
    from gdt_tune.training.checkpointing import read_run

    assert find_resume(tmp_path, False, rank=0) is None
    path = real(tmp_path, 2, world=2)
    assert find_resume(tmp_path, True, rank=0) == path
    with pytest.raises(ValueError, match=r"holds no run record \(data position, resume contract\); it was not written "
                                         "by this gdt_tune"):
        read_run(path)  # written without a run record
    check_model_shapes(path, {"w": torch.zeros(4, 3), "b": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"holds another model \(w: saved \(4, 3\), this config \(8, 3\)\)"):
        check_model_shapes(path, {"w": torch.zeros(8, 3), "b": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"another model \(extra: saved None"):
        check_model_shapes(path, {"w": torch.zeros(4, 3), "b": torch.zeros(3), "extra": torch.zeros(1)})


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


def test_folder_remover_hides_at_once_and_deletes_off_thread(tmp_path, monkeypatch):
    """Pruning returns before the folder is deleted (the delete runs on a background thread), the
    folder stops being a checkpoint at once, and close() waits until it is gone."""
    import threading

    from gdt_tune.training.checkpointing import FolderRemover

    for step in (2, 4):
        (tmp_path / f"step_{step}").mkdir()
        (tmp_path / f"step_{step}" / MARKER).write_text("")
        (tmp_path / f"step_{step}" / "__0_0.distcp").write_bytes(b"x" * 1000)
    (tmp_path / ".deleting-step_0-1").mkdir()  # left by a crash
    release, removing = threading.Event(), []
    real_rmtree = shutil.rmtree

    def slow_rmtree(path, **kwargs):
        removing.append((path, threading.current_thread().name))
        release.wait(10)
        real_rmtree(path, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", slow_rmtree)
    remover = FolderRemover()
    remover.sweep(tmp_path)
    remover.remove(tmp_path / "step_2")  # returns while the delete is blocked
    assert [p.name for _, p, _ in list_checkpoints(tmp_path)] == ["step_4"]
    hidden = [p for p in tmp_path.iterdir() if p.name.startswith(".deleting-step_2-")]
    assert len(hidden) == 1 and not (hidden[0] / MARKER).exists()
    release.set()
    remover.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_4"]
    assert {name for _, name in removing} == {"gdt-checkpoint-remover"}

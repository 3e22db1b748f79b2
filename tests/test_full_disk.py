"""A full disk in every save and log path: one line naming the disk, the folder and the free space
(docs/reliability.md, "Full disks"). The writes really fail: the file they write is a link to
``/dev/full``, which refuses every write with ENOSPC, as a full disk does. Only where torch's own
writer hides the errno (``unexpected pos``) is the free space of the disk faked."""

from __future__ import annotations

import errno
import gc
import os
import re
import sys

import pytest
import torch
from recipe_utils import train_in_process

from gdt_tune.cli import launcher
from gdt_tune.runtime import disk
from gdt_tune.runtime.errors import OneLineError
from gdt_tune.training import checkpointing
from gdt_tune.training.save_failures import SaveFailed

NO_VAL = ("dataset_val=null", "run_val_every_n_steps=null")
FULL = r"the disk is full: \S+ \(mounted at /[^)]*\) holding {folder} has [\d.]+ [KMGT]?B free"


def _full(folder) -> str:
    return FULL.format(folder=re.escape(str(folder)))


def test_the_disk_is_named_from_the_error_or_from_its_free_space(tmp_path, monkeypatch):
    with pytest.raises(OSError) as written:
        with open("/dev/full", "w") as f:
            f.write("x")
    with pytest.raises(RuntimeError, match="unexpected pos") as torch_saved:
        torch.save({"a": torch.zeros(1000)}, "/dev/full")  # torch's writer: no errno, no "space"
    assert written.value.errno == errno.ENOSPC and disk.says_full(written.value)
    assert not disk.says_full(torch_saved.value)
    folder = tmp_path / "run" / "step_4"  # not created yet: its nearest folder is asked
    assert re.fullmatch(_full(folder), disk.disk_full(written.value, folder))
    assert disk.disk_full(torch_saved.value, folder, needed=10**6) is None  # this disk has room
    monkeypatch.setattr(disk, "free_bytes", lambda path: 4096)
    line = disk.disk_full(torch_saved.value, folder, needed=2_800_000, what="a checkpoint of this run")
    assert re.fullmatch(_full(folder) + "; a checkpoint of this run needs about 2.8 MB", line)
    assert "4.1 KB free" in line
    assert disk.mount_of("/proc/self") == ("proc", "/proc") and disk.human(0) == "0 B"


def _symlink_to_dev_full(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to("/dev/full")


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_a_full_disk_during_an_interim_save_names_it_and_keeps_the_earlier_checkpoint(demo_dir, tmp_path, monkeypatch,
                                                                                      async_save):
    """DCP's shard of step_2 cannot be written; step_1 stays the checkpoint to resume from."""
    real = checkpointing.dcp.async_save if async_save else checkpointing.dcp.save

    def onto_a_full_disk(state, checkpoint_id, **kwargs):
        if checkpoint_id.endswith("step_2"):
            _symlink_to_dev_full(tmp_path / "step_2" / "__0_0.distcp")
        return real(state, checkpoint_id=checkpoint_id, **kwargs)

    monkeypatch.setattr(checkpointing.dcp, "async_save" if async_save else "save", onto_a_full_disk)
    with pytest.raises(SaveFailed) as e:
        train_in_process(demo_dir, tmp_path, "max_steps_per_epoch=4", "save_every_n_steps=1", *NO_VAL,
                         f"async_checkpointing={async_save}", "keep_last_n_checkpoints=2")
    needed = r"a checkpoint of this run needs about [\d.]+ [KM]B"
    assert re.fullmatch(f"checkpoint: saving {re.escape(str(tmp_path / 'step_2'))} failed: {_full(tmp_path / 'step_2')}; "
                        f"{needed}; earlier checkpoints are intact; free that much there \\(or set output_dir to another "
                        "disk\\), then resume with resume_from_checkpoint=true", str(e.value))
    assert (tmp_path / "step_1" / "COMPLETE").is_file() and not (tmp_path / "step_2" / "COMPLETE").exists()


def test_a_full_disk_during_the_final_save_names_it_and_the_step_to_resume_from(demo_dir, tmp_path, monkeypatch):
    from torchtune.training import FullModelHFCheckpointer

    real = FullModelHFCheckpointer.save_checkpoint

    def onto_a_full_disk(self, *args, **kwargs):
        _symlink_to_dev_full(tmp_path / "epoch_0" / "model.safetensors.index.json")  # written with open()
        return real(self, *args, **kwargs)

    monkeypatch.setattr(FullModelHFCheckpointer, "save_checkpoint", onto_a_full_disk)
    with pytest.raises(SaveFailed) as e:
        train_in_process(demo_dir, tmp_path, "max_steps_per_epoch=2", "save_every_n_steps=2", *NO_VAL)
    folder = tmp_path / "epoch_0"
    assert re.fullmatch(f"final checkpoint: saving {re.escape(str(folder))} failed: {_full(folder)}; the final "
                        r"checkpoint needs about [\d.]+ [KM]B; free that much there \(or set checkpointer.output_dir "
                        "to another disk\\), then resume with resume_from_checkpoint=true "
                        f"\\(from {re.escape(str(tmp_path / 'step_2'))}, intact\\)", str(e.value))
    assert not (folder / "COMPLETE").exists()


def test_a_full_disk_under_the_metric_log_is_one_line_and_no_traceback_at_exit(demo_dir, tmp_path, capfd):
    logs = tmp_path / "logs"
    _symlink_to_dev_full(logs / "metrics.txt")
    with pytest.raises(OneLineError) as e:
        train_in_process(demo_dir, tmp_path, "max_steps_per_epoch=2", "save_every_n_steps=null", *NO_VAL,
                         "metric_logger.filename=metrics.txt")
    assert re.fullmatch(f"metric_logger: writing the metric log in {re.escape(str(logs))} failed: {_full(logs)}; free "
                        r"space there \(or set metric_logger.log_dir to another disk\), then resume with "
                        r"resume_from_checkpoint=true \(or train again\)", str(e.value))
    del e
    gc.collect()  # the logger's __del__ closes its file again: quietly
    assert "Exception ignored" not in capfd.readouterr().err


def test_a_full_log_folder_is_named_before_torchrun_starts_and_after_a_silent_failure(tmp_path, monkeypatch, capsys):
    """``gdt-tune train``'s own log (torchrun's output) on a full disk: refused before anything starts;
    a run that failed without an error line while the disk filled up says so beside its exit code."""
    monkeypatch.setenv("GDT_TUNE_LOG_DIR", str(tmp_path / "logs"))
    started = tmp_path / "started"
    cmd = [sys.executable, "-c", f"open({str(started)!r}, 'w'); raise SystemExit(1)"]
    monkeypatch.setattr(disk, "free_bytes", lambda path: 0)
    assert launcher.run_training(cmd, dict(os.environ)) == 1
    assert not started.exists()
    logs = tmp_path / "logs"
    assert re.fullmatch(f"error: the log folder: {_full(logs)}; the ranks' output needs about 16.0 MB; free space "
                        "there or set GDT_TUNE_LOG_DIR to a folder on another disk \\(nothing was started\\)\n",
                        capsys.readouterr().err)
    free = iter([10**9, 0])  # room at the start, none at the end
    monkeypatch.setattr(disk, "free_bytes", lambda path: next(free))
    assert launcher.run_training(cmd, dict(os.environ)) == 1
    assert started.exists()
    err = capsys.readouterr().err.splitlines()
    assert re.fullmatch(r"error: training failed \(exit code 1\); its log is cut short or empty: the log folder: "
                        f"{_full(logs)}; the ranks' output needs about 16.0 MB; free space there or set "
                        "GDT_TUNE_LOG_DIR to a folder on another disk", err[0])
    assert err[1].startswith(f"full log: {logs}/train-")


def test_a_file_written_whole_names_a_full_disk(tmp_path):
    """run.json, summary.md, metrics.json, the plots, the caches: runtime.files.atomic_output."""
    from gdt_tune.runtime.files import write_atomically

    (tmp_path / f".summary.md.tmp{os.getpid()}").symlink_to("/dev/full")  # its temporary file
    with pytest.raises(OneLineError) as e:
        write_atomically(tmp_path / "summary.md", "# Evaluation\n")
    assert re.fullmatch(f"writing {re.escape(str(tmp_path / 'summary.md'))} failed: {_full(tmp_path)}; free space "
                        "there or write it elsewhere", str(e.value))
    assert list(tmp_path.iterdir()) == []  # nothing half-written left

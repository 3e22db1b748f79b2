"""One run per output_dir: the run identity, refusing a fresh start over another run (or moving
it aside), resume and pruning within the run, and the output_dir lock. In process, a world of one."""

import json
import os
import shutil
import socket

import pytest
from recipe_utils import load_config, setup_in_process

from gdt_tune.training.resume import find_resume
from gdt_tune.training.run_dir import OutputDirLock
from gdt_tune.training.step_dirs import MARKER, read_marker, to_prune

SHORT = ("max_steps_per_epoch=4", "save_every_n_steps=2", "keep_last_n_checkpoints=2", "dataset_val=null",
         "run_val_every_n_steps=null")


def _train(demo_dir, out, *overrides):
    return setup_in_process(load_config(f"demo_dir={demo_dir}", f"output_dir={out}", *SHORT, *overrides), train=True)


def test_a_fresh_start_over_another_run_is_refused_or_moves_it_aside(demo_dir, tmp_path):
    out = tmp_path / "run"
    _train(demo_dir, out)
    first = json.loads((out / "run.json").read_text())
    assert set(first) == {"run_id", "config_hash", "started"}
    assert sorted(p.name for p in out.glob("step_*")) == ["step_2", "step_4"]
    assert read_marker(out / "step_4").run_id == first["run_id"]
    before = sorted(p.name for p in out.iterdir())

    with pytest.raises(ValueError) as e:
        _train(demo_dir, out)
    assert str(e.value) == (
        f"config key 'output_dir': {out} holds another run (run {first['run_id']} started {first['started']}: "
        "epoch_0, step_2, step_4); resume it with resume_from_checkpoint=true, choose a new output_dir, or set "
        "overwrite_output_dir=true to move it aside")
    assert sorted(p.name for p in out.iterdir()) == before  # nothing touched

    (out / "data").mkdir()  # the user's own files in output_dir: not the run's, so they stay
    (out / "data" / "train.jsonl").write_text("{}\n")
    (out / "notes.txt").write_text("mine")
    _train(demo_dir, out, "overwrite_output_dir=true")
    assert (out / "data" / "train.jsonl").is_file() and (out / "notes.txt").read_text() == "mine"
    second = json.loads((out / "run.json").read_text())
    aside = out / f"previous-{first['run_id']}"
    moved = [p for p in out.glob("previous-*")]
    assert len(moved) == 1 and moved[0].name.startswith(aside.name)
    # every file the old run wrote moved, never deleted (its torchtune_config.yaml too: not overwritten)
    assert {"step_2", "step_4", "epoch_0", "run.json", "torchtune_config.yaml", "logs"} <= {p.name for p in moved[0].iterdir()}
    assert (out / "torchtune_config.yaml").is_file() and read_marker(out / "epoch_0").step == 4
    assert second["run_id"] != first["run_id"]
    assert read_marker(out / "step_4").run_id == second["run_id"]


def test_resume_and_pruning_only_consider_this_run(demo_dir, tmp_path):
    out = tmp_path / "run"
    _train(demo_dir, out)
    run_id = json.loads((out / "run.json").read_text())["run_id"]
    # a complete checkpoint of another run, newer than ours (e.g. copied in by mistake)
    stranger = out / "step_9"
    stranger.mkdir()
    for name in (MARKER, ".metadata", "rank_0.pt"):
        (stranger / name).write_text("other-run" if name == MARKER else "x")
    assert find_resume(out, True, rank=0, run_id=run_id) == out / "step_4"
    assert stranger not in to_prune(out, 1, run_id)
    shutil.rmtree(out / "epoch_0")  # as if stopped before its final save (a finished run stays finished)
    recipe = setup_in_process(load_config(f"demo_dir={demo_dir}", f"output_dir={out}", *SHORT,
                                          "max_steps_per_epoch=6", "resume_from_checkpoint=true"), train=True)
    assert recipe._progress.global_step == 6
    assert json.loads((out / "run.json").read_text())["run_id"] == run_id  # the same run, continued
    assert stranger.is_dir() and read_marker(out / "step_6").run_id == run_id


def test_a_second_run_on_a_locked_output_dir_is_refused_naming_the_holder(demo_dir, tmp_path):
    out = tmp_path / "run"
    holder = OutputDirLock(out)
    holder.acquire()  # e.g. the old job's ranks, still training
    try:
        with pytest.raises(ValueError) as e:
            _train(demo_dir, out)
    finally:
        holder.release()
    message = str(e.value)
    assert message.startswith(f"config key 'output_dir': {out} is in use by another run (pid {os.getpid()} on host "
                              f"{socket.gethostname()} since ")
    assert message.endswith("; wait for it or stop it, or choose another output_dir")
    assert not (out / "run.json").exists()


def test_a_lock_left_by_a_dead_process_is_taken_over(demo_dir, tmp_path, caplog):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text(json.dumps({"pid": 999999, "host": "gone-node", "since": "2026-01-01T00:00:00+00:00"}))
    _train(demo_dir, out)
    assert "took over the lock of a run that ended without releasing it (pid 999999 on host gone-node" in caplog.text
    assert (out / ".lock").read_text() == ""  # released at the end

"""A stop signal (SIGTERM, Ctrl-C, SIGHUP) in the long phases between steps, and a requeue of a
finished run. In process, a world of one: the signal is sent by this process to itself at an exact
point (the second batch of a validation, the second forward of its event scoring, the final
validation), as Slurm's SIGTERM would land. (Signals between steps, through `gdt-tune train` and
torchrun: tests/test_launcher.py.)"""

import json
import logging
import os
import shutil
import signal

import pytest
import torch
from recipe_utils import final_weights, logged, train_in_process

import gdt_tune.clinical.event_scoring as event_scoring
import gdt_tune.training.validator as validator_module
from gdt_tune.training.step_dirs import read_marker

pytestmark = pytest.mark.xdist_group("signals")  # one worker trains the uninterrupted run

# validation at step 4 (due) and after step 6 (the final one); no interval saves: a signal save only
RUN = ("max_steps_per_epoch=6", "run_val_every_n_steps=4", "save_every_n_steps=null", "batch_size_val=1",
       "val_metrics_samples=8")


@pytest.fixture(scope="module")
def uninterrupted(demo_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    train_in_process(demo_dir, out, *RUN)
    return out


class SignalAt:
    """Sends SIGTERM to this process at the ``nth`` call of ``module.name`` inside the validation
    of ``step``; counts the calls made there after it."""

    def __init__(self, monkeypatch, module, name: str, step: int, nth: int = 2):
        self.calls, self.after_signal, self.armed = 0, 0, False
        original, validate = getattr(module, name), validator_module.Validator.validate

        def counted(*args, **kwargs):
            if self.armed:
                self.calls += 1
                self.after_signal += self.calls > nth
                if self.calls == nth:
                    os.kill(os.getpid(), signal.SIGTERM)
            return original(*args, **kwargs)

        def validation(validator, model, at_step):
            self.armed = at_step == step
            try:
                return validate(validator, model, at_step)
            finally:
                self.armed = False

        monkeypatch.setattr(module, name, counted)
        monkeypatch.setattr(validator_module.Validator, "validate", validation)


@pytest.mark.parametrize("where, module, name, step", [
    ("validation loss", validator_module, "label_kinds", 4),      # once per validation sample (batch_size_val=1)
    ("event scoring", event_scoring, "score_packs", 4),            # once per scoring forward
    ("final validation", validator_module, "label_kinds", 6),     # after the last step, before epoch_0
])
def test_a_signal_during_validation_saves_the_step_and_the_resume_validates_it_first(
        demo_dir, tmp_path, monkeypatch, caplog, uninterrupted, where, module, name, step):
    out = tmp_path / "run"
    hook = SignalAt(monkeypatch, module, name, step)
    with caplog.at_level(logging.INFO, logger="gdt_tune"):
        train_in_process(demo_dir, out, *RUN)
    assert hook.calls == 2 and hook.after_signal == 0  # stopped before the next batch or forward
    assert sorted(p.name for p in out.glob("step_*")) == [f"step_{step}"] and not (out / "epoch_0").exists()
    record = torch.load(out / f"step_{step}" / "rank_0.pt", weights_only=False)["run"]
    assert record["validation_pending"] is True
    assert f"validation of step {step} stopped by SIGTERM; the resumed run validates step {step} first" in caplog.text
    assert f"SIGTERM received; saved step {step}, exiting" in caplog.text
    expected_val = logged(uninterrupted, "val_loss")
    assert sorted(logged(out, "val_loss")) == [s for s in (4,) if s < step]  # the cut validation logged nothing

    monkeypatch.undo()
    train_in_process(demo_dir, out, *RUN, "resume_from_checkpoint=true")
    assert logged(out, "val_loss") == expected_val  # the cut one ran first, then the rest
    assert logged(out) == logged(uninterrupted)  # and the training losses are the uninterrupted ones
    ours, theirs = final_weights(out, 0), final_weights(uninterrupted, 0)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def _files(folder):
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def test_a_requeue_of_a_finished_run_loads_and_writes_nothing(demo_dir, tmp_path, uninterrupted, caplog):
    """Also with more steps asked for: a finished run stays finished (its epoch_0 is never rewritten in
    place; to train further, start a new run from it). (A run stopped before its final save resumes:
    tests/test_run_dir.py.)"""
    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    marker = read_marker(out / "epoch_0")
    assert marker.step == 6 and marker.run_id == json.loads((out / "run.json").read_text())["run_id"]
    before = _files(out)
    with caplog.at_level(logging.INFO, logger="gdt_tune"):
        recipe = train_in_process(demo_dir, out, *RUN, "resume_from_checkpoint=true")
    assert recipe.already_trained and recipe._model is None  # no weights loaded
    assert f"has finished: {out}/epoch_0 is complete after step 6; nothing to do" in caplog.text
    assert _files(out) == before  # nothing written, not even logs
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="gdt_tune"):
        recipe = train_in_process(demo_dir, out, *RUN, "max_steps_per_epoch=10", "resume_from_checkpoint=true")
    assert recipe.already_trained and "nothing to do (to train further, start a new run from it" in caplog.text
    assert _files(out) == before

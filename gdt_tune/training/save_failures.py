"""The one line of a save that failed: an interim ``step_N`` (any rank, any cause: torch's
``CheckpointException`` carries every rank's traceback) or the final ``epoch_N``. A full disk is
named with its free space and what the save needed, where torch says only "unexpected pos"::

    except (Exception, CheckpointException) as e:
        raise save_failed(path, e, state_bytes(model, optimizer)) from None
"""

from __future__ import annotations

from pathlib import Path

from gdt_tune.runtime.disk import disk_full
from gdt_tune.runtime.errors import OneLineError, first_line, rank_failures
from gdt_tune.training.step_dirs import list_checkpoints


class SaveFailed(OneLineError):
    """A checkpoint could not be written; its message is the one line to show."""


def save_failed(path: Path, error: BaseException, needed: int | None = None) -> SaveFailed:
    """One line for a failed ``step_N`` (``needed``: the checkpoint's bytes): a full disk, a collective
    that timed out, or the first line of the first rank's cause."""
    if (full := disk_full(error, path, needed, "a checkpoint of this run")) is not None:
        return SaveFailed(f"checkpoint: saving {path} failed: {full}; earlier checkpoints are intact; free that "
                          "much there (or set output_dir to another disk), then resume with resume_from_checkpoint=true")
    cause = next(iter(rank_failures(error)), error)
    text = first_line(cause)
    if "timed out" in text.lower() or "timeout" in text.lower():
        return SaveFailed(f"checkpoint: saving {path} timed out in a DCP collective on the checkpoint save group "
                          f"({type(cause).__name__}: {text}); another rank stopped or hung: read its log, then "
                          "resume (raise checkpoint_timeout_minutes for a slow file system)")
    return SaveFailed(f"checkpoint: saving {path} failed ({type(cause).__name__}: {text}); "
                      "earlier checkpoints are intact; free disk space or fix permissions, then resume")


def final_save_failed(folder: Path, error: BaseException, needed: int, output_dir, run_id: str) -> SaveFailed:
    """One line for a failed ``epoch_N`` (``needed``: the model's bytes); it has no marker, so it is
    not taken for a finished run. Names the newest ``step_N`` of the run to resume from, if any."""
    full = disk_full(error, folder, needed, "the final checkpoint")
    why = f": {full}" if full else f" ({type(error).__name__}: {first_line(error)})"
    fix = "free that much there (or set checkpointer.output_dir to another disk)" if full else "fix the cause"
    steps = [path for _, path, complete in list_checkpoints(output_dir, run_id) if complete]
    then = (f"then resume with resume_from_checkpoint=true (from {steps[-1]}, intact)" if steps else
            "then train again (this run saved no step_N: save_every_n_steps)")
    return SaveFailed(f"final checkpoint: saving {folder} failed{why}; {fix}, {then}")

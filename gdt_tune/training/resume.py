"""What a checkpoint promises about its run, and what may change when it is resumed.

A checkpoint records the *run*: what defines the data order (seed, shuffle, the dataset's files
and samples, length cap and selection), the optimisation (global batch, learning rate) and the
position in the data, counted in samples of the epoch's global order. On resume:

- refused, with one line naming the key, both values and the fix: ``seed``, ``shuffle``, the
  data (each file's size, sample count and content hash from the index, so a copy or a ``touch``
  resumes and a same-size edit does not; the line names each file added, removed or changed; and
  the samples after selection), ``dataset.max_seq_len``,
  ``dataset.truncation``, ``dataset.splits_per_patient_therapy``, the LR schedule when there is
  one (``lr_scheduler`` and its length in steps: ``epochs``, ``max_steps_per_epoch`` and the global
  batch may not change then), the step order (``balanced_steps``, ``balance_group``,
  ``balance_window``), how samples fill rows (``packing``, ``pack_window``), and the model shape (checked against the weights by
  ``checkpointing.check_model_shapes``);
- allowed with a one-line warning: the world size (the sharded state is resharded),
  ``gradient_accumulation_steps``, ``batch_size`` and so the global batch, ``optimizer.lr`` (applied
  from the resumed step on) and ``save_every_n_steps``.

With the same global batch (``batch_size x ranks x gradient_accumulation_steps``) the resumed run
takes the same samples in each step as the uninterrupted one; with another, it continues from the
exact sample where the checkpoint stopped.

The recipe asks one question, before the model exists, and hands the answer to the checkpoint
manager::

    plan = ResumePlan.find(output_dir, resume_from_checkpoint, rank)   # None path: a fresh start
    seed = plan.seed                                   # the saved seed, for seed: null
    plan = plan.checked(run_contract(...))             # ValueError for a refused difference
    manager.load(plan)                                 # restore; warn; apply a changed optimizer.lr
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path

from omegaconf import OmegaConf

from gdt_tune.data.layout import trained_with
from gdt_tune.runtime.files import file_stamp
from gdt_tune.training.checkpointing import read_run
from gdt_tune.training.run_dir import read_identity
from gdt_tune.training.step_dirs import checkpoint_problem, is_interim_checkpoint, list_checkpoints

log = logging.getLogger("gdt_tune")

ROWS_PLAIN = "one sample a row"
#: key -> (what to call it, the fix)
REFUSED = {
    "seed": ("config key 'seed'", "set seed={saved}"),
    "shuffle": ("config key 'shuffle'", "set shuffle={saved}"),
    "max_seq_len": ("config key 'dataset.max_seq_len'", "set dataset.max_seq_len={saved}"),
    "truncation": ("config key 'dataset.truncation'", "set dataset.truncation={saved}"),
    "splits_per_patient_therapy": ("config key 'dataset.splits_per_patient_therapy'",
                                   "set dataset.splits_per_patient_therapy={saved}"),
    "dataset": ("the training data (files, sizes, modification times)", "restore the data it was trained on"),
    "samples": ("the number of training samples after selection", "restore the data and selection it was trained on"),
    "selection": ("the training samples kept by the selection (dataset.patient_ids, "
                  "dataset.splits_per_patient_therapy, the files' meta)", "restore the data and selection it was trained on"),
    "balanced_order": ("the step order (balanced_steps, balance_group, balance_window)",
                       lambda saved: "set balanced_steps=false" if saved == "off" else
                       f"set balanced_steps=true {saved.replace(', ', ' ')}"),
    "rows": ("how samples fill rows (packing, pack_window, share_prefixes)",
             lambda saved: "set packing=false" if saved == ROWS_PLAIN else
             f"set packing=true pack_window={saved.split('pack_window=')[1].split(',')[0]} "
             f"share_prefixes={'share_prefixes' in saved}".replace("True", "true").replace("False", "false")),
    "lr_schedule": ("the LR schedule (lr_scheduler; its length: epochs x steps per epoch, which max_steps_per_epoch "
                    "and the global batch set)", "keep lr_scheduler, epochs, max_steps_per_epoch and the global batch "
                    "as they were"),
}
WARNED = {
    "world_size": "ranks",
    "gradient_accumulation_steps": "gradient_accumulation_steps",
    "batch_size": "batch_size",
    "lr": "optimizer.lr",
    "save_every_n_steps": "save_every_n_steps",
}


def dataset_fingerprint(dataset) -> str:
    """The files (names, sizes, modification times) and sample count behind a dataset."""
    files = getattr(dataset, "files", None) or []
    h = hashlib.sha256()
    for f in sorted(files):
        stamp = file_stamp(f)
        h.update(f"{os.path.basename(f)}|{stamp.size}|{stamp.mtime_ns}\n".encode())
    h.update(f"{type(dataset).__name__}|{len(dataset)}".encode())
    return h.hexdigest()[:16]


def data_files(dataset) -> dict[str, dict] | None:
    """A gdt_tune dataset's ``{file: {"bytes", "samples", "content"}}`` (from its index), else None."""
    return getattr(dataset, "data_files", None)


def data_changes(saved: dict[str, dict], current: dict[str, dict]) -> list[str]:
    """What changed, file by file: ``"a.jsonl: removed"``, ``"b.jsonl: added"``, ``"c.jsonl: size
    1200 -> 1300 bytes, samples 10 -> 11"``, ``"d.jsonl: content changed (same size and samples)"``."""
    out = [f"{name}: removed" for name in saved if name not in current]
    out += [f"{name}: added" for name in current if name not in saved]
    for name in (n for n in saved if n in current and saved[n] != current[n]):
        was, now = saved[name], current[name]
        parts = [f"{what} {was[key]} -> {now[key]}{unit}" for key, what, unit in
                 (("bytes", "size", " bytes"), ("samples", "samples", "")) if was[key] != now[key]]
        out.append(f"{name}: {', '.join(parts) or 'content changed (same size and samples)'}")
    return out


def compare(saved: dict, current: dict, path) -> list[str]:
    """Raise ValueError for the first refused difference; return the warnings for allowed ones."""
    if "data_files" in saved and (changes := data_changes(saved["data_files"], current.get("data_files") or {})):
        raise ValueError(f"resume: the training data changed since {path} was written ({'; '.join(changes)}); "
                         "restore the data it was trained on to resume it, or start a new run in a new output_dir")
    for key, (what, fix) in REFUSED.items():
        if key == "dataset" and "data_files" in saved:  # the file stamps of checkpoints before data_files
            continue
        if key in saved and saved[key] != current.get(key):
            raise ValueError(f"resume: {what} was {saved[key]!r} when {path} was written but is "
                             f"{current.get(key)!r} now; {fix(saved[key]) if callable(fix) else fix.format(saved=saved[key])} "
                             "to resume it, or "
                             "start a new run in a new output_dir")
    warnings = [f"resume: {name} {saved[key]} -> {current.get(key)}" for key, name in WARNED.items()
                if key in saved and saved[key] != current.get(key)]
    if saved.get("global_batch") not in (None, current.get("global_batch")):
        warnings.append(f"resume: global batch {saved['global_batch']} -> {current['global_batch']} samples per step "
                        "(batch_size x ranks x gradient_accumulation_steps): the data continues from the same "
                        "sample, but the steps are not those of the uninterrupted run")
    return warnings


def find_resume(output_dir, resume, rank: int, run_id: str | None = None) -> Path | None:
    """The checkpoint to resume from (``resume_from_checkpoint``: false, true or a step_N path), or
    None for a fresh start. With true, the newest of run ``run_id`` (``run.json``); damaged or
    unfinished checkpoints are skipped with a warning. Raises ValueError when none is usable."""
    if resume is False or resume is None:
        return None
    if resume is not True:
        path = Path(resume)
        if (path / "config.json").is_file() and not is_interim_checkpoint(path):
            raise ValueError(f"config key 'resume_from_checkpoint': {path} is a final Hugging Face checkpoint "
                             "(epoch_N), which holds no optimizer state or data position; pass a step_N folder, "
                             "or fine-tune from it in a new run with checkpointer.checkpoint_dir=" + str(path))
        problem = checkpoint_problem(path) if path.is_dir() else "not a folder"
        if problem:
            raise ValueError(f"config key 'resume_from_checkpoint': {path} is not usable ({problem}); "
                             "pass another step_N folder, or true for the newest usable one")
        return path
    skipped = []
    for _, candidate, _ in reversed(list_checkpoints(output_dir, run_id)):
        problem = checkpoint_problem(candidate)
        if problem is None:
            if skipped and rank == 0:
                log.warning("checkpoint: skipping %s", "; ".join(skipped))
            return candidate
        skipped.append(f"{candidate.name} ({problem})")
    if skipped and rank == 0:
        log.warning("checkpoint: skipping %s", "; ".join(skipped))
    raise ValueError(f"config key 'resume_from_checkpoint': no usable step_N checkpoint in {output_dir}; "
                     "set resume_from_checkpoint=false to start fresh")


@dataclass(frozen=True)
class ResumePlan:
    """How this start continues a run: the ``step_N`` to load (None: a fresh start), its run record
    and world size, and once :meth:`checked`, this run's contract and the warnings for what changed."""

    path: Path | None
    world_size: int | None = None
    record: dict | None = None
    contract: dict | None = None
    warnings: tuple[str, ...] = ()

    @classmethod
    def find(cls, output_dir, resume_from_checkpoint, rank: int) -> ResumePlan:
        """The checkpoint of ``resume_from_checkpoint`` (false, true or a step_N path; with true
        only this output_dir's run is resumed), read but not loaded."""
        run_id = (read_identity(output_dir) or {}).get("run_id")
        path = find_resume(output_dir, resume_from_checkpoint, rank, run_id)
        if path is None:
            return cls(None)
        return cls(path, *read_run(path))

    @property
    def seed(self) -> int | None:
        return self.record.get("seed") if self.record else None

    def checked(self, contract: dict) -> ResumePlan:
        """This plan with ``contract`` (:func:`run_contract`) and the warnings for allowed
        differences; ValueError for the first refused one."""
        warnings = compare(self.record, contract, self.path) if self.path is not None else []
        return replace(self, contract=contract, warnings=tuple(warnings))


def dataset_settings(dataset, block) -> dict:
    """What shaped the training samples (system prompt, cap, selection): a gdt_tune dataset's
    ``settings``, or the config block of another kind of dataset."""
    settings = getattr(dataset, "settings", None)
    return dict(settings) if isinstance(settings, dict) else dict(OmegaConf.to_container(block, resolve=True))


def lr_schedule(block, steps: int) -> str | None:
    """The LR schedule's shape (its component block and length in steps), or None for a constant
    rate (``block`` None)."""
    if block is None:
        return None
    items = OmegaConf.to_container(block, resolve=True)
    return f"{', '.join(f'{k}={v}' for k, v in sorted(items.items()))}, {steps} steps"


def run_contract(*, seed: int, shuffle: bool, dataset, settings: dict, world_size: int, accumulation: int,
                 batch_size: int, lr: float, save_every: int | None, schedule: str | None,
                 balanced_order: str = "off", rows: str = ROWS_PLAIN) -> dict:
    """What this run's data order and optimisation depend on (refused or warned by :func:`compare`)."""
    files = data_files(dataset)
    return {"seed": seed, "shuffle": shuffle, "dataset": dataset_fingerprint(dataset), "samples": len(dataset),
            **({"data_files": files, "selection": dataset.selection_digest()} if files is not None else {}),
            "max_seq_len": trained_with(settings)[1], "truncation": settings.get("truncation", "gdt"),
            "splits_per_patient_therapy": settings.get("splits_per_patient_therapy"), "world_size": world_size,
            "gradient_accumulation_steps": accumulation, "batch_size": batch_size,
            "global_batch": batch_size * world_size * accumulation, "lr": lr, "save_every_n_steps": save_every,
            "lr_schedule": schedule, "balanced_order": balanced_order, "rows": rows}

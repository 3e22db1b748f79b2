"""Interim sharded checkpoints: ``${output_dir}/step_{N}/`` every N optimizer steps, the K newest
kept, exact resume, safe on SIGTERM, Ctrl-C and SIGHUP. The recipe uses it like this::

    plan = ResumePlan.find(...).checked(contract)   # gdt_tune.training.resume: before building the model
    ckpt = CheckpointManager.from_config(cfg, model=..., optimizer=..., lr_scheduler=..., progress=..., rank=...,
                                         run_info=lambda: {...})
    ckpt.load(plan)         # restore it (a plan without a path: fresh start)
    ckpt.save(step)         # after every optimizer step: the manager owns the policy
    ckpt.close()            # at the end: wait for an async save in flight

YAML::

    save_every_n_steps: 5000        # null: no interim checkpoints
    keep_last_n_checkpoints: 4      # >= 2 with async_checkpointing
    async_checkpointing: true       # training blocks only while the state is staged
    checkpoint_timeout_minutes: 10  # a rank that waits longer for the others fails with one line
    resume_from_checkpoint: false   # true: newest usable step_N in output_dir; or a step_N path

A ``step_N`` folder is a torch.distributed.checkpoint (each rank writes its own shards) of the
model and optimizer (FSDP2 sharded state dicts, resharded by DCP when loaded on another number of
ranks), the LR scheduler and the progress counters, plus one ``rank_R.pt`` per rank with its RNG
states; rank 0's also holds the run record (data position in samples, resume contract). It is complete only once DCP's ``.metadata`` and
our ``COMPLETE`` marker exist; the marker is written by rank 0 after the save (for async: its
future) finished, and DCP writes ``.metadata`` only after every rank's shards are written.
``find_resume`` also checks every shard file against the metadata and skips damaged folders.
"""

from __future__ import annotations

import datetime as dt
import logging
import queue
import random
import re
import shutil
import signal
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.stateful import Stateful

log = logging.getLogger("gdt_tune")

COMPLETE_MARKER = "COMPLETE"
METADATA = ".metadata"
STEP_DIR = re.compile(r"^step_(\d+)$")
DELETING_PREFIX = ".deleting-"  # a pruned folder on its way out: not a checkpoint any more
#: Signals that save the current step and stop: Slurm/kill, Ctrl-C, a closed terminal (first seen wins
#: the name; Ctrl-C's exit code is 130).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# Keys of the DCP state dict.
MODEL_OPTIM_KEY, LR_KEY, PROGRESS_KEY = "train_state", "lr_scheduler", "progress"


class Progress(Stateful):
    """Where training is: steps, epoch, tokens, and the data position as samples of the epoch's
    global order consumed (``samples_in_epoch``; saved with the run record in ``rank_0.pt``, see
    :func:`read_run`, so that any world size can continue from it)."""

    def __init__(self, seed: int, world_size: int):
        self.global_step = self.epoch = self.step_in_epoch = 0
        self.tokens_seen = self.samples_in_epoch = 0
        self.seed, self.world_size = seed, world_size
        # a signal cut the validation of global_step short: the resumed run runs it first (saved,
        # like samples_in_epoch, in the run record)
        self.validation_pending = False

    def advance(self, tokens: float, samples: int) -> None:
        self.global_step += 1
        self.step_in_epoch += 1
        self.tokens_seen += int(tokens)
        self.samples_in_epoch += samples

    def next_epoch(self) -> None:
        self.epoch += 1
        self.step_in_epoch = self.samples_in_epoch = 0

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("global_step", "epoch", "step_in_epoch", "tokens_seen", "seed", "world_size")}

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)


class _ModelOptimState(Stateful):
    """FSDP2 sharded model + optimizer state, in DCP's fully-qualified-name form."""

    def __init__(self, model, optimizer):
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optimizer": optim_sd}

    def load_state_dict(self, state: dict) -> None:
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


class _Scheduler(Stateful):
    def __init__(self, scheduler):
        self.scheduler = scheduler

    def state_dict(self) -> dict:
        return self.scheduler.state_dict() if self.scheduler is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------ folder policy (pure)
def step_of(path: Path) -> int | None:
    m = STEP_DIR.match(path.name)
    return int(m.group(1)) if m else None


def is_complete(path: Path) -> bool:
    return (path / METADATA).is_file() and (path / COMPLETE_MARKER).is_file()


def run_of(path: Path) -> str | None:
    """The run id in a checkpoint's ``COMPLETE`` marker ("" for checkpoints before run ids); a
    final ``epoch_N``'s marker has the global step on its second line."""
    try:
        return (path / COMPLETE_MARKER).read_text().split("\n", 1)[0].strip()
    except OSError:
        return None


def list_checkpoints(output_dir: Path, run_id: str | None = None) -> list[tuple[int, Path, bool]]:
    """(step, folder, complete) of every ``step_N`` folder, oldest first; with ``run_id``, complete
    folders of another run are left out (never resumed or pruned)."""
    if not output_dir.is_dir():
        return []
    found = [(step_of(p), p) for p in output_dir.iterdir() if p.is_dir() and step_of(p) is not None]
    out = [(s, p, is_complete(p)) for s, p in sorted(found)]
    return [(s, p, c) for s, p, c in out if not (c and run_id and run_of(p) not in ("", run_id))]


def to_prune(output_dir: Path, keep: int, run_id: str | None = None) -> list[Path]:
    """Folders to delete: complete ones beyond the ``keep`` newest, and incomplete ones older than
    the newest complete one (left by a crash; an in-flight save is always newer)."""
    ckpts = list_checkpoints(output_dir, run_id)
    complete = [p for _, p, c in ckpts if c]
    if not complete:
        return []
    newest = step_of(complete[-1])
    stale = [p for s, p, c in ckpts if not c and s < newest]
    return complete[:-keep] + stale


def should_save(step: int, every: int | None) -> bool:
    return bool(every) and step % every == 0


def checkpoint_problem(path: Path) -> str | None:
    """What makes ``path`` unusable as a checkpoint (a crash artefact), or None: the completion
    marker, a readable DCP metadata file, every rank file, and every shard file at least as long
    as the metadata says."""
    if not (path / COMPLETE_MARKER).is_file():
        return f"no {COMPLETE_MARKER} marker (the save did not finish)"
    if not (path / METADATA).is_file():
        return f"no {METADATA} file"
    if not (path / "rank_0.pt").is_file():
        return "rank_0.pt is missing"
    try:
        metadata = dcp.FileSystemReader(str(path)).read_metadata()
    except Exception as e:  # unpickling a damaged file can raise almost anything
        return f"unreadable {METADATA} ({type(e).__name__})"
    try:
        world = torch.load(path / "rank_0.pt", weights_only=False)["world_size"]
    except Exception as e:
        return f"unreadable rank_0.pt ({type(e).__name__})"
    for r in range(1, world):
        if not (path / f"rank_{r}.pt").is_file():
            return f"rank_{r}.pt is missing"
        try:
            torch.load(path / f"rank_{r}.pt", weights_only=False)["rng"]
        except Exception as e:
            return f"unreadable rank_{r}.pt ({type(e).__name__})"
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        shard = path / name
        if not shard.is_file():
            return f"shard {name} is missing"
        if shard.stat().st_size < size:
            return f"shard {name} is truncated ({shard.stat().st_size} of {size} bytes)"
    return None


def find_resume(output_dir, resume, rank: int, run_id: str | None = None) -> Path | None:
    """The checkpoint to resume from (``resume_from_checkpoint``: false, true or a step_N path), or
    None for a fresh start. With true, the newest of run ``run_id`` (``run.json``); damaged or
    unfinished checkpoints are skipped with a warning. Raises ValueError when none is usable."""
    if resume is False or resume is None:
        return None
    if resume is not True:
        path = Path(resume)
        if (path / "config.json").is_file() and not (path / METADATA).exists():
            raise ValueError(f"config key 'resume_from_checkpoint': {path} is a final Hugging Face checkpoint "
                             "(epoch_N), which holds no optimizer state or data position; pass a step_N folder, "
                             "or fine-tune from it in a new run with checkpointer.checkpoint_dir=" + str(path))
        problem = checkpoint_problem(path) if path.is_dir() else "not a folder"
        if problem:
            raise ValueError(f"config key 'resume_from_checkpoint': {path} is not usable ({problem}); "
                             "pass another step_N folder, or true for the newest usable one")
    else:
        path, skipped = None, []
        for _, candidate, _ in reversed(list_checkpoints(Path(output_dir), run_id)):
            problem = checkpoint_problem(candidate)
            if problem is None:
                path = candidate
                break
            skipped.append(f"{candidate.name} ({problem})")
        if skipped and rank == 0:
            log.warning("checkpoint: skipping %s", "; ".join(skipped))
        if path is None:
            raise ValueError(f"config key 'resume_from_checkpoint': no usable step_N checkpoint in {output_dir}; "
                             "set resume_from_checkpoint=false to start fresh")
    return path


def read_run(path: Path) -> tuple[int, dict]:
    """(world size, run record) of a checkpoint: the record is what the recipe gave
    ``CheckpointManager(run_info=...)`` at the save (``gdt_tune.training.resume.ResumePlan``)."""
    saved = torch.load(path / "rank_0.pt", weights_only=False)
    if "run" not in saved:
        raise ValueError(f"checkpoint {path} holds no run record (data position, resume contract); it was not "
                         "written by this gdt_tune: resume it with the version that wrote it, or start fresh")
    return saved["world_size"], saved["run"]


def check_model_shapes(path: Path, model_state: dict,
                       fix: str = "resume with the model config it was written with, or use a new output_dir") -> None:
    """Refuse a checkpoint whose model tensors differ from this model's (another model config)."""
    prefix = f"{MODEL_OPTIM_KEY}.model."
    saved = {k[len(prefix):]: tuple(v.size) for k, v in dcp.FileSystemReader(str(path)).read_metadata()
             .state_dict_metadata.items() if k.startswith(prefix) and hasattr(v, "size")}
    refuse_other_model(f"checkpoint {path}", saved, model_state, fix)


def refuse_other_model(what: str, saved: dict[str, tuple], model_state: dict, fix: str) -> None:
    """ValueError naming the first tensor whose saved shape (``{name: shape}``) differs from
    ``model_state``'s: "{what} holds another model (...); {fix}"."""
    mismatch = shape_mismatch(saved, {k: tuple(v.shape) for k, v in model_state.items()})
    if mismatch:
        name, theirs, ours = mismatch
        raise ValueError(f"{what} holds another model ({name}: saved {theirs}, this config {ours}); {fix}")


def is_interim_checkpoint(path) -> bool:
    """A ``step_N`` folder (DCP), as opposed to a final Hugging Face ``epoch_N`` folder."""
    return (Path(path) / METADATA).is_file()


def load_model_weights(path: Path, model: torch.nn.Module, fix: str) -> None:
    """Load the model weights of an interim checkpoint into an unsharded ``model`` (tools such as
    ``gdt-tune evaluate``); a damaged checkpoint or another model shape is a ValueError ending in ``fix``."""
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    problem = checkpoint_problem(Path(path))
    if problem:
        raise ValueError(f"checkpoint {path} is not usable ({problem})")
    check_model_shapes(Path(path), model.state_dict(), fix)
    state = {MODEL_OPTIM_KEY: {"model": model.state_dict()}}
    with warnings.catch_warnings():  # one process (evaluate, export) reads it all: DCP warns that it assumes so
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        dcp.load(state, checkpoint_id=str(path), planner=DefaultLoadPlanner(allow_partial_load=True))
    model.load_state_dict(state[MODEL_OPTIM_KEY]["model"])


def shape_mismatch(theirs: dict, ours: dict) -> tuple[str, tuple | None, tuple | None] | None:
    """The first tensor name (sorted) whose shape differs between two ``{name: shape}`` maps, with
    both shapes (None where absent); None when they match."""
    for name in sorted(set(theirs) | set(ours)):
        if theirs.get(name) != ours.get(name):
            return name, theirs.get(name), ours.get(name)
    return None


class FolderRemover:
    """Deletes pruned checkpoint folders on a background thread, so that removing a 48 GB folder
    (slow on network file systems) never stalls training, as torchtitan's purge thread. A folder
    stops being a checkpoint at once: its marker is removed and it is renamed ``.deleting-step_N-*``;
    leftovers of a crash are removed by the next prune."""

    def __init__(self) -> None:
        self._queue: queue.Queue[Path | None] = queue.Queue()
        self._queued: set[Path] = set()
        self._thread: threading.Thread | None = None

    def remove(self, path: Path) -> None:
        (path / COMPLETE_MARKER).unlink(missing_ok=True)  # a half-deleted folder must not look complete
        hidden = path.with_name(f"{DELETING_PREFIX}{path.name}-{time.time_ns()}")
        path.rename(hidden)
        self._enqueue(hidden)

    def sweep(self, output_dir: Path) -> None:
        """Queue the ``.deleting-*`` leftovers of an earlier process."""
        for leftover in output_dir.glob(f"{DELETING_PREFIX}*"):
            if leftover not in self._queued:
                self._enqueue(leftover)

    def _enqueue(self, path: Path) -> None:
        self._queued.add(path)
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="gdt-checkpoint-remover", daemon=True)
            self._thread.start()
        self._queue.put(path)

    def _run(self) -> None:
        while (path := self._queue.get()) is not None:
            shutil.rmtree(path, ignore_errors=True)

    def close(self) -> None:
        """Wait until every queued folder is gone."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None


class SaveFailed(RuntimeError):
    """A checkpoint could not be written; its message is the one line to show."""


def _save_failed(path: Path, error: BaseException) -> SaveFailed:
    """One line for any save failure: torch's ``CheckpointException`` (a BaseException) carries
    every rank's traceback; only the first line of the first cause is kept."""
    cause = error
    failures = getattr(error, "failures", None)  # CheckpointException: {rank: exception or traceback}
    if failures:
        cause = next(iter(failures.values()))
        cause = cause[0] if isinstance(cause, tuple) else cause  # (exception, traceback summary)
    text = _first_line(cause)
    if _timed_out(cause):
        return SaveFailed(f"checkpoint: saving {path} timed out in a DCP collective on the checkpoint save group "
                          f"({type(cause).__name__}: {text}); another rank stopped or hung: read its log, then "
                          "resume (raise checkpoint_timeout_minutes for a slow file system)")
    return SaveFailed(f"checkpoint: saving {path} failed ({type(cause).__name__}: {text}); "
                      "earlier checkpoints are intact; free disk space or fix permissions, then resume")


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0][:200]


def _timed_out(error: BaseException) -> bool:
    return "timed out" in str(error).lower() or "timeout" in str(error).lower()


# ------------------------------------------------------------------ manager
class CheckpointManager:
    """Owns interim checkpoint policy, writing, pruning and resume (see module docstring)."""

    def __init__(self, output_dir, *, model, optimizer, lr_scheduler, progress: Progress, rank: int,
                 save_every_n_steps: int | None = None, keep_last_n_checkpoints: int = 2,
                 async_checkpointing: bool = False, run_info, run_id: str = "",
                 timeout: dt.timedelta = dt.timedelta(minutes=10)):
        self.output_dir = Path(output_dir)
        self.every, self.keep = save_every_n_steps, keep_last_n_checkpoints
        self.async_save = async_checkpointing
        self.rank, self.progress = rank, progress
        self._run_info = run_info  # () -> dict written to rank_0.pt at each save (see read_run)
        self.run_id = run_id  # written in each COMPLETE marker: pruning and resume skip other runs
        self._state = {MODEL_OPTIM_KEY: _ModelOptimState(model, optimizer), LR_KEY: _Scheduler(lr_scheduler),
                       PROGRESS_KEY: progress}
        # Two gloo groups of our own (docs/architecture.md, "Process groups"). Collectives on one group
        # must be issued in the same order on every rank, and an async save issues its collectives from
        # a background thread: so DCP alone uses the save group, and what the training thread issues
        # between saves (the per-step signal flags, the barrier before a save) uses the control group.
        # Sharing one group let the two threads interleave differently on two ranks: a deadlock.
        self.timeout = timeout
        self._save_pg = dist.new_group(backend="gloo", timeout=timeout)
        self._control_pg = dist.new_group(backend="gloo", timeout=timeout)
        self._in_flight: tuple[object, Path] | None = None
        self._remover = FolderRemover()
        self._last_saved = -1
        self.stop_requested = False
        self.stop_signal: str | None = None  # "SIGTERM", "SIGINT" (Ctrl-C) or "SIGHUP" once stop_requested
        self._signals = torch.zeros(len(STOP_SIGNALS), dtype=torch.int64)  # seen, in STOP_SIGNALS order
        self._old_handlers = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}

    @classmethod
    def from_config(cls, checkpoints, **kwargs) -> CheckpointManager:
        """From the typed ``gdt_tune.training.config.Checkpoints`` (checked at recipe start)."""
        return cls(checkpoints.output_dir, save_every_n_steps=checkpoints.save_every_n_steps,
                   keep_last_n_checkpoints=checkpoints.keep_last_n_checkpoints,
                   async_checkpointing=checkpoints.async_checkpointing,
                   timeout=dt.timedelta(minutes=checkpoints.checkpoint_timeout_minutes), **kwargs)

    def _on_signal(self, signum, frame) -> None:
        self._signals[STOP_SIGNALS.index(signum)] = 1

    # ---------------------------------------------------------- resume
    def load(self, plan) -> None:
        """Restore the checkpoint of ``plan`` (a ``gdt_tune.training.resume.ResumePlan``; without a
        path: fresh start). DCP reshards the model and optimizer state to this run's world size. The
        RNG states are per rank: with the same world size each rank gets its own back; with another,
        every rank is reseeded from (seed, step, rank), which changes nothing for a model without
        dropout. The plan's warnings are logged, and a changed ``optimizer.lr`` is applied."""
        path = plan.path
        if path is None:
            return
        check_model_shapes(path, self._state[MODEL_OPTIM_KEY].state_dict()["model"])
        world = dist.get_world_size()
        dcp.load(self._state, checkpoint_id=str(path), process_group=self._save_pg)
        p = self.progress
        if plan.world_size == world:
            set_rng_state(torch.load(path / f"rank_{self.rank}.pt", weights_only=False)["rng"])
        else:
            seed = (p.seed + 1_000_003 * p.global_step + self.rank) % 2**32
            random.seed(seed)
            np.random.seed(seed)
            torch.manual_seed(seed)  # also every CUDA device
        p.world_size = world
        p.samples_in_epoch = plan.record["samples_in_epoch"]
        p.validation_pending = bool(plan.record.get("validation_pending", False))
        if plan.contract is not None:
            self._apply_learning_rate(plan.record.get("lr"), plan.contract.get("lr"))
        self._last_saved = p.global_step
        if self.rank == 0:
            log.info("checkpoint: resumed from %s (step %d, epoch %d, %d samples of the epoch consumed, world size "
                     "%d -> %d%s)", path, p.global_step, p.epoch, p.samples_in_epoch, plan.world_size, world,
                     "" if plan.world_size == world else "; state resharded, RNG reseeded")
            for line in plan.warnings:
                log.warning(line)

    def _apply_learning_rate(self, saved: float | None, new: float | None) -> None:
        """The optimizer and scheduler states bring back the saved (scheduled) learning rate bit for
        bit. A changed ``optimizer.lr`` (allowed, with a warning) replaces the base rate: a constant
        rate becomes it, a scheduled one is scaled by new / saved from this step on."""
        if saved is None or new is None or float(new) == float(saved):
            return
        optimizer, scheduler = self._state[MODEL_OPTIM_KEY].optimizer, self._state[LR_KEY].scheduler
        for group in optimizer.param_groups:
            group["lr"] = float(new) if scheduler is None else group["lr"] * float(new) / float(saved)
        if scheduler is not None and hasattr(scheduler, "base_lrs"):
            scheduler.base_lrs = [float(new)] * len(scheduler.base_lrs)
            scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]

    # ---------------------------------------------------------- save
    def poll(self, during: str = "per-step") -> bool:
        """Whether any rank has seen SIGTERM, SIGINT or SIGHUP (one all-reduce on the control group;
        every rank must call it at the same points). Sets ``stop_requested`` and ``stop_signal``.
        Long phases between steps (validation, event scoring) call it per batch, so a signal stops
        them within one batch."""
        flags = self._signals.clone()
        self._control(f"the {during} signal all-reduce", dist.all_reduce, flags, op=dist.ReduceOp.MAX)
        if flags.any() and not self.stop_requested:
            self.stop_requested = True
            self.stop_signal = next(s.name for s, seen in zip(STOP_SIGNALS, flags.tolist()) if seen)
        return self.stop_requested

    def save(self, step: int) -> bool:
        """Called after every optimizer step. Saves on the interval, and on SIGTERM, SIGINT or SIGHUP (seen
        by any rank), after which ``stop_requested`` is set. Returns whether a save was started."""
        self.poll()
        self._finish_if_done()
        if not (self.stop_requested or should_save(step, self.every)):
            return False
        started = step != self._last_saved
        if started:
            self._write(step, wait=self.stop_requested)
        if self.stop_requested and self.rank == 0:
            log.warning("checkpoint: %s received; saved step %d, exiting (resume with resume_from_checkpoint=true)",
                        self.stop_signal, step)
        return started

    def _control(self, what: str, collective, *args, **kwargs) -> None:
        """A collective of the training thread, on the control group: a rank that does not join
        within ``timeout`` is one line naming the collective, not a 30-minute hang."""
        try:
            collective(*args, group=self._control_pg, **kwargs)
        except RuntimeError as e:  # gloo's timeout or a peer that died (DistBackendError)
            raise SaveFailed(f"checkpoint: {what} on the checkpoint control group failed after up to "
                             f"{self.timeout} ({type(e).__name__}: {_first_line(e)}); another rank stopped or hung: read its "
                             "log, then resume with resume_from_checkpoint=true") from None

    def _write(self, step: int, wait: bool) -> None:
        self._wait_in_flight()
        path = self.output_dir / f"step_{step}"
        if (problem := self._foreign(path)) is not None:
            raise SaveFailed(f"checkpoint: {problem}")
        try:
            if self.rank == 0 and path.exists():  # a stale incomplete folder from a crash
                shutil.rmtree(path)
            self._control("the barrier before a save", dist.barrier)
            path.mkdir(parents=True, exist_ok=True)
            record = {"rng": rng_state(), "world_size": dist.get_world_size()}
            if self.rank == 0:
                record["run"] = self._run_info()
            torch.save(record, path / f"rank_{self.rank}.pt")
            if self.async_save:
                future = dcp.async_save(self._state, checkpoint_id=str(path), process_group=self._save_pg)
                self._in_flight = (future, path)
            else:
                dcp.save(self._state, checkpoint_id=str(path), process_group=self._save_pg)
                self._complete(path)
        except SaveFailed:
            raise
        except (Exception, CheckpointException) as e:
            raise _save_failed(path, e) from None
        self._last_saved = step
        if wait:
            self._wait_in_flight()

    def _foreign(self, path: Path) -> str | None:
        """Why this run may not write ``path``: a complete checkpoint of another run, which is
        neither resumed nor deleted (docs/reliability.md)."""
        owner = run_of(path) if is_complete(path) else None
        if owner in (None, "", self.run_id):
            return None
        return (f"{path} is a complete checkpoint of another run ({owner}) and this run would save its step "
                f"there; move it out of {self.output_dir} (it is neither resumed nor deleted) or use another "
                "output_dir")

    def refuse_foreign_steps(self, first: int, last: int) -> None:
        """At start: ValueError when a step this run will save (``first``..``last``, on the
        interval) is the folder of another run's complete checkpoint."""
        for step, path, _ in list_checkpoints(self.output_dir):
            if first <= step <= last and should_save(step, self.every) and (problem := self._foreign(path)):
                raise ValueError(f"output_dir: {problem}")

    def _complete(self, path: Path) -> None:
        if self.rank == 0:
            (path / COMPLETE_MARKER).write_text(self.run_id)
            self._remover.sweep(self.output_dir)
            for old in to_prune(self.output_dir, self.keep, self.run_id):
                self._remover.remove(old)

    def _finish_if_done(self) -> None:
        if self._in_flight is not None and self._in_flight[0].done():
            self._wait_in_flight()

    def _wait_in_flight(self) -> None:
        if self._in_flight is None:
            return
        future, path = self._in_flight
        self._in_flight = None
        try:
            future.result()
        except (Exception, CheckpointException) as e:
            raise _save_failed(path, e) from None
        self._complete(path)

    def wait(self) -> None:
        """Wait for an async save in flight (before the final save: one CPU copy of the state at a time)."""
        self._wait_in_flight()

    def close(self) -> None:
        """Wait for an async save in flight and for pruning, and restore the signal handlers."""
        self._wait_in_flight()
        self._remover.close()
        for signum, handler in self._old_handlers.items():
            signal.signal(signum, handler)
        self._old_handlers = {}

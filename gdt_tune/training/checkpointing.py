"""Interim sharded checkpoints: ``${output_dir}/step_{N}/`` every N optimizer steps, the K newest kept,
exact resume. The recipe uses it like this::

    plan = ResumePlan.find(...).checked(contract)   # gdt_tune.training.resume: before building the model
    ckpt = CheckpointManager.from_config(cfg, model=..., optimizer=..., lr_scheduler=..., progress=...,
                                         signals=..., rank=..., contract=plan.contract, run_id=...)
    ckpt.load(plan)         # restore it (a plan without a path: fresh start)
    ckpt.save(step)         # after every optimizer step: the manager owns the policy
    ckpt.close()            # at the end: wait for an async save in flight

YAML::

    save_every_n_steps: 5000        # null: no interim checkpoints
    keep_last_n_checkpoints: 4      # >= 2 with async_checkpointing
    async_checkpointing: true       # training blocks only while the state is staged
    checkpoint_timeout_minutes: 10  # a rank that waits longer for the others fails with one line
    resume_from_checkpoint: false   # true: newest usable step_N in output_dir; or a step_N path

A ``step_N`` folder (names and marker: ``training.step_dirs``) is a torch.distributed.checkpoint
(each rank writes its own shards) of the model and optimizer (FSDP2 sharded state dicts, resharded by
DCP when loaded on another number of ranks), the LR scheduler and the progress counters, plus one
``rank_R.pt`` per rank with its RNG states; rank 0's also holds the *run record*: this run's resume
contract and its whole :class:`Progress` (the data position in samples among them), which
``training.resume`` reads. The marker is written by rank 0 after the save (for async: its future)
finished.
"""

from __future__ import annotations

import datetime as dt
import logging
import queue
import random
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.stateful import Stateful

from gdt_tune.training.model_shapes import refuse_other_model, state_bytes
from gdt_tune.training.save_failures import SaveFailed, save_failed
from gdt_tune.training.step_dirs import (
    DELETING_PREFIX,
    is_complete,
    list_checkpoints,
    owner,
    rank_file,
    remove_marker,
    should_save,
    step_dir,
    to_prune,
    write_marker,
)
from gdt_tune.training.stop_signals import StopSignals

log = logging.getLogger("gdt_tune")

# Keys of the DCP state dict, and of the run record in rank_0.pt.
MODEL_OPTIM_KEY, LR_KEY, PROGRESS_KEY, RUN_KEY = "train_state", "lr_scheduler", "progress", "run"


class Progress(Stateful):
    """Where training is: steps, epoch, tokens, and the data position as samples of the epoch's
    global order consumed (``samples_in_epoch``), so that any world size can continue from it."""

    def __init__(self, seed: int, world_size: int):
        self.global_step = self.epoch = self.step_in_epoch = 0
        self.tokens_seen = self.samples_in_epoch = 0
        self.sample_tokens_seen = 0  # the separate samples' tokens (more than tokens_seen with shared prefixes)
        self.seed, self.world_size = seed, world_size
        # a signal cut the validation of global_step short: the resumed run runs it first
        self.validation_pending = False

    def advance(self, tokens: float, samples: int, sample_tokens: float | None = None) -> None:
        self.global_step += 1
        self.step_in_epoch += 1
        self.tokens_seen += int(tokens)
        self.sample_tokens_seen += int(tokens if sample_tokens is None else sample_tokens)
        self.samples_in_epoch += samples

    def next_epoch(self) -> None:
        self.epoch += 1
        self.step_in_epoch = self.samples_in_epoch = 0

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("global_step", "epoch", "step_in_epoch", "tokens_seen", "seed", "world_size")}

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)

    def record(self) -> dict:
        """Every counter, for the run record (the DCP state holds the same but the data position)."""
        return {**self.state_dict(), "samples_in_epoch": self.samples_in_epoch,
                "validation_pending": self.validation_pending, "sample_tokens_seen": self.sample_tokens_seen}


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


def read_run(path: Path) -> tuple[int, dict]:
    """(world size, run record) of a checkpoint (what :class:`CheckpointManager` wrote at the save)."""
    saved = torch.load(rank_file(path, 0), weights_only=False)
    if RUN_KEY not in saved:
        raise ValueError(f"checkpoint {path} holds no run record (data position, resume contract); it was not "
                         "written by this gdt_tune: resume it with the version that wrote it, or start fresh")
    return saved["world_size"], saved[RUN_KEY]


def saved_model_shapes(path: Path) -> dict[str, tuple]:
    """``{name: shape}`` of the model tensors of a ``step_N``, from DCP's metadata (no tensor read)."""
    prefix = f"{MODEL_OPTIM_KEY}.model."
    return {k[len(prefix):]: tuple(v.size) for k, v in dcp.FileSystemReader(str(path)).read_metadata()
            .state_dict_metadata.items() if k.startswith(prefix) and hasattr(v, "size")}


def model_only_state(model_state: dict) -> dict:
    """The DCP state dict that loads only the model tensors of a ``step_N`` (``dcp.load`` with
    ``allow_partial_load``): a plain model for the tools."""
    return {MODEL_OPTIM_KEY: {"model": model_state}}


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
        remove_marker(path)  # a half-deleted folder must not look complete
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


class CheckpointManager:
    """Owns interim checkpoint policy, writing, pruning and restoring (see module docstring).
    ``signals``: asked after every step; a stop signal saves the step and stops."""

    def __init__(self, output_dir, *, model, optimizer, lr_scheduler, progress: Progress, signals: StopSignals,
                 rank: int, contract: dict | None = None, run_id: str = "", save_every_n_steps: int | None = None,
                 keep_last_n_checkpoints: int = 2, async_checkpointing: bool = False,
                 timeout: dt.timedelta = dt.timedelta(minutes=10)):
        self.output_dir = Path(output_dir)
        self.every, self.keep = save_every_n_steps, keep_last_n_checkpoints
        self.async_save = async_checkpointing
        self.rank, self.progress, self.signals = rank, progress, signals
        self.contract = contract or {}  # written with the progress counters into rank_0.pt (read_run)
        self.run_id = run_id  # written in each marker: pruning and resume skip other runs
        self._state = {MODEL_OPTIM_KEY: _ModelOptimState(model, optimizer), LR_KEY: _Scheduler(lr_scheduler),
                       PROGRESS_KEY: progress}
        # DCP alone uses this gloo group: an async save issues its collectives from a background
        # thread, so what the training thread issues between saves goes on the signals' control
        # group (docs/architecture.md, "Process groups"). Sharing one group deadlocked.
        self.timeout = timeout
        self._save_pg = dist.new_group(backend="gloo", timeout=timeout)
        self._in_flight: tuple[object, Path, int] | None = None  # (future, folder, step)
        self._remover = FolderRemover()
        self._last_saved = -1

    @classmethod
    def from_config(cls, checkpoints, **kwargs) -> CheckpointManager:
        """From the typed ``gdt_tune.training.config.Checkpoints`` (checked at recipe start)."""
        return cls(checkpoints.output_dir, save_every_n_steps=checkpoints.save_every_n_steps,
                   keep_last_n_checkpoints=checkpoints.keep_last_n_checkpoints,
                   async_checkpointing=checkpoints.async_checkpointing,
                   timeout=dt.timedelta(minutes=checkpoints.checkpoint_timeout_minutes), **kwargs)

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
        refuse_other_model(f"checkpoint {path}", saved_model_shapes(path),
                           self._state[MODEL_OPTIM_KEY].state_dict()["model"],
                           "resume with the model config it was written with, or use a new output_dir")
        world = dist.get_world_size()
        dcp.load(self._state, checkpoint_id=str(path), process_group=self._save_pg)
        p = self.progress
        if plan.world_size == world:
            set_rng_state(torch.load(rank_file(path, self.rank), weights_only=False)["rng"])
        else:
            seed = (p.seed + 1_000_003 * p.global_step + self.rank) % 2**32
            random.seed(seed)
            np.random.seed(seed)
            torch.manual_seed(seed)  # also every CUDA device
        p.world_size = world
        p.samples_in_epoch = plan.record["samples_in_epoch"]
        p.sample_tokens_seen = plan.record.get("sample_tokens_seen", p.tokens_seen)
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
    def save(self, step: int) -> bool:
        """Called after every optimizer step. Saves on the interval, and on a stop signal seen by any
        rank (then waits for the save to finish). Returns whether a save was started."""
        signals = self.signals
        signals.poll()
        self._finish_if_done()
        if not (signals.requested or should_save(step, self.every)):
            return False
        started = step != self._last_saved
        if started:
            self._write(step, wait=signals.requested)
        if signals.requested and self.rank == 0:
            log.warning("checkpoint: %s received; saved step %d, exiting (resume with resume_from_checkpoint=true)",
                        signals.name, step)
        return started

    def _write(self, step: int, wait: bool) -> None:
        self._wait_in_flight()
        path = step_dir(self.output_dir, step)
        if (problem := self._foreign(path)) is not None:
            raise SaveFailed(f"checkpoint: {problem}")
        try:
            if self.rank == 0 and path.exists():  # a stale incomplete folder from a crash
                shutil.rmtree(path)
            self.signals.barrier("the barrier before a save")
            path.mkdir(parents=True, exist_ok=True)
            saved = {"rng": rng_state(), "world_size": dist.get_world_size()}
            if self.rank == 0:
                saved[RUN_KEY] = {**self.contract, **self.progress.record()}
            torch.save(saved, rank_file(path, self.rank))
            if self.async_save:
                future = dcp.async_save(self._state, checkpoint_id=str(path), process_group=self._save_pg)
                self._in_flight = (future, path, step)
            else:
                dcp.save(self._state, checkpoint_id=str(path), process_group=self._save_pg)
                self._complete(path, step)
        except SaveFailed:
            raise
        except (Exception, CheckpointException) as e:
            raise save_failed(path, e, self._needed()) from None
        self._last_saved = step
        if wait:
            self._wait_in_flight()

    def _needed(self) -> int:
        return state_bytes(self._state[MODEL_OPTIM_KEY].model, self._state[MODEL_OPTIM_KEY].optimizer)

    def _foreign(self, path: Path) -> str | None:
        """Why this run may not write ``path``: a complete checkpoint of another run, which is
        neither resumed nor deleted (docs/reliability.md)."""
        other = owner(path) if is_complete(path) else None
        if other in (None, "", self.run_id):
            return None
        return (f"{path} is a complete checkpoint of another run ({other}) and this run would save its step "
                f"there; move it out of {self.output_dir} (it is neither resumed nor deleted) or use another "
                "output_dir")

    def refuse_foreign_steps(self, first: int, last: int) -> None:
        """At start: ValueError when a step this run will save (``first``..``last``, on the
        interval) is the folder of another run's complete checkpoint."""
        for step, path, _ in list_checkpoints(self.output_dir):
            if first <= step <= last and should_save(step, self.every) and (problem := self._foreign(path)):
                raise ValueError(f"output_dir: {problem}")

    def _complete(self, path: Path, step: int) -> None:
        if self.rank == 0:
            write_marker(path, self.run_id, step)
            self._remover.sweep(self.output_dir)
            for old in to_prune(self.output_dir, self.keep, self.run_id):
                self._remover.remove(old)

    def _finish_if_done(self) -> None:
        if self._in_flight is not None and self._in_flight[0].done():
            self._wait_in_flight()

    def _wait_in_flight(self) -> None:
        if self._in_flight is None:
            return
        future, path, step = self._in_flight
        self._in_flight = None
        try:
            future.result()
        except (Exception, CheckpointException) as e:
            raise save_failed(path, e, self._needed()) from None
        self._complete(path, step)

    def wait(self) -> None:
        """Wait for an async save in flight (before the final save: one CPU copy of the state at a time)."""
        self._wait_in_flight()

    def close(self) -> None:
        """Wait for an async save in flight and for pruning."""
        self._wait_in_flight()
        self._remover.close()

"""One run per ``output_dir``: its identity (``run.json``) and a lock held while it runs.

YAML::

    output_dir: /runs/gdt
    overwrite_output_dir: false   # true: move another run's files into output_dir/previous-<id>/

- A fresh start (``resume_from_checkpoint: false``, or a checkpoint path outside output_dir) in a
  folder that holds another run's ``run.json``, ``step_N`` or ``epoch_N`` is refused with one line:
  resume it, choose a new output_dir, or set ``overwrite_output_dir=true``, which moves the old
  files aside (never deletes them).
- ``run.json`` holds the run id, the config hash and the start time; every checkpoint's
  marker (``training.step_dirs``) holds the run id, and pruning and ``resume_from_checkpoint=true`` only
  consider checkpoints of this run.
- ``.lock`` is an advisory lock (``flock``) held by rank 0 for the whole run, with the holder's
  pid, host and start time: a second run on the same output_dir (a requeue while the old job's
  ranks still train) is refused naming the holder. The kernel drops the lock when its process
  dies, so a lock left by a dead run is taken over (and reported).
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import json
import logging
import os
import re
import socket
import uuid
from pathlib import Path

from gdt_tune.runtime.files import write_atomically
from gdt_tune.training.step_dirs import (
    DELETING_PREFIX,
    FINAL_DIR,
    STEP_DIR,
    Marker,
    final_dirs,
    list_checkpoints,
    owner,
    read_marker,
)

log = logging.getLogger("gdt_tune")
RUN_FILE = "run.json"
LOCK_FILE = ".lock"
PREVIOUS_PREFIX = "previous-"
#: What a run writes in output_dir, and what ``gdt-tune plot-run`` writes beside it (all that
#: ``overwrite_output_dir`` moves aside; data, models and anything else of the user's stay where they are).
RUN_OUTPUT = re.compile(r"^(run\.json|torchtune_config\.yaml|logs|profiling|recipe_state|wandb|val_metrics_samples\.txt|"
                        r"loss\.png|val_metrics\.png|summary\.md|" + re.escape(DELETING_PREFIX) + ".*)$")


def run_output(name: str) -> bool:
    """Whether ``name`` in output_dir is something a run (or plot-run) wrote."""
    return bool(RUN_OUTPUT.match(name) or STEP_DIR.match(name) or FINAL_DIR.match(name))


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def config_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_identity(output_dir) -> dict | None:
    path = Path(output_dir) / RUN_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        raise ValueError(f"{path} is unreadable; restore it, or move the folder's contents away to start fresh") from None


def finished_run(output_dir, final_folder) -> Marker | None:
    """The marker of ``final_folder`` (the last ``epoch_N``) when it is whole and written by
    ``output_dir``'s run (run.json's id), else None. A finished run stays finished: a requeue of it
    has nothing to do, whatever the config now says (to train further, start a new run from it)."""
    identity = read_identity(output_dir)
    run_id = identity.get("run_id") if identity else None
    marker = read_marker(final_folder)
    return marker if run_id and marker is not None and marker.run_id == run_id else None


def _previous_checkpoints(output_dir: Path) -> list[str]:
    """Another run's work in ``output_dir``: complete ``step_N`` and ``epoch_N`` folders (an
    unfinished step_N is a crash leftover, removed by the next run's pruning)."""
    steps = [p for _, p, complete in list_checkpoints(output_dir) if complete]
    return [p.name for p in final_dirs(output_dir) + steps]


class OutputDirLock:
    """An exclusive ``flock`` on ``output_dir/.lock`` (rank 0), released by :meth:`release` or
    when the process dies."""

    def __init__(self, output_dir, key: str = "config key 'output_dir'", holder: str = "run") -> None:
        self.path = Path(output_dir) / LOCK_FILE
        self.key, self.holder = key, holder  # how errors name the folder and who else may hold it
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise ValueError(f"{self.key}: cannot write in {self.path.parent} ({e.strerror}); "
                             "choose a writable folder") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read_holder(fd)
            os.close(fd)
            raise ValueError(f"{self.key}: {self.path.parent} is in use by another {self.holder} "
                             f"({holder}); wait for it or stop it, or choose another "
                             f"{self.key.split(' ')[-1].strip(chr(39))}") from None
        previous = _read_holder(fd, default="")
        if previous:
            log.warning("output_dir: took over the lock of a run that ended without releasing it (%s)", previous)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": _now()}).encode(), 0)
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)  # an empty lock file: released cleanly
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _read_holder(fd: int, default: str = "holder unknown") -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"null")
        return f"pid {info['pid']} on host {info['host']} since {info['since']}"
    except (ValueError, KeyError, TypeError, OSError):
        return default


def claim(output_dir, *, resuming: str | None, overwrite: bool, config_text: str) -> dict:
    """The run identity, after refusing a fresh start over another run (or moving it aside with
    ``overwrite``). ``resuming``: the run id of a checkpoint of ``output_dir`` being resumed
    ("" when it predates run ids), which continues that run. Call on rank 0 with the lock held."""
    output_dir = Path(output_dir)
    identity = read_identity(output_dir)
    if resuming is not None:
        if identity is None:  # a copied checkpoint, or one written before run identities: adopt it
            identity = {"run_id": resuming or uuid.uuid4().hex[:12], "config_hash": config_hash(config_text),
                        "started": _now()}
            _write(output_dir, identity)
        return identity
    previous = _previous_checkpoints(output_dir)
    if previous and not overwrite:
        what = f"run {identity['run_id']} started {identity['started']}" if identity else "checkpoints"
        raise ValueError(f"config key 'output_dir': {output_dir} holds another run ({what}: {', '.join(previous[:3])}"
                         f"{', ...' if len(previous) > 3 else ''}); resume it with resume_from_checkpoint=true, "
                         "choose a new output_dir, or set overwrite_output_dir=true to move it aside")
    if previous:
        aside = output_dir / f"{PREVIOUS_PREFIX}{identity['run_id'] if identity else 'run'}-{uuid.uuid4().hex[:6]}"
        aside.mkdir()
        for name in sorted(os.listdir(output_dir)):
            if run_output(name):
                os.rename(output_dir / name, aside / name)
        log.warning("output_dir: overwrite_output_dir=true moved the earlier run's files to %s (other files stay)",
                    aside)
    identity = {"run_id": uuid.uuid4().hex[:12], "config_hash": config_hash(config_text), "started": _now()}
    _write(output_dir, identity)
    return identity


def _write(output_dir: Path, identity: dict) -> None:
    write_atomically(output_dir / RUN_FILE, json.dumps(identity, indent=1) + "\n")


def take_output_dir(output_dir, lock: OutputDirLock | None, resume_path: Path | None, first: bool, *,
                    overwrite: bool, config_text: str) -> dict:
    """This run's identity in ``output_dir``. Rank 0 (``first``, holding ``lock``): take the lock,
    then :func:`claim` (continuing the run of a resumed checkpoint of this folder); the other ranks
    then read it. Use with ``coordination.rank_zero_first``."""
    output_dir = Path(output_dir)
    if not first:
        return read_identity(output_dir)
    lock.acquire()
    here = resume_path is not None and Path(resume_path).resolve().parent == output_dir.resolve()
    identity = claim(output_dir, resuming=(owner(resume_path) or "") if here else None, overwrite=overwrite,
                     config_text=config_text)
    log.info("run %s (config %s, started %s) in %s", identity["run_id"], identity["config_hash"], identity["started"],
             output_dir)
    return identity

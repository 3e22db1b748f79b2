"""The folders a run writes in ``output_dir`` and the marker that says one is whole, named, written
and read here only. Pure: importing it opens no process group and installs no signal handler, so
the tools (export, evaluate, plot-run) read a run with it as the recipe writes it::

    step_dir(out, 500)                  # out/step_500: an interim checkpoint (DCP + rank_R.pt)
    final_dir(out, 0)                   # out/epoch_0: the last epoch in Hugging Face format
    write_marker(folder, run_id, step)  # written last: the folder is whole
    read_marker(folder)                 # Marker(run_id, step), or None
    list_checkpoints(out, run_id)       # [(step, folder, complete)], oldest first
    to_prune(out, keep, run_id)         # what a save may delete

A ``step_N`` counts only when DCP's ``.metadata`` and the marker exist (DCP writes ``.metadata``
after every rank's shards; rank 0 writes the marker after the save finished), and
:func:`checkpoint_problem` finds nothing wrong with its files. The marker holds the run id (pruning
and resume consider only this run's folders) and the global step; markers written before run ids
are empty, before steps hold the run id alone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

MARKER = "COMPLETE"
METADATA = ".metadata"  # DCP's, written after every rank's shards
STEP_DIR = re.compile(r"^step_(\d+)$")
FINAL_DIR = re.compile(r"^epoch_(\d+)$")
DELETING_PREFIX = ".deleting-"  # a pruned folder on its way out: not a checkpoint any more


@dataclass(frozen=True)
class Marker:
    run_id: str  # "" for a checkpoint written before run ids
    step: int | None  # None for a marker written before steps


def step_dir(output_dir, step: int) -> Path:
    return Path(output_dir) / f"step_{step}"


def final_dir(output_dir, epoch: int) -> Path:
    return Path(output_dir) / f"epoch_{epoch}"


def rank_file(folder, rank: int) -> Path:
    """A rank's own file in a ``step_N``: its RNG states (rank 0's also the run record)."""
    return Path(folder) / f"rank_{rank}.pt"


def step_of(path: Path) -> int | None:
    m = STEP_DIR.match(Path(path).name)
    return int(m.group(1)) if m else None


def write_marker(folder, run_id: str, step: int) -> None:
    """The last file of a whole ``step_N`` or ``epoch_N``."""
    (Path(folder) / MARKER).write_text(f"{run_id}\n{step}\n")


def read_marker(folder) -> Marker | None:
    """The folder's marker, or None when it has none (the folder is not whole)."""
    try:
        lines = (Path(folder) / MARKER).read_text().split("\n")
    except OSError:
        return None
    step = lines[1].strip() if len(lines) > 1 else ""
    return Marker(lines[0].strip(), int(step) if step.isdigit() else None)


def owner(folder) -> str | None:
    """The run id in the folder's marker (None without one)."""
    marker = read_marker(folder)
    return marker.run_id if marker else None


def remove_marker(folder) -> None:
    """A folder being deleted must not look whole."""
    (Path(folder) / MARKER).unlink(missing_ok=True)


def is_complete(path: Path) -> bool:
    """A ``step_N`` whose save finished on every rank (its files may still be damaged:
    :func:`checkpoint_problem`)."""
    return (Path(path) / METADATA).is_file() and (Path(path) / MARKER).is_file()


def is_interim_checkpoint(path) -> bool:
    """A ``step_N`` folder (DCP), as opposed to a final Hugging Face ``epoch_N`` folder."""
    return (Path(path) / METADATA).is_file()


def list_checkpoints(output_dir, run_id: str | None = None) -> list[tuple[int, Path, bool]]:
    """(step, folder, complete) of every ``step_N`` folder, oldest first; with ``run_id``, complete
    folders of another run are left out (never resumed or pruned)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = sorted((step_of(p), p) for p in output_dir.iterdir() if p.is_dir() and step_of(p) is not None)
    out = [(s, p, is_complete(p)) for s, p in found]
    return [(s, p, c) for s, p, c in out if not (c and run_id and owner(p) not in ("", run_id))]


def final_dirs(output_dir) -> list[Path]:
    """The ``epoch_N`` folders of ``output_dir``, by epoch."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if p.is_dir() and (m := FINAL_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def to_prune(output_dir, keep: int, run_id: str | None = None) -> list[Path]:
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
    """What makes ``path`` unusable as a checkpoint (a crash artefact), or None: the marker, a
    readable DCP metadata file, every rank file, and every shard file at least as long as the
    metadata says."""
    import torch
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    if not (path / MARKER).is_file():
        return f"no {MARKER} marker (the save did not finish)"
    if not (path / METADATA).is_file():
        return f"no {METADATA} file"
    if not rank_file(path, 0).is_file():
        return "rank_0.pt is missing"
    try:
        metadata = dcp.FileSystemReader(str(path)).read_metadata()
    except Exception as e:  # unpickling a damaged file can raise almost anything
        return f"unreadable {METADATA} ({type(e).__name__})"
    try:
        world = torch.load(rank_file(path, 0), weights_only=False)["world_size"]
    except Exception as e:
        return f"unreadable rank_0.pt ({type(e).__name__})"
    for r in range(1, world):
        if not rank_file(path, r).is_file():
            return f"rank_{r}.pt is missing"
        try:
            torch.load(rank_file(path, r), weights_only=False)["rng"]
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

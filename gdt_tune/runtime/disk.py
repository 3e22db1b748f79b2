"""A write refused by a full disk, said in one line: which disk, which folder, how much is free
and how much the write needed::

    except (Exception, CheckpointException) as e:
        if (full := disk_full(e, path, needed=checkpoint_bytes)) is not None:
            raise OneLineError(f"checkpoint: saving {path} failed: {full}; ...") from None

A write is taken for a full disk when the error says so (ENOSPC or EDQUOT anywhere in its chain,
or their text) or when the disk holds less than the write needed: torch's own writer reports a
short write only as ``unexpected pos 704 vs 598``.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path

from gdt_tune.runtime.errors import rank_failures

FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
FULL_WORDS = ("no space left on device", "disk quota exceeded")


def existing_folder(path) -> Path:
    """``path`` or the nearest folder above it that exists (what ``statvfs`` can be asked about)."""
    path = Path(os.path.abspath(path))
    return next(p for p in (path, *path.parents) if p.is_dir())


def free_bytes(path) -> int:
    """Bytes this user may still write on the disk holding ``path``."""
    return shutil.disk_usage(existing_folder(path)).free


def mount_of(path) -> tuple[str, str]:
    """(the device or file system, its mount point) holding ``path``, from ``/proc/self/mountinfo``;
    (``"the disk"``, the mount point) where that file does not exist."""
    target = os.path.realpath(existing_folder(path))
    best = ("the disk", "/")
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        mount = target
        while not os.path.ismount(mount):
            mount = os.path.dirname(mount)
        return best[0], mount
    for line in lines:
        fields, _, rest = line.partition(" - ")
        mount = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields.split()[4])  # "\040": a space
        inside = target == mount or target.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best[1]) and len(rest.split()) >= 2:
            best = (rest.split()[1], mount)
    return best


def human(n: int) -> str:
    """``1.5 GB``, ``704 KB``, ``0 B`` (powers of 1000, as ``df -H`` prints them)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


def _causes(error: BaseException):
    """``error``, its causes and contexts, and the per-rank failures of torch's CheckpointException."""
    seen, todo = set(), [error]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__, *rank_failures(e)]


def says_full(error: BaseException) -> bool:
    """The error (or a cause of it) says that the disk is full or the quota spent."""
    return any(getattr(e, "errno", None) in FULL_ERRNOS or any(w in str(e).lower() for w in FULL_WORDS)
               for e in _causes(error))


def disk_full(error: BaseException | None, folder, needed: int | None = None, what: str = "it") -> str | None:
    """``the disk is full: tmpfs (mounted at /scratch) holding /scratch/run has 0 B free; a checkpoint
    needs about 2.9 MB`` when ``error`` came from a full disk (see the module docstring; None: no
    error yet, only the free space counts), else None. ``what`` names the write (``a checkpoint``)."""
    try:
        free = free_bytes(folder)
    except OSError:
        return None
    if not ((error is not None and says_full(error)) or (needed is not None and free < needed)):
        return None
    device, mount = mount_of(folder)
    need = f"; {what} needs about {human(needed)}" if needed else ""
    return f"the disk is full: {device} (mounted at {mount}) holding {folder} has {human(free)} free{need}"

"""Files written whole or not at all, and whether a file changed.

A temporary name beside the file, then a rename: a killed run, ``evaluate``, ``plot-run`` or
``data-report`` never leaves a half-written (or 0-byte) file::

    with atomic_output(out / "loss.png") as tmp:
        fig.savefig(tmp, format="png")
    write_atomically(out / "summary.md", text)

:func:`file_stamp` is the one answer to "is this the file I read before" (the index cache, the
dataset reading a sample mid-run, the resume contract of other datasets).
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

from gdt_tune.runtime.disk import disk_full
from gdt_tune.runtime.errors import OneLineError


@contextmanager
def atomic_output(path: Path):
    """A temporary path to write (a file, or a folder to fill); renamed to ``path`` when the block
    ends without an error, removed when it does not. A full disk: ``OneLineError`` naming it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # a folder left by a killed process of the same pid
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        if (full := disk_full(e, path.parent)) is None:
            raise
        raise OneLineError(f"writing {path} failed: {full}; free space there or write it elsewhere") from None
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def write_atomically(path: Path, text: str) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(text)


class FileStamp(NamedTuple):
    """What ``stat`` says of a file's version. ``size`` and ``mtime_ns`` change with its content
    (a write keeps neither by accident); ``ctime_ns`` and ``inode`` also change when the file is
    replaced or touched with a forged time (``touch -d``, ``cp -p``)."""

    size: int
    mtime_ns: int
    ctime_ns: int
    inode: int

    def same_content(self, other: FileStamp) -> bool:
        """Same size and modification time: nothing wrote to the file (a ``chmod`` or a hard link
        changes only ``ctime``)."""
        return (self.size, self.mtime_ns) == (other.size, other.mtime_ns)

    def __str__(self) -> str:
        return "|".join(map(str, self))


def file_stamp(file) -> FileStamp:
    """The :class:`FileStamp` of a path or an open file descriptor."""
    st = os.stat(file)
    return FileStamp(st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


def unwritable_folder(out: Path) -> Path | None:
    """What stops ``out`` being a folder this process can create or write in: ``out`` itself (a file,
    or a folder without write access), or the nearest existing path above it that is not a writable
    folder; None when nothing does. The recipe's ``output_dir`` and ``gdt-tune evaluate --out``."""
    if out.exists() and not out.is_dir():
        return out
    existing = next(p for p in (out, *out.parents) if p.exists())
    return None if existing.is_dir() and os.access(existing, os.W_OK | os.X_OK) else existing


def check_output_folder(out: Path, flag: str = "--out") -> None:
    """``out`` must be a folder this process can create or write (a tool checks it before any work)."""
    out = Path(out)
    if (blocker := unwritable_folder(out)) == out and not out.is_dir():
        raise ValueError(f"{flag} {out} is a file; give a folder")
    if blocker is not None:
        raise ValueError(f"{flag} {out}: cannot create or write it ({blocker} is not a writable folder); give another")

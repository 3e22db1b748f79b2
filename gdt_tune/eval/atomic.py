"""Output files written whole or not at all: a temporary name beside the file, then a rename, so
a killed ``evaluate``, ``plot-run`` or ``data-report`` never leaves a half-written (or 0-byte) file::

    with atomic_output(out / "loss.png") as tmp:
        fig.savefig(tmp, format="png")
    write_atomically(out / "summary.md", text)
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_output(path: Path):
    """A temporary path to write; renamed to ``path`` when the block ends without an error."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomically(path: Path, text: str) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(text)

"""An error as the one line a user reads::

    report_error(f"error: {one_line(e)}")                      # the whole message, joined
    f"saving failed ({type(e).__name__}: {first_line(e)})"     # a cause inside our own line
    rank_failures(checkpoint_exception)                        # DCP's per-rank causes
"""

from __future__ import annotations


def one_line(error: BaseException) -> str:
    """The message of an error as one line. An error raised in a DataLoader worker arrives as
    "Caught ValueError in DataLoader worker process 0. Original Traceback ...": its last line is ours."""
    text = str(error).strip()
    if text.startswith("Caught ") and "Original Traceback" in text:
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return " ".join(text.split("\n"))


def first_line(error: BaseException, limit: int = 200) -> str:
    """The first line of an error's message, at most ``limit`` characters (a cause quoted inside a
    line of ours: torch's collective errors run to dozens of lines)."""
    return (str(error).strip().splitlines() or [""])[0][:limit]


def rank_failures(error: BaseException) -> list[BaseException]:
    """The per-rank causes of torch's ``CheckpointException`` (its ``failures``: ``{rank: exception
    or (exception, traceback summary)}``), in rank order; [] for any other error."""
    causes = [f[0] if isinstance(f, tuple) else f for f in (getattr(error, "failures", None) or {}).values()]
    return [c for c in causes if isinstance(c, BaseException)]


class OneLineError(RuntimeError):
    """A failure whose message is the one line to show (with the fix); the recipe and the tools print
    it after ``error:`` and exit 1, with no traceback."""

"""Runs the training command (torchrun) for ``gdt-tune train`` / ``gdt-tune demo`` and keeps what
the user sees short:

- the ranks' ``error: ...`` lines are collected and the first one is printed once at the end,
  with the path of the full log (every line of stderr, tracebacks included);
- torchrun's own tracebacks (ChildFailedError, SignalException) and its failure table are left
  out of the terminal (they are in the log); a rank's unexpected traceback is shown;
- Ctrl-C and SIGTERM reach the ranks, which save the current step and stop; the launcher then
  exits 130 after Ctrl-C, 0 after SIGTERM once the step was saved (Slurm requeues it), without a
  traceback of its own.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

_TORCHRUN = re.compile(r"torch/distributed/(elastic|run\.py|launcher)|torch\.distributed\.elastic")
_TORCHRUN_LOG = re.compile(r"^[WEI]\d{4} .*(torch/distributed/elastic|torch\.distributed\.elastic)")
_SAVED = re.compile(r"checkpoint: SIG(TERM|INT) received; saved step \d+")


class StderrFilter:
    """Feed stderr lines; get the lines to show. Collects ``error:`` lines."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.saved_on_signal = False
        self._traceback: list[str] | None = None
        self._torchrun_failed = False

    def feed(self, line: str) -> list[str]:
        if line.startswith("error: "):
            if line.strip() not in self.errors:
                self.errors.append(line.strip())
            return []
        if self._torchrun_failed or _TORCHRUN_LOG.match(line):
            return []
        if self._traceback is not None:
            self._traceback.append(line)
            if line[:1] not in (" ", "\t", "\n") and not line.startswith(("Traceback", "During handling",
                                                                          "The above exception")):
                return self._end_traceback()  # the exception line ends the block
            return []
        if line.startswith("Traceback (most recent call last):"):
            self._traceback = [line]
            return []
        return [line]

    def feed_partial(self, text: str) -> list[str]:
        """A progress-bar update (no newline): shown unless a torchrun report is being hidden."""
        return [] if self._torchrun_failed or self._traceback is not None else [text]

    def _end_traceback(self) -> list[str]:
        block, self._traceback = self._traceback or [], None
        if any(_TORCHRUN.search(x) for x in block):
            self._torchrun_failed = True  # its failure table follows: all of it goes to the log only
            return []
        return block

    def flush(self) -> list[str]:
        return self._end_traceback() if self._traceback else []


def segments(fd: int):
    """``(text, whole line)`` from a pipe as soon as it arrives: complete lines, and the
    ``\r``-ended updates of a progress bar (which never end a line) so that the bar moves."""
    pending = b""
    while chunk := os.read(fd, 65536):
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            yield (line + b"\n").decode("utf-8", "replace"), True
        if b"\r" in pending:
            done, _, pending = pending.rpartition(b"\r")
            yield (done + b"\r").decode("utf-8", "replace"), False
    if pending:
        yield pending.decode("utf-8", "replace"), True


def log_path() -> Path:
    folder = Path(os.environ.get("GDT_TUNE_LOG_DIR") or Path(tempfile.gettempdir()) / "gdt_tune")
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"train-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"


def run_training(cmd: list[str], env: dict) -> int:
    """Run ``cmd`` (torchrun), filtering its stderr as described above; returns the exit code."""
    path = log_path()
    print("+ " + " ".join(cmd), flush=True)
    received: list[int] = []
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    shown = StderrFilter()

    def pass_stdout() -> None:  # unchanged, but watched for the ranks' "saved step N" on a signal
        for text, _ in segments(proc.stdout.fileno()):
            shown.saved_on_signal |= bool(_SAVED.search(text))
            sys.stdout.write(text)
            sys.stdout.flush()

    stdout = threading.Thread(target=pass_stdout, daemon=True)
    stdout.start()

    def forward(signum, frame):  # the terminal sends Ctrl-C to the whole group; Slurm may signal only us
        received.append(signum)
        if signum == signal.SIGTERM:
            proc.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with open(path, "w") as log:
            for text, whole_line in segments(proc.stderr.fileno()):
                log.write(text)
                log.flush()
                for out in (shown.feed(text) if whole_line else shown.feed_partial(text)):
                    sys.stderr.write(out)
                sys.stderr.flush()
            for out in shown.flush():
                sys.stderr.write(out)
        rc = proc.wait()
        stdout.join()
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    sys.stderr.flush()
    if signal.SIGINT in received:
        print(f"stopped by Ctrl-C{' after saving the current step' if shown.saved_on_signal else ''}; "
              f"full log: {path}", file=sys.stderr)
        return 130
    if signal.SIGTERM in received and shown.saved_on_signal:
        print(f"stopped by SIGTERM after saving the current step; resume with resume_from_checkpoint=true; "
              f"full log: {path}", file=sys.stderr)
        return 0
    if rc != 0:
        first = shown.errors[0] if shown.errors else f"error: training failed (exit code {rc})"
        print(f"{first}\nfull log: {path}", file=sys.stderr)
    return rc

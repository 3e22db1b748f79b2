"""Runs the training command (torchrun) for ``gdt-tune train`` / ``gdt-tune demo`` and keeps what
the user sees short:

- the ranks' ``error: ...`` lines are collected and the first one is printed once at the end,
  with the path of the full log (every line of stderr, tracebacks included); a rank that died
  without one (killed by a signal: the OOM killer's SIGKILL) is named with its signal, from
  torchrun's Root Cause;
- torchrun's own tracebacks (ChildFailedError, SignalException) and its failure table are left
  out of the terminal (they are in the log); a rank's unexpected traceback is shown;
- Ctrl-C and SIGTERM reach the ranks, which save the current step and stop; the launcher then
  exits 130 after Ctrl-C, 0 after SIGTERM once the step was saved (Slurm requeues it), without a
  traceback of its own;
- torchrun writes into the log files, which the launcher follows: a closed terminal (SIGHUP) or a
  ``kill -9`` of the launcher never breaks the ranks' output. The ranks watch the launcher
  (``GDT_LAUNCHER_PID``) and save and stop when it is gone, as on SIGTERM; a SIGHUP reaches them
  too and does the same.
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

from gdt_tune.runtime.disk import disk_full
from gdt_tune.runtime.redact import redacted_argv

_TORCHRUN = re.compile(r"torch/distributed/(elastic|run\.py|launcher)|torch\.distributed\.elastic")
_TORCHRUN_LOG = re.compile(r"^[WEI]\d{4} .*(torch/distributed/elastic|torch\.distributed\.elastic)")
# a line of ours or of torchrun's that starts right after a progress bar's redraw (tqdm ends it with
# "]" and starts the next with "\r"), on the bar's line
_GLUED = re.compile(r"[\r\]](?=error: |[WEI]\d{4} \d\d:\d\d:\d\d)")
_SAVED = re.compile(r"checkpoint: SIG(TERM|INT|HUP) received; saved step \d+")
_FINAL = re.compile(r"final checkpoint: (\S+)")  # the recipe's line once epoch_N is whole
# torchrun's failure summary: the Root Cause block's rank and exit code (negative: killed by a signal)
_ROOT_RANK = re.compile(r"^\s*rank\s*:\s*(\d+)")
_ROOT_EXIT = re.compile(r"^\s*exitcode\s*:\s*(-?\d+)")
#: How often a log file is read again while torchrun runs (progress bars stay smooth).
POLL_SECONDS = 0.05
#: The free space the log folder must have at the start (the ranks' output of a long run).
LOG_MIN_FREE = 16_000_000


class StderrFilter:
    """Feed stderr lines; get the lines to show. Collects ``error:`` lines."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.saved_on_signal = False
        self.final_written: str | None = None  # the run's last epoch_N, once whole
        self._traceback: list[str] | None = None
        self._torchrun_failed = False
        self.failed_rank: int | None = None  # torchrun's Root Cause: which rank, with what exit code
        self.failed_exit: int | None = None
        self._in_root_cause = False

    def feed(self, line: str) -> list[str]:
        glued = _GLUED.search(line)
        if glued:  # written onto a progress bar's line: the bar's line ends there
            bar, rest = line[:glued.end()], line[glued.end():]
            return ([f"{bar.rstrip(chr(13))}\n"] if bar.strip() else []) + self.feed(rest)
        if line.startswith("error: "):
            if line.strip() not in self.errors:
                self.errors.append(line.strip())
            return []
        if self._torchrun_failed or _TORCHRUN_LOG.match(line):
            self._read_root_cause(line)
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

    def _read_root_cause(self, line: str) -> None:
        if line.startswith("Root Cause"):
            self._in_root_cause = True
        elif self._in_root_cause and (m := _ROOT_RANK.match(line)):
            self.failed_rank = int(m.group(1))
        elif self._in_root_cause and (m := _ROOT_EXIT.match(line)):
            self.failed_exit, self._in_root_cause = int(m.group(1)), False

    def failure(self, rc: int, command: str) -> str:
        """The line for a failed run without an ``error:`` line of its own: which rank, and how it ended."""
        what = "training" if command == "train" else command
        rank, code = self.failed_rank, self.failed_exit
        if rank is None or code is None or code == 0:
            return f"error: {what} failed (exit code {rc})"
        if code > 0:
            return f"error: {what} failed: rank {rank} exited with code {code} (its traceback is in the full log)"
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = (" (often the out-of-memory killer: check the node's memory in dmesg or the scheduler's job report)"
                if -code == signal.SIGKILL else "")
        return f"error: {what} failed: rank {rank} was killed by {name}{hint}; the other ranks were stopped"

    def feed_partial(self, text: str) -> list[str]:
        """A progress-bar update (no newline): shown unless a torchrun report is being hidden."""
        return [] if self._torchrun_failed or self._traceback is not None else [text]

    def _end_traceback(self) -> list[str]:
        block, self._traceback = self._traceback or [], None
        if block and block[-1].strip() == "KeyboardInterrupt":  # Ctrl-C in a process's start-up: said once at the end
            return []
        if any(_TORCHRUN.search(x) for x in block):
            self._torchrun_failed = True  # its failure table follows: all of it goes to the log only
            return []
        return block

    def flush(self) -> list[str]:
        return self._end_traceback() if self._traceback else []


def segments(fd: int, running=None):
    """``(text, whole line)`` from a pipe or a growing file as soon as it arrives: complete lines,
    and the ``\r``-ended updates of a progress bar (which never end a line) so that the bar moves.
    ``running()``: whether the writer may still write (a file at its end is read again until not)."""
    pending = b""
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            if running is None or not running():
                if not (chunk := os.read(fd, 65536)):  # what was written just before the writer ended
                    break
            else:
                time.sleep(POLL_SECONDS)
                continue
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            yield (line + b"\n").decode("utf-8", "replace"), True
        if b"\r" in pending:
            done, _, pending = pending.rpartition(b"\r")
            yield (done + b"\r").decode("utf-8", "replace"), False
    if pending:
        yield pending.decode("utf-8", "replace"), True


def log_folder() -> Path:
    return Path(os.environ.get("GDT_TUNE_LOG_DIR") or Path(tempfile.gettempdir()) / "gdt_tune")


def log_path(command: str = "train") -> Path:
    folder = log_folder()
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"


def log_disk_full(error: BaseException | None = None) -> str | None:
    """Why the ranks' output cannot be written: the log folder's disk is full (or under
    ``LOG_MIN_FREE``), with the fix; None when it is not."""
    full = disk_full(error, log_folder(), LOG_MIN_FREE, "the ranks' output")
    return full and (f"the log folder: {full}; free space there or set GDT_TUNE_LOG_DIR to a folder on another "
                     "disk")


def stopped_line(command: str, how: str) -> str:
    """What a signal before any work was saved ended: ``stopped by SIGTERM before training started;
    nothing was saved`` (train, demo), ``interrupted (Ctrl-C); evaluate stopped, ...`` (the tools)."""
    if command in ("train", "demo"):  # during training the ranks say what was saved
        return f"{how} before training started; nothing was saved"
    return f"{how}; {command} stopped, and no file it writes is left half-written"


class Terminal:
    """Writes to the terminal until it is gone (a closed terminal: EIO, a dead pipe: EPIPE)."""

    def __init__(self) -> None:
        self.gone = False
        self._open_line: set[int] = set()  # streams whose last text did not end its line (a progress bar)

    def write(self, stream, text: str) -> None:
        if self.gone or not text:
            return
        try:
            stream.write(text)
            stream.flush()
        except OSError:
            self.gone = True
        (self._open_line.discard if text.endswith("\n") else self._open_line.add)(id(stream))

    def end_line(self, stream) -> None:
        if id(stream) in self._open_line:
            self.write(stream, "\n")


def run_training(cmd: list[str], env: dict, command: str = "train") -> int:
    """Run ``cmd`` (torchrun), filtering its stderr as described above; returns the exit code.
    ``command`` names the log file (``train-...log``, ``evaluate-...log``)."""
    terminal = Terminal()
    terminal.write(sys.stdout, "+ " + " ".join(redacted_argv(cmd)) + "\n")  # an inline patient id list stays here
    try:
        if full := log_disk_full():
            raise OSError(full)
        path = log_path(command)
        with open(path, "wb") as err, open(path.with_suffix(".out"), "wb") as out:
            proc = subprocess.Popen(cmd, env=dict(env, GDT_LAUNCHER_PID=str(os.getpid())), stdout=out, stderr=err)
    except OSError as e:
        terminal.write(sys.stderr, f"error: {log_disk_full(e) or f'the log folder {log_folder()}: {e}'} (nothing was "
                                   "started)\n")
        return 1
    received: list[int] = []
    shown = StderrFilter()
    running = lambda: proc.poll() is None  # noqa: E731

    def pass_stdout() -> None:  # unchanged, but watched for the ranks' "saved step N" on a signal
        with open(path.with_suffix(".out"), "rb") as f:
            for text, _ in segments(f.fileno(), running):
                shown.saved_on_signal |= bool(_SAVED.search(text))
                if final := _FINAL.search(text):
                    shown.final_written = final.group(1)
                terminal.write(sys.stdout, text)

    stdout = threading.Thread(target=pass_stdout, daemon=True)
    stdout.start()

    def forward(signum, frame):  # the terminal signals the whole group; Slurm may signal only us
        received.append(signum)
        if signum == signal.SIGTERM:
            proc.send_signal(signum)

    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    for s in handled:
        signal.signal(s, forward)
    try:
        with open(path, "rb") as log:
            for text, whole_line in segments(log.fileno(), running):
                for line in (shown.feed(text) if whole_line else shown.feed_partial(text)):
                    terminal.write(sys.stderr, line)
            for line in shown.flush():
                terminal.write(sys.stderr, line)
        rc = proc.wait()
        rc = rc if rc >= 0 else 128 - rc  # torchrun killed by a signal: the shell's 128 + N
        stdout.join()
    finally:
        # The job is over: a late signal (Slurm's second SIGTERM, another Ctrl-C) must not turn its
        # exit code into 143 or print a traceback while its last lines are written.
        for s in handled:
            signal.signal(s, signal.SIG_IGN)
    terminal.end_line(sys.stderr)  # after a progress bar's last redraw
    if received and command != "train" and rc != 0:  # evaluate: nothing to save
        name = "Ctrl-C" if received[0] == signal.SIGINT else signal.Signals(received[0]).name
        terminal.write(sys.stderr, f"{stopped_line(command, f'stopped by {name}')}; full log: {path}\n")
        return 128 + received[0]
    if signal.SIGINT in received:
        if not shown.saved_on_signal and shown.errors:  # e.g. while indexing: the ranks said what they did
            terminal.write(sys.stderr, f"{shown.errors[0]}\nfull log: {path}\n")
        else:
            terminal.write(sys.stderr, f"stopped by Ctrl-C{' after saving the current step' if shown.saved_on_signal else ''}"
                                       f"; full log: {path}\n")
        return 130
    if signal.SIGTERM in received or signal.SIGHUP in received:
        name = "SIGTERM" if signal.SIGTERM in received else "SIGHUP"
        if shown.final_written:  # it came during the final save, which finishes first: the run is done
            terminal.write(sys.stderr, f"stopped by {name} after the final checkpoint was written ({shown.final_written}); "
                                       f"the run has finished; full log: {path}\n")
            return 0
        if shown.saved_on_signal:
            terminal.write(sys.stderr, f"stopped by {name} after saving the current step; resume with "
                                       f"resume_from_checkpoint=true; full log: {path}\n")
            return 0
        if rc != 0 and not shown.errors:  # before the first step (e.g. while indexing): nothing to save
            terminal.write(sys.stderr, f"{stopped_line(command, f'stopped by {name}')}; full log: {path}\n")
            return rc
    if rc != 0:
        first = shown.errors[0] if shown.errors else shown.failure(rc, command)
        if not shown.errors and (full := log_disk_full()):  # the ranks could not write their error either
            first = f"{first}; its log is cut short or empty: {full}"
        terminal.write(sys.stderr, f"{first}\nfull log: {path}\n")
    return rc

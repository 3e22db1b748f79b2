"""One rank does a job first, the others wait on a collective (not on files) and learn whether
it failed::

    node_first(lambda build: index_files(..., build=build))   # each node's first rank builds
    rank_zero_first(lambda first: claim(...) if first else read(...))
    report_error("error: ...")   # one line for all ranks that fail the same way
    watch_launcher()             # under torchrun: save and stop when the launcher dies

Without a process group (tools, tests, one process) the job simply runs. When the first rank
fails, it raises its own error and the others raise :class:`FailedElsewhere`, which the recipe
ends without a message of its own (the first rank's line is the one to read).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist

from gdt_tune.runtime.cpus import available_cpus
from gdt_tune.runtime.errors import OneLineError, first_line

T = TypeVar("T")
#: How long ranks wait for their node's index build (2.5M GDT samples index in minutes).
INDEX_TIMEOUT = dt.timedelta(hours=3)


class FailedElsewhere(Exception):
    """Another rank failed (and reported why); this one stops without a message of its own."""


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def first_then_others(job: Callable[[bool], T], first: bool, what: str, timeout: dt.timedelta) -> T:
    """``job(True)`` where ``first``; after it finished everywhere, ``job(False)`` on the others."""
    if not _distributed():
        return job(True)
    group = dist.new_group(backend="gloo", timeout=timeout)
    try:
        result, error = None, None
        if first:
            try:
                result = job(True)
            except Exception as e:  # reported below, after the others know
                error = e
        failed = torch.tensor([int(error is not None)])
        try:
            dist.all_reduce(failed, op=dist.ReduceOp.MAX, group=group)
        except RuntimeError:
            raise ValueError(f"waited over {timeout} for {what}; check the log of that rank") from None
    finally:
        dist.destroy_process_group(group)
    if error is not None:
        raise error
    if failed.item():
        raise FailedElsewhere(f"{what} failed on another rank")
    return result if first else job(False)


def node_first(job: Callable[[bool], T], timeout: dt.timedelta = INDEX_TIMEOUT) -> T:
    """``job(True)`` on each node's local rank 0, then ``job(False)`` on the others."""
    first = not _distributed() or dist.get_node_local_rank(fallback_rank=dist.get_rank()) == 0
    return first_then_others(job, first, "the first rank of each node to index the data", timeout)


def rank_zero_first(job: Callable[[bool], T], timeout: dt.timedelta = dt.timedelta(minutes=10)) -> T:
    """``job(True)`` on global rank 0, then ``job(False)`` on the others."""
    first = not _distributed() or dist.get_rank() == 0
    return first_then_others(job, first, "rank 0", timeout)


#: How long a rank > 0 waits to learn whether rank 0 already printed the same error.
ERROR_WAIT = dt.timedelta(seconds=5)


def _agent_store():
    """A client of torchrun's agent store (it outlives every rank), or None outside torchrun."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return None
    try:
        return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                             timeout=ERROR_WAIT)
    except (RuntimeError, KeyError, ValueError):
        return None


class Heartbeats:
    """Every rank writes (time, host, pid) to torchrun's store every ``every`` seconds from a thread of
    its own, so that when a training collective times out the ranks that went silent can be named (a
    frozen process or node: SIGSTOP, a hung driver). No-op outside torchrun::

        beats = Heartbeats(rank, world)           # after the setup
        beats.silent()                            # [(rank, seconds silent, host, pid)]
        beats.close()
    """

    def __init__(self, rank: int, world: int, every: float = 2.0):
        self.rank, self.world, self.every = rank, world, every
        self._prefix = f"gdt_tune/beat/{os.environ.get('TORCHELASTIC_RUN_ID', '')}/"
        self._store = _agent_store()
        self._stop = threading.Event()
        self._thread = None
        if self._store is not None:
            self._thread = threading.Thread(target=self._beat, name="gdt-heartbeat", daemon=True)
            self._thread.start()

    def _beat(self) -> None:
        store = _agent_store()  # a client of this thread's own
        host, pid = socket.gethostname(), os.getpid()
        while store is not None and not self._stop.is_set():
            try:
                store.set(f"{self._prefix}{self.rank}", json.dumps([time.time(), host, pid]))
            except RuntimeError:
                return
            self._stop.wait(self.every)

    def silent(self) -> list[tuple[int, float, str, int]]:
        """The ranks whose last beat is older than three beats: (rank, seconds, host, pid)."""
        if self._store is None:
            return []
        out, now = [], time.time()
        for r in range(self.world):
            try:
                key = f"{self._prefix}{r}"
                when, host, pid = json.loads(self._store.get(key)) if self._store.check([key]) else (0.0, "?", 0)
            except (RuntimeError, ValueError):
                when, host, pid = 0.0, "?", 0
            if now - when > 3 * self.every:
                out.append((r, now - when, host, pid))
        return out

    def close(self) -> None:
        self._stop.set()


def collective_failure(error: BaseException, beats: Heartbeats, timeout: dt.timedelta) -> BaseException:
    """What to raise for an error of a training collective: the silent ranks named when there are any
    (and a frozen rank on this node killed, the only signal a stopped process obeys, so that nothing
    outlives the job); else a one-line error stays as it is, a timeout becomes one line, anything
    else is raised as it came."""
    if not collective_timed_out(error):
        return error
    silent = [s for s in beats.silent() if s[0] != beats.rank]
    here = socket.gethostname()
    for _, _, host, pid in silent:
        if host == here and pid:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    minutes = f"collective_timeout_minutes={timeout.total_seconds() / 60:g}"
    if silent:
        named = ", ".join(f"rank {r} (pid {pid} on {host}, silent {seconds:.0f} s)" if pid else f"rank {r}"
                          for r, seconds, host, pid in silent)
        return OneLineError(f"training: {named} stopped answering, and a collective waited {minutes} for it (a frozen "
                            "process or node); the job ends: resume with resume_from_checkpoint=true once the node "
                            "is healthy")
    if isinstance(error, OneLineError):
        return error
    if _peer_gone(str(error).lower()):
        return OneLineError(f"training: another rank left the job ({type(error).__name__}: {first_line(error, 80)}); "
                            "the first error line of the job says why")
    return OneLineError(f"training: a collective timed out after {minutes} ({type(error).__name__}: "
                        f"{first_line(error)}); every rank still answers: read their logs, then resume with "
                        "resume_from_checkpoint=true (raise collective_timeout_minutes if a step can take longer)")


def collective_timed_out(error: BaseException) -> bool:
    """A gloo or NCCL collective that gave up waiting for a peer (or whose peer is gone)."""
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("timed out" in text or "timeout" in text or _peer_gone(text))


def _peer_gone(text: str) -> bool:
    """An error's text (lower case) says that the other side of a connection went away."""
    return "connection closed" in text or "connection reset" in text


def write_error_file(line: str) -> None:
    """torchelastic's error-file protocol: under torchrun (``tune run``) the failure summary's
    Root Cause then shows this line (``traceback : error: ...``) instead of ``error_file: <N/A>``."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        try:
            with open(path, "w") as f:
                json.dump({"message": line.strip(), "timestamp": int(time.time())}, f)
        except OSError:
            pass  # the summary then says <N/A>; the line itself is still printed


def report_error(line: str) -> None:
    """Write ``line`` to stderr once for all ranks: under torchrun, rank 0 writes it and posts it in
    the agent store; another rank writes its own line only when it differs from rank 0's (or rank
    0 posted none within ``ERROR_WAIT``). One ``write`` call, so lines of ranks never interleave."""
    rank = int(os.environ.get("RANK", "0"))
    write_error_file(line)
    store = _agent_store()
    key = f"gdt_tune/error/{os.environ.get('TORCHELASTIC_RUN_ID', '')}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    if store is not None:
        try:
            if rank == 0:
                store.set(key, line)
            else:
                store.wait([key], ERROR_WAIT)
                if store.get(key).decode() == line:
                    return
        except RuntimeError:  # rank 0 posted nothing in time: speak for this rank
            pass
    os.write(2, (line.rstrip("\n") + "\n").encode())


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, killed but not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


def watch_launcher(poll_seconds: float = 2.0) -> None:
    """Under torchrun: when the launcher dies (torchrun, or the ``gdt-tune train`` process in
    ``GDT_LAUNCHER_PID``: ``kill -9``, a lost node), stop like on SIGTERM (save and exit) instead of
    training on as an orphan."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    parent = os.getppid()
    launcher = int(os.environ.get("GDT_LAUNCHER_PID") or 0)

    def watch() -> None:
        while os.getppid() == parent and (not launcher or _alive(launcher)):
            time.sleep(poll_seconds)
        logging.getLogger("gdt_tune").warning("launcher (pid %d) is gone; stopping",
                                              parent if os.getppid() != parent else launcher)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="gdt-launcher-watch", daemon=True).start()


def init_distributed(device_type: str) -> tuple[int, int, int]:
    """Start the process group (also for a plain single-process launch); returns world, rank, local
    rank. On CPU each rank gets its share of the node's CPUs as threads (a cgroup quota included)."""
    if "RANK" not in os.environ:  # a launch without torchrun: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
        backend = "cuda:nccl,cpu:gloo"  # gloo for CPU-side collectives (async checkpoint staging)
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend)
    if device_type == "cpu":
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size()))
        torch.set_num_threads(max(1, available_cpus() // local_world))
    return dist.get_world_size(), dist.get_rank(), local_rank

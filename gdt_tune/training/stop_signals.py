"""SIGTERM (Slurm, ``kill``), Ctrl-C (SIGINT) and SIGHUP (a closed terminal) ask a run to save its step
and stop. The handler only notes the signal; the ranks agree on it where they all ask, so every rank
stops at the same step, batch or scoring forward::

    signals = StopSignals(timeout)        # the control group (every rank, in setup)
    signals.listen()                      # the handlers, once the weights are loaded
    if signals.poll("validation"): ...    # one all-reduce; every rank asks at the same points
    signals.name                          # "SIGTERM", "SIGINT" or "SIGHUP" once requested
    signals.barrier("the barrier before a save")
    signals.close()                       # handlers restored

Until ``listen`` a signal ends the process as usual (nothing is trained yet: a SIGTERM while the data is
indexed must not wait for the index). The recipe asks after every step (through the checkpoint manager), the validator before every batch,
event scoring before every forward. Its gloo group, the *control group*, carries only what the
training thread issues between saves (docs/architecture.md, "Process groups"): a rank that does not
join within ``timeout`` is one line naming the collective, not a 30-minute hang.
"""

from __future__ import annotations

import datetime as dt
import signal

import torch
import torch.distributed as dist

from gdt_tune.runtime.errors import OneLineError, first_line

#: First seen wins the name; Ctrl-C's exit code is 130.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class StopSignals:
    def __init__(self, timeout: dt.timedelta = dt.timedelta(minutes=10)):
        self.timeout = timeout
        self.requested = False
        self.name: str | None = None
        self._group = dist.new_group(backend="gloo", timeout=timeout)
        self._seen = torch.zeros(len(STOP_SIGNALS), dtype=torch.int64)  # in STOP_SIGNALS order
        self._old_handlers: dict = {}

    def listen(self) -> StopSignals:
        """Note SIGINT, SIGTERM and SIGHUP from now on instead of ending the process."""
        if not self._old_handlers:
            self._old_handlers = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}
        return self

    def _on_signal(self, signum, frame) -> None:
        self._seen[STOP_SIGNALS.index(signum)] = 1

    def poll(self, during: str = "per-step") -> bool:
        """Whether any rank has seen a stop signal (sets ``requested`` and ``name``). Every rank
        must call it at the same points."""
        flags = self._seen.clone()
        self._collective(f"the {during} signal all-reduce", dist.all_reduce, flags, op=dist.ReduceOp.MAX)
        if flags.any() and not self.requested:
            self.requested = True
            self.name = next(s.name for s, seen in zip(STOP_SIGNALS, flags.tolist()) if seen)
        return self.requested

    def barrier(self, what: str) -> None:
        """A barrier of the training thread on the control group (never the save group)."""
        self._collective(what, dist.barrier)

    def _collective(self, what: str, collective, *args, **kwargs) -> None:
        try:
            collective(*args, group=self._group, **kwargs)
        except RuntimeError as e:  # gloo's timeout or a peer that died (DistBackendError)
            raise OneLineError(f"checkpoint: {what} on the checkpoint control group failed after up to "
                               f"{self.timeout} ({type(e).__name__}: {first_line(e)}); another rank stopped or "
                               "hung: read its log, then resume with resume_from_checkpoint=true") from None

    def set_timeout(self, timeout: dt.timedelta) -> None:
        """After the first step: the training collectives' timeout (``collective_timeout_minutes``)."""
        self.timeout = timeout
        dist.distributed_c10d._set_pg_timeout(timeout, self._group)

    def close(self) -> None:
        for signum, handler in self._old_handlers.items():
            signal.signal(signum, handler)
        self._old_handlers = {}

"""One rank does a job first, the others wait on a collective (not on files) and learn whether
it failed::

    node_first(lambda build: index_files(..., build=build))   # each node's first rank builds
    rank_zero_first(lambda first: claim(...) if first else read(...))

Without a process group (tools, tests, one process) the job simply runs. When the first rank
fails, it raises its own error and the others raise :class:`FailedElsewhere`, which the recipe
ends without a message of its own (the first rank's line is the one to read).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist

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

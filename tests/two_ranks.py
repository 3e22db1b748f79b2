"""Run a function on 2 spawned gloo ranks in tests: ``run_two_ranks(fn, tmp_path, timeout)`` returns
each rank's result (what ``fn(rank)`` returned), or fails the test when a rank hangs or raises."""

import multiprocessing as mp
import os
import queue
import time
import traceback

import torch
import torch.distributed as dist
from recipe_utils import _free_port


def _entry(fn, rank: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        results.put((rank, "ok", fn(rank)))
    except BaseException as e:  # noqa: B036 - reported to the test, which fails with it
        results.put((rank, "error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    results.close()
    results.join_thread()  # the queue's feeder thread has sent the result
    os._exit(0)  # no destroy_process_group: a peer may be gone or hung by design


def run_two_ranks(fn, timeout: float) -> dict[int, object]:
    """``fn(rank)`` on ranks 0 and 1 (``fn`` must be importable: a module-level function)."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_entry, args=(fn, rank, port, results), daemon=True) for rank in range(2)]
    for p in procs:
        p.start()
    out: dict[int, object] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(out) < len(procs):
            try:
                rank, status, value = results.get(timeout=0.2)
            except queue.Empty:
                if any(p.exitcode not in (None, 0) for p in procs):
                    raise AssertionError(f"a rank died: exit codes {[p.exitcode for p in procs]}") from None
                if time.monotonic() > deadline:
                    raise AssertionError(f"ranks {sorted(set(range(2)) - set(out))} did not finish within "
                                         f"{timeout} s (hung)") from None
                continue
            if status == "error":
                raise AssertionError(f"rank {rank} raised {value}")
            out[rank] = value
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    return out

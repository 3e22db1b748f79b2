"""The checkpoint manager's process groups on 2 ranks: an async save in flight never shares a group
with the training thread's collectives, and a rank that stops answering is one line after the
group's timeout, not a 30-minute hang."""

import datetime as dt
import os
import time
from functools import partial

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.filesystem import FileSystemWriter
from two_ranks import run_two_ranks

from gdt_tune.runtime.errors import OneLineError
from gdt_tune.training.checkpointing import CheckpointManager, Progress
from gdt_tune.training.step_dirs import is_complete
from gdt_tune.training.stop_signals import StopSignals

STEP_SECONDS, WRITE_DELAY = 0.2, 0.8


def _manager(folder, rank, **kw):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    progress = Progress(seed=0, world_size=2)
    signals = StopSignals(kw.get("timeout", dt.timedelta(minutes=10))).listen()
    ckpt = CheckpointManager(folder, model=model, optimizer=optimizer, lr_scheduler=None, progress=progress,
                             signals=signals, rank=rank, **kw)
    return model, optimizer, progress, ckpt


def _async_saves_every_step(folder, rank):
    """Rank 1 writes its shards slowly, so its background thread's last DCP collective comes after
    the training thread's next per-step collective; on rank 0 it comes before. On one shared group
    these two orders deadlock."""
    if rank == 1:
        write = FileSystemWriter.write_data

        def slow_write(self, *args, **kwargs):
            time.sleep(WRITE_DELAY)
            return write(self, *args, **kwargs)

        FileSystemWriter.write_data = slow_write
    model, optimizer, progress, ckpt = _manager(folder, rank, save_every_n_steps=1, keep_last_n_checkpoints=2,
                                                async_checkpointing=True, timeout=dt.timedelta(seconds=60))
    for _ in range(4):
        model(torch.randn(2, 4)).pow(2).sum().backward()
        for p in model.parameters():  # the recipe's own collectives, on the default group
            dist.all_reduce(p.grad)
        optimizer.step()
        optimizer.zero_grad()
        progress.advance(tokens=8, samples=4)
        time.sleep(STEP_SECONDS)
        ckpt.save(progress.global_step)
    ckpt.close()
    return progress.global_step


def test_async_save_in_flight_and_per_step_collectives_do_not_deadlock(tmp_path):
    assert run_two_ranks(partial(_async_saves_every_step, tmp_path), timeout=45) == {0: 4, 1: 4}
    kept = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("step_"))
    assert kept == ["step_3", "step_4"] and all(is_complete(tmp_path / k) for k in kept)


def _rank_one_stops_answering(folder, rank):
    _, _, _, ckpt = _manager(folder, rank, save_every_n_steps=1, timeout=dt.timedelta(seconds=2))
    if rank == 1:
        time.sleep(5)  # alive, but never joins the per-step collective
        return None
    started = time.monotonic()
    try:
        ckpt.save(1)
    except OneLineError as e:
        return str(e), time.monotonic() - started
    return "no error", time.monotonic() - started


def test_a_rank_that_stops_answering_is_one_line_after_the_timeout(tmp_path):
    message, seconds = run_two_ranks(partial(_rank_one_stops_answering, tmp_path), timeout=60)[0]
    assert message.startswith("checkpoint: the per-step signal all-reduce on the checkpoint control group failed "
                              "after up to 0:00:02 (")
    assert "\n" not in message and "resume_from_checkpoint=true" in message
    assert 1.5 < seconds < 5
    assert not os.path.exists(tmp_path / "step_1")

"""Fault injection for bench/fault_injection.py (on PYTHONPATH of the training processes only).

GDT_FAULT says where rank 0 SIGKILLs its whole process group (torchrun and every rank):
  optim:N            at the N-th optimizer step, before it updates anything
  write:step_N:MS    MS milliseconds after the DCP write of step_N starts (sync or async)
  prune:step_N       while pruning step_N (on the remover thread, after the folder was renamed
                     .deleting-step_N-*), after deleting one of its shard files
"""

import os
import signal

SPEC = os.environ.get("GDT_FAULT", "")


def _die():
    os.killpg(os.getpgrp(), signal.SIGKILL)


if SPEC and os.environ.get("RANK") == "0":
    kind, _, arg = SPEC.partition(":")
    if kind == "optim":
        import torch.optim

        calls = [0]
        original_step = torch.optim.AdamW.step

        def step(self, *args, **kwargs):
            calls[0] += 1
            if calls[0] == int(arg):
                _die()
            return original_step(self, *args, **kwargs)

        torch.optim.AdamW.step = step
    elif kind == "write":
        import threading

        from torch.distributed.checkpoint import filesystem

        folder, _, ms = arg.partition(":")
        original_write = filesystem._FileSystemWriter.write_data

        def write_data(self, plan, planner):
            if str(self.path).endswith(folder):
                threading.Timer(int(ms) / 1000, _die).start()
            return original_write(self, plan, planner)

        filesystem._FileSystemWriter.write_data = write_data
    elif kind == "prune":
        import shutil
        from pathlib import Path

        original_rmtree = shutil.rmtree

        def rmtree(path, *args, **kwargs):
            if Path(path).name.startswith(f".deleting-{arg}-"):
                shard = next(Path(path).glob("*.distcp"), None)
                if shard is not None:
                    shard.unlink()
                _die()
            return original_rmtree(path, *args, **kwargs)

        shutil.rmtree = rmtree

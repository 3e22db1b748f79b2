"""Pruning old checkpoints off the training path: how long the training loop is blocked by
pruning one checkpoint folder, deleted inline (``shutil.rmtree``, as before) or by
``gdt_tune.training.checkpointing.FolderRemover`` (rename, then delete on a background thread), and how long
the next training-like step takes (a fixed matmul loop) compared with a step with no prune before.
The step runs on one thread (``--step-threads 1``, the default: like the host side of a GPU step,
one thread launching kernels) or on every core (a CPU-bound step, the worst case).

    python bench/prune.py                      # 4 shard files of 1 GiB per folder, 5 repeats
    python bench/prune.py --step-threads 0     # the step on every core
    python bench/prune.py --gib 0.01 --repeat 1  # a quick look
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command_line, machine, median, table  # noqa: E402


def make_checkpoint(folder: Path, gib: float, files: int = 4) -> None:
    folder.mkdir(parents=True)
    block = b"\0" * 2**20
    for i in range(files):
        with open(folder / f"__{i}_0.distcp", "wb") as f:
            for _ in range(max(1, int(gib * 1024 / files))):
                f.write(block)


def step(size: int = 512, reps: int = 150) -> float:
    """A fixed amount of matmul work (about a GPU step's length here), timed."""
    import torch

    a = torch.randn(size, size)
    started = time.perf_counter()
    for _ in range(reps):
        a = torch.tanh(a @ a / size)
    return time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="/tmp/gdt_bench_prune")
    ap.add_argument("--gib", type=float, default=4.0, help="size of each checkpoint folder")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--step-threads", type=int, default=1, help="threads of the step (0: every core)")
    args = ap.parse_args()
    import torch

    if args.step_threads:
        torch.set_num_threads(args.step_threads)
    from gdt_tune.training.checkpointing import FolderRemover

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    results = {"none": ([], []), "inline": ([], []), "background": ([], [])}
    step()  # warm up
    for i in range(args.repeat):
        for mode, (blocked, steps) in results.items():
            folder = work / f"{mode}_{i}" / "step_1"
            make_checkpoint(folder, args.gib)
            time.sleep(0.5)  # let the writes settle
            remover = FolderRemover()
            started = time.perf_counter()
            if mode == "inline":
                shutil.rmtree(folder)
            elif mode == "background":
                remover.remove(folder)
            blocked.append(time.perf_counter() - started)
            steps.append(step())
            remover.close()
            shutil.rmtree(work / f"{mode}_{i}", ignore_errors=True)
    print(f"# checkpoint pruning benchmark\n\nmachine: {machine()}\ncommand: `{command_line()}`\n"
          f"folder: 4 shard files, {args.gib:g} GiB in all, on {work}; step on {torch.get_num_threads()} "
          f"thread(s); {args.repeat} repeats, medians\n")
    base = median(results["none"][1])
    rows = [[mode, median(b) if mode != "none" else 0.0, median(s), (median(b) + median(s)) / base]
            for mode, (b, s) in results.items()]
    print(table(["prune", "training blocked s", "next step s", "(blocked + next step) / step with no prune"], rows))


if __name__ == "__main__":
    main()

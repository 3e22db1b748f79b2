"""Fault injection: SIGKILL a 2-rank tiny training at random points (during optimizer steps, sync
saves, async saves and pruning), resume until it finishes, and compare the final weights with an
uninterrupted run, bit for bit.

    python bench/fault_injection.py                  # 20 points, about 8 min
    python bench/fault_injection.py --points 3       # the CI version (bench/smoke.py): every kind that writes

Run: 2 epochs x 15 steps, a checkpoint every 5 steps, the 2 newest kept. The kill comes from
bench/fault_hook/sitecustomize.py inside rank 0 (GDT_FAULT), so it lands exactly where asked;
a resume is started with resume_from_checkpoint=true when a step_N/COMPLETE exists, else fresh.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RECIPE, REPO, TINY_CONFIG, command_line, demo_tokenizer, machine, table, torchrun  # noqa: E402

EPOCHS, STEPS, EVERY, KEEP = 2, 15, 5, 2
TOTAL = EPOCHS * STEPS
SAVES = list(range(EVERY, TOTAL + 1, EVERY))


def run(work: Path, out: Path, *extra: str, fault: str | None = None, async_save: bool = False):
    cmd = [*torchrun(2), RECIPE, "--config", TINY_CONFIG, f"demo_dir={work / 'demo'}",
           f"output_dir={out}", f"epochs={EPOCHS}", f"max_steps_per_epoch={STEPS}", f"save_every_n_steps={EVERY}",
           f"keep_last_n_checkpoints={KEEP}", f"async_checkpointing={async_save}", "dataset_val=null",
           "run_val_every_n_steps=null", *extra]
    env = dict(os.environ, TIKTOKEN_CACHE_DIR="", GDT_TUNE_CACHE_DIR=str(work / "index"),
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    if fault:
        env["GDT_FAULT"] = fault
        env["PYTHONPATH"] = os.pathsep.join([str(REPO / "bench" / "fault_hook"), env["PYTHONPATH"]])
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
                          start_new_session=True)  # the hook kills this whole session
    return proc


def weights_hash(out: Path) -> str | None:
    from safetensors.torch import load_file

    files = sorted((out / f"epoch_{EPOCHS - 1}").glob("*.safetensors"))
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        state = load_file(str(f))
        for k in sorted(state):
            h.update(k.encode())
            h.update(state[k].contiguous().view(-1).view(dtype=__import__("torch").uint8).numpy().tobytes())
    return h.hexdigest()


def pick(rng: random.Random, i: int) -> tuple[str, str, bool]:
    """(label, GDT_FAULT, async) of point ``i``: the four kinds in turn, random steps and delays."""
    kind = ["sync save", "async save", "prune", "step"][i % 4]  # the CI's 3 points: every kind that writes
    if kind == "step":
        n = rng.randint(2, TOTAL)
        return f"step {n}", f"optim:{n}", rng.random() < 0.5
    if kind in ("sync save", "async save"):
        s, ms = rng.choice(SAVES[:-1]), rng.randint(0, 40)
        return f"{kind} step_{s} +{ms}ms", f"write:step_{s}:{ms}", kind == "async save"
    s = rng.choice(SAVES[KEEP:-1])  # the save of step s prunes step s - KEEP*EVERY
    return f"prune step_{s - KEEP * EVERY}", f"prune:step_{s - KEEP * EVERY}", rng.random() < 0.5


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--points", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default="/tmp/gdt_bench_faults")
    args = ap.parse_args()
    work = Path(args.work)
    shutil.rmtree(work / "runs", ignore_errors=True)
    demo_tokenizer(work)
    print(f"# fault injection\n\nmachine: {machine()}\ncommand: `{command_line()}`\n"
          f"run: tiny config, 2 CPU ranks, {EPOCHS} epochs x {STEPS} steps, save every {EVERY}, keep {KEEP}\n")
    reference = {}
    for async_save in (False, True):
        out = work / "runs" / f"reference_{'async' if async_save else 'sync'}"
        proc = run(work, out, async_save=async_save)
        if proc.returncode != 0:
            raise SystemExit(f"reference run failed:\n{proc.stderr[-3000:]}")
        reference[async_save] = weights_hash(out)
    if reference[False] != reference[True]:
        raise SystemExit("sync and async uninterrupted runs differ")
    rng = random.Random(args.seed)
    rows, totals = [], {"identical": 0, "resumes": 0, "resumes_ok": 0, "corrupt": 0, "killed": 0}
    for i in range(args.points):
        label, fault, async_save = pick(rng, i)
        out = work / "runs" / f"point_{i:02d}"
        first = run(work, out, fault=fault, async_save=async_save)
        killed = first.returncode != 0
        totals["killed"] += killed
        resumes, skipped = 0, []
        while weights_hash(out) is None and resumes < 3:
            resume = "true" if list(out.glob("step_*/COMPLETE")) else "false"
            proc = run(work, out, f"resume_from_checkpoint={resume}", async_save=async_save)
            resumes += 1
            totals["resumes"] += 1
            totals["resumes_ok"] += proc.returncode == 0
            skipped += re.findall(r"skipping (step_\d+ \([^)]*\)+)", proc.stdout + proc.stderr)
        totals["corrupt"] += len(skipped)
        same = weights_hash(out) == reference[async_save]
        totals["identical"] += same
        rows.append([i, label, "async" if async_save else "sync", "yes" if killed else "no (finished first)",
                     resumes, "; ".join(skipped) or "-", "identical" if same else "MISMATCH"])
    print(table(["point", "kill", "saves", "killed", "resumes", "checkpoints skipped (why)", "final weights"], rows))
    print(f"\n{totals['identical']}/{args.points} identical to the uninterrupted run; {totals['killed']} kills landed; "
          f"{totals['resumes_ok']}/{totals['resumes']} resumes succeeded; {totals['corrupt']} damaged checkpoints "
          "found and skipped" + ("" if totals["identical"] == args.points else " -- FAILED"))
    if totals["identical"] != args.points:
        raise SystemExit(1)


if __name__ == "__main__":
    main()

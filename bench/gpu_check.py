"""One-command check of a new GPU node (390 s on one H200 with four throughput variants; the default runs three): the tiny model trained on
CUDA in bf16 with async checkpoints, a resume compared step by step with the uninterrupted run,
``gdt-tune evaluate`` on CUDA in bf16 and fp32, the evaluation engine (``bench/eval_speed.py``:
event scoring and 10-draw forecasting, old vs new, 8B layer shapes), and the Llama-3.1-8B-shape throughput of our recipe
against torchtune's stock recipe (and our activation-checkpointing and float8 options), with
peak memory, on 8,192-token samples and on GDT-shaped ones (lengths 1k-8k, answer-only labels:
stock, ours, ours with float8, with packed rows and with both, at full depth; and a GDT cohort whose
samples share their histories: stock vs shared-prefix rows), printed as tables::

    bash bench/gpu_check.sh                        # = python bench/gpu_check.py
    python bench/gpu_check.py --layers 16 --variants stock:compile+ac,ours:compile+ac

On a machine without a GPU it runs the same pipeline on CPU with the tiny model (a smoke test).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RECIPE, REPO, TINY_CONFIG, command_line, launch, machine, table  # noqa: E402
from gpu_throughput import HEADERS, run_variants  # noqa: E402

GPU_VARIANTS = "stock:compile,ours:compile,ours:compile+f8"  # add ours:compile+op, ...: about 70 s each
#: the real job's shape (lengths 1k-8k, answer-only labels, full depth): stock, ours, float8, packed rows
SPREAD_VARIANTS = {True: "stock:compile,ours:compile,ours:compile+f8,ours:compile+pack,ours:compile+pack+f8",
                   False: "stock:plain,ours:plain,ours:pack"}
#: a GDT cohort (a patient's samples share their history): stock against shared-prefix rows
TREE_VARIANTS = {True: "stock:compile,ours:compile+tree,ours:compile+tree+f8", False: "stock:plain,ours:tree"}


def losses(rows: list[dict]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def tiny_run_and_resume(work: Path, cuda: bool, steps: int) -> list[list]:
    """Train the tiny model ``steps`` steps with async saves at steps/2, resume from there into a
    new output_dir, and compare the losses of the second half step by step."""
    from gdt_tune.cli.demo_assets import prepare_demo

    demo = prepare_demo(work / "demo")
    half = steps // 2
    base = [f"demo_dir={demo}", f"max_steps_per_epoch={steps}", f"save_every_n_steps={half}",
            "keep_last_n_checkpoints=2", "async_checkpointing=true", f"run_val_every_n_steps={half}"]
    if cuda:
        base += ["device=cuda", "dtype=bf16", "optimizer.fused=true"]
    full, resumed = work / "tiny_full", work / "tiny_resumed"
    for d in (full, resumed):
        shutil.rmtree(d, ignore_errors=True)
    rows = []
    t0 = time.time()
    a = launch(RECIPE, TINY_CONFIG, [*base, f"output_dir={full}"], full / "logs", nproc=1)
    saved = sorted(p.name for p in full.iterdir() if p.name.startswith(("step_", "epoch_")))
    ok = f"step_{half}" in saved and f"step_{steps}" in saved and "epoch_0" in saved
    rows.append(["tiny run, async saves", "pass" if ok else "FAIL",
                 f"{steps} steps in {time.time() - t0:.0f} s; loss {losses(a['rows'])[1]:.3f} -> "
                 f"{losses(a['rows'])[steps]:.3f}; wrote {', '.join(saved)}"])
    b = launch(RECIPE, TINY_CONFIG, [*base, f"output_dir={resumed}", f"resume_from_checkpoint={full / f'step_{half}'}"],
               resumed / "logs", nproc=1)
    la, lb = losses(a["rows"]), losses(b["rows"])
    second = list(range(half + 1, steps + 1))
    diff = max((abs(la[s] - lb[s]) for s in second if s in lb), default=float("nan"))
    same = sorted(lb) == second and diff == 0.0
    rows.append([f"resume from step_{half}", "pass" if same else "FAIL",
                 f"steps {second[0]}..{second[-1]}: max abs loss difference {diff:.3g} (bit-identical: {same})"])
    return rows


def evaluate_rows(work: Path, cuda: bool) -> list[list]:
    """``gdt-tune evaluate`` of the tiny run's epoch_0 in each dtype."""
    rows, brier = [], {}
    for dtype in ("bf16", "fp32"):
        out = work / f"eval_{dtype}"
        cmd = [sys.executable, "-m", "gdt_tune.cli.main", "evaluate", "--checkpoint", str(work / "tiny_full" / "epoch_0"),
               "--data", str(work / "demo" / "data" / "test"), "--out", str(out), "--max-samples", "8",
               "--samples", "1", "--device", "cuda" if cuda else "cpu", "--dtype", dtype]
        t0 = time.time()
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=dict(os.environ, TIKTOKEN_CACHE_DIR=""))
        if proc.returncode != 0:
            rows.append([f"evaluate {dtype}", "FAIL", proc.stderr.strip().splitlines()[-1][:120]])
            continue
        metrics = json.loads((out / "metrics.json").read_text())
        brier[dtype] = metrics["events"]["brier"]
        rows.append([f"evaluate {dtype}", "pass", f"{time.time() - t0:.0f} s; {metrics['events']['tasks']} event tasks, "
                     f"Brier {brier[dtype]:.4f}, forecast unparseable {metrics['forecasting']['unparseable_share']:.2f}"])
    if len(brier) == 2:
        close = abs(brier["bf16"] - brier["fp32"]) < 0.02
        rows.append(["evaluate bf16 vs fp32", "pass" if close else "FAIL",
                     f"abs Brier difference {abs(brier['bf16'] - brier['fp32']):.4f} (< 0.02)"])
    return rows


#: bench/eval_speed.py arguments: the 8B layer shapes on a GPU, the smallest settings on CPU
EVAL_SPEED_ARGS = {True: ["--device", "cuda", "--dtype", "bf16", "--dim", "4096", "--layers", "8", "--heads", "32",
                          "--kv-heads", "8", "--intermediate", "14336", "--vocab", "128256", "--max-new", "64"],
                   False: ["--budget", "1500", "--samples", "2", "--draws", "2", "--max-new", "4", "--dim", "64",
                           "--layers", "1"]}


def eval_engine_rows(work: Path, cuda: bool) -> list[list]:
    """``bench/eval_speed.py``: event scoring and forecast generation, old vs new, its table printed."""
    proc = subprocess.run([sys.executable, "bench/eval_speed.py", "--work", str(work / "eval_speed"),
                           *EVAL_SPEED_ARGS[cuda]], cwd=REPO, capture_output=True, text=True,
                          env=dict(os.environ, TIKTOKEN_CACHE_DIR=""))
    if proc.returncode != 0:
        return [["eval engine", "FAIL", (proc.stderr.strip().splitlines() or ["?"])[-1][:120]]]
    print(f"## evaluation engine\n\n{proc.stdout}", flush=True)
    ratios = [line for line in proc.stdout.splitlines() if " new / old: " in line]
    return [["eval engine", "pass", "; ".join(ratios)]]


def _section(name: str, fn, *args) -> list[list]:
    """Run one section; a failure becomes a FAIL row (its output tail goes to stderr) and the
    next sections still run."""
    try:
        return fn(*args)
    except Exception as e:  # a check tool reports every failure and goes on
        print(f"{name} failed:\n{str(e)[-4000:]}", file=sys.stderr, flush=True)
        return [[name, "FAIL", str(e).strip().splitlines()[-1][:120] if str(e).strip() else type(e).__name__]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="/tmp/gdt_gpu_check")
    ap.add_argument("--layers", type=int, default=8, help="layers of the 8B shape in the fixed-length throughput runs")
    ap.add_argument("--spread-layers", type=int, default=None, help="layers of the 8B shape on GDT-shaped samples "
                    "(default: all 32; it fits one H200 without activation checkpointing)")
    ap.add_argument("--steps", type=int, default=40, help="steps of each throughput run")
    ap.add_argument("--tiny-steps", type=int, default=40)
    ap.add_argument("--variants", default=None, help=f"throughput variants (default on GPU: {GPU_VARIANTS})")
    ap.add_argument("--skip", default="", help="comma list of sections to skip: tiny, evaluate, engine, throughput, "
                    "spread, tree")
    args = ap.parse_args()
    import torch

    cuda = torch.cuda.is_available()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    print(f"# GPU check\n\nmachine: {machine()}\ncommand: `{command_line()}`\n", flush=True)
    started, checks = time.time(), []
    if "tiny" not in skip:
        checks += _section("tiny run and resume", tiny_run_and_resume, work, cuda, args.tiny_steps)
        print(table(["check", "result", "detail"], checks) + "\n", flush=True)
    if "evaluate" not in skip and (work / "tiny_full" / "epoch_0").is_dir():
        checks += _section("evaluate", evaluate_rows, work, cuda)
        print(table(["check", "result", "detail"], checks[-3:]) + "\n", flush=True)
    if "engine" not in skip:
        checks += _section("eval engine", eval_engine_rows, work, cuda)
    if "throughput" not in skip:
        variants = (args.variants or (GPU_VARIANTS if cuda else "stock:plain,ours:plain")).split(",")
        header, rows = run_variants("8b" if cuda else "tiny", variants, work / "throughput", 8192 if cuda else 2048,
                                    args.steps, nproc=1, layers=args.layers if cuda else None, lr=1e-6)
        print(f"## throughput\n\n{header}; learning rate 1e-6\n\n{table(HEADERS, rows)}\n", flush=True)
        checks += [[f"throughput {r[0]}", "FAIL" if r[1] == "failed" else "pass", r[-1] if r[1] == "failed" else ""]
                   for r in rows]
    for section, lengths, variants in (("spread", "spread", SPREAD_VARIANTS), ("tree", "gdt", TREE_VARIANTS)):
        if section in skip:
            continue
        header, rows = run_variants("8b" if cuda else "tiny", variants[cuda].split(","), work / "throughput",
                                    8192 if cuda else 2048, args.steps, nproc=1,
                                    layers=args.spread_layers if cuda else None, lr=1e-6, lengths=lengths)
        print(f"## throughput on {'GDT-shaped samples' if section == 'spread' else 'a GDT cohort'}\n\n{header}; "
              f"learning rate 1e-6\n\n{table(HEADERS, rows)}\n", flush=True)
        checks += [[f"{section} {r[0]}", "FAIL" if r[1] == "failed" else "pass", r[-1] if r[1] == "failed" else ""]
                   for r in rows]
    failed = [c[0] for c in checks if c[1] != "pass"]
    print(f"## summary\n\n{table(['check', 'result', 'detail'], checks)}\n\n"
          f"{len(checks) - len(failed)} passed, {len(failed)} failed in {time.time() - started:.0f} s")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

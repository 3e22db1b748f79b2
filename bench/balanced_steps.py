"""Length-balanced steps on the real job's shape: GDT-style samples with spread lengths (synthetic
cohorts at several history budgets, answer-only labels), 2 CPU ranks, one sample per rank: the
recipe's step time in a random order vs with ``balanced_steps: true``, as a ratio in one run.

    python bench/balanced_steps.py                  # 60 steps, 2 runs of each, about 2 min
    python bench/balanced_steps.py --steps 10 --repeat 2   # the CI version (bench/smoke.py)

Step time = median wall-clock gap between consecutive logged steps after the first 4 (each rank
waits for the other in FSDP's collectives, so a step takes as long as its longer sample); the best
of ``--repeat`` interleaved runs. ``rank_balance`` is the recipe's own log (mean over ranks of
each rank's FLOPs / the busiest rank's).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RECIPE, TINY_CONFIG, command_line, demo_tokenizer, launch, machine, median, step_gaps, table  # noqa: E402

#: The synthetic generator's token budgets (its estimate): histories from short to the tiny model's cap.
BUDGETS = (150, 450, 900, 1400, 1900)


def spread_data(work: Path) -> list[str]:
    """Training folders of one synthetic cohort per budget (their lengths together spread widely)."""
    from gdt_tune.data.synthetic import write_cohort

    folders = []
    for i, budget in enumerate(BUDGETS):
        out = work / "spread" / f"budget_{budget}"
        if not (out / "train").is_dir():
            write_cohort(out, n_patients=12, seed=100 + i, splits_per_lot=4, token_budget=budget)
        folders.append(str(out / "train"))
    return folders


def run(work: Path, name: str, folders: list[str], steps: int, r: int, *order: str) -> dict:
    out = work / name
    overrides = [f"demo_dir={work / 'demo'}", f"output_dir={out}", f"max_steps_per_epoch={steps}", "epochs=1",
                 "run_val_every_n_steps=null", "dataset_val=null", "save_every_n_steps=null",
                 "overwrite_output_dir=true", f"dataset.data_files=[{','.join(folders)}]", *order]
    res = launch(RECIPE, TINY_CONFIG, overrides, out / f"logs_{r}")
    gaps = step_gaps(res["rows"], after=4)
    balance = [row["rank_balance"] for row in res["rows"] if "rank_balance" in row]
    return {"step_s": median(gaps), "balance": sum(balance) / len(balance)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="/tmp/gdt_bench_balanced", help="scratch folder")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--repeat", type=int, default=2, help="runs of each order, interleaved; the best is reported")
    args = ap.parse_args()
    work = Path(args.work)
    demo_tokenizer(work)  # prepares work/demo: tiny model and tokenizer
    folders = spread_data(work)
    print(f"# balanced steps benchmark\n\nmachine: {machine()}\ncommand: `{command_line()}`\n"
          f"config: configs/tiny_gdt_cpu.yaml (fp32, batch 1 per rank, 2 CPU ranks), {args.steps} steps, synthetic "
          f"cohorts at history budgets {', '.join(map(str, BUDGETS))} (answer-only labels)\n")
    orders = {"random": (), "balanced": ("balanced_steps=true", "balance_group=2")}
    results = {name: [] for name in orders}
    for r in range(args.repeat):  # interleaved, so that drifts in machine speed hit both alike
        for name, extra in orders.items():
            results[name].append(run(work, name, folders, args.steps, r, *extra))
    best = {name: min(rs, key=lambda x: x["step_s"]) for name, rs in results.items()}
    print(table(["order", "ms/step (median)", "rank_balance (mean)"],
                [[name, b["step_s"] * 1000, b["balance"]] for name, b in best.items()]))
    print(f"\nbalanced / random time per step: {best['balanced']['step_s'] / best['random']['step_s']:.3f}x")


if __name__ == "__main__":
    main()

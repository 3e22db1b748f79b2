"""Recipe overhead: time per optimizer step of gdt_tune's recipe vs torchtune's stock
``full_finetune_distributed`` (CPU workarounds in bench/stock_full_finetune_cpu.py), same tiny
model, same data, same settings, 2 CPU ranks, no checkpoints or validation inside the timed steps.

    python bench/recipe_step.py                 # 80 steps, 3 runs each, about 2 min
    python bench/recipe_step.py --steps 20      # a quick look

Step time = median wall-clock gap between consecutive logged steps after the first 10; the
best of ``--repeat`` interleaved runs. The stock recipe's tokens/s counts label tokens only.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    RECIPE,
    TINY_CONFIG,
    command_line,
    demo_tokenizer,
    launch,
    machine,
    median,
    step_gaps,
    table,
)

STOCK = "bench/stock_full_finetune_cpu.py"


def run(recipe: str, work: Path, name: str, steps: int, r: int) -> dict:
    out = work / name
    shutil.rmtree(out, ignore_errors=True)  # a fresh folder per run: repeats and later invocations alike
    common = [f"demo_dir={work / 'demo'}", f"output_dir={out}", f"max_steps_per_epoch={steps}", "epochs=1",
              "run_val_every_n_steps=null", "dataset_val=null", "save_every_n_steps=null", "shuffle=true"]
    if recipe == STOCK:  # it ignores our checkpoint and validation keys
        common += ["optimizer_in_bwd=false", "enable_activation_offloading=false"]
    res = launch(recipe, TINY_CONFIG, common, out / f"logs_{r}")
    gaps = step_gaps(res["rows"], after=10)
    tps = [row.get("tokens_per_second_per_device", row.get("tokens_per_second_per_gpu")) for row in res["rows"]
           if row["step"] > 10 and "loss" in row]
    return {"step_s": median(gaps), "tokens_per_s": median([t for t in tps if t is not None]),
            "wall": res["ended"] - res["launched"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="/tmp/gdt_bench_recipe", help="scratch folder")
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--repeat", type=int, default=3, help="runs of each recipe, interleaved; the best is reported")
    args = ap.parse_args()
    work = Path(args.work)
    demo_tokenizer(work)  # prepares work/demo: tiny model, tokenizer, data
    print(f"# recipe step benchmark\n\nmachine: {machine()}\ncommand: `{command_line()}`\n"
          f"config: configs/tiny_gdt_cpu.yaml (0.2M parameters, fp32, batch 1 per rank, demo samples), "
          f"{args.steps} steps, 2 CPU ranks (gloo)\n")
    results = {RECIPE: [], STOCK: []}
    for r in range(args.repeat):  # interleaved, so that drifts in machine speed hit both alike
        for recipe in results:
            results[recipe].append(run(recipe, work, "ours" if recipe == RECIPE else "stock", args.steps, r))
    ours, stock = (min(results[k], key=lambda x: x["step_s"]) for k in (RECIPE, STOCK))
    rows = [[name, r["step_s"] * 1000, 1 / r["step_s"], r["tokens_per_s"], r["wall"]]
            for name, r in (("gdt_tune full_finetune_fsdp_ckpt", ours), ("torchtune full_finetune_distributed", stock))]
    print(table(["recipe", "ms/step (median)", "steps/s", "tokens/s/rank (median)", "wall s (whole run)"], rows))
    print(f"\nours / stock time per step: {ours['step_s'] / stock['step_s']:.3f}x (target <= 1.05x)")


if __name__ == "__main__":
    main()

"""One epoch of the demo cohort with each way of filling a row, over the same samples and seed: one
sample a row (GDT's layout), packed rows (``packing``) and shared-prefix rows (``share_prefixes``). A
packed step holds several samples, so an epoch has fewer optimizer steps at the same learning rate;
this shows what that does to the validation loss, beside the tokens each layout trains::

    python bench/row_layouts.py                  # rows of 4096 tokens, 2 CPU processes, the whole epoch
    python bench/row_layouts.py --max-steps 3    # the smoke test's settings
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RECIPE, TINY_CONFIG, command_line, launch, machine, table  # noqa: E402

LAYOUTS = {"one sample a row": [], "packed": ["packing=true"], "shared prefixes": ["packing=true", "share_prefixes=true"]}


def last(rows: list[dict], key: str):
    values = [r[key] for r in rows if key in r]
    return values[-1] if values else ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="/tmp/gdt_bench_row_layouts")
    ap.add_argument("--row", type=int, default=4096, help="tokens a row holds (dataset.max_seq_len; default 4096)")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--max-steps", type=int, default=None, help="stop each epoch after this many steps")
    args = ap.parse_args()
    from gdt_tune.cli.demo_assets import prepare_demo

    work = Path(args.work)
    demo = prepare_demo(work / "demo")
    base = [f"demo_dir={demo}", f"model.max_seq_len={args.row}", f"dataset.max_seq_len={args.row}",
            f"dataset_val.max_seq_len={args.row}", f"max_steps_per_epoch={args.max_steps or 'null'}",
            "run_val_every_n_steps=null", "save_every_n_steps=null", "val_metrics_samples=13"]
    rows = []
    for name, layout in LAYOUTS.items():
        out = work / "runs" / name.replace(" ", "_")
        shutil.rmtree(out, ignore_errors=True)
        started = time.time()
        res = launch(RECIPE, TINY_CONFIG, [*base, f"output_dir={out}", *layout], out / "logs", nproc=args.nproc)
        logged = res["rows"]
        steps = max(r["step"] for r in logged if "loss" in r)
        trained, sharing = last(logged, "tokens_seen"), last(logged, "prefix_sharing")
        rows.append([name, steps, last(logged, "samples_per_row") or 1.0, f"{int(trained):,}",
                     f"{sharing:.2f}x" if sharing else "1.00x", last(logged, "val_loss"),
                     last(logged, "val_loss_forecasting"), last(logged, "val_loss_events"),
                     last(logged, "val_events_auroc"), f"{time.time() - started:.0f}"])
    print(f"# Row layouts on the demo cohort\n\nmachine: {machine()}\ncommand: `{command_line()}`\n"
          f"the demo cohort's training split (404 samples of about 1.2k tokens, 48 patients), rows of {args.row} "
          f"tokens, {args.nproc} processes x batch 1, the tiny config's learning rate (constant), seed 42; "
          "validation of the 13 validation samples after the last step\n")
    print(table(["layout", "optimizer steps", "samples per row (last log)", "tokens trained", "prefix sharing",
                 "val_loss", "val_loss_forecasting", "val_loss_events", "val_events_auroc", "seconds"], rows))


if __name__ == "__main__":
    main()

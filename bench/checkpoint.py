"""Interim checkpoint cost: training time blocked per save (sync vs async), start-up time fresh vs
resumed, and size on disk, with a Llama-3-shaped model of about 115M parameters on 2 CPU ranks.

    python bench/checkpoint.py            # about 6 min
    python bench/checkpoint.py --tiny     # the demo's 0.2M-parameter model, a quick look

"Blocked" is the time ``CheckpointManager.save`` holds the training loop (the recipe logs it as
``checkpoint_blocked_seconds``). "Launch to first step" runs from starting ``tune run`` to the
first logged step (so it includes that step; the step time is shown beside it).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RECIPE, TINY_CONFIG, command_line, demo_tokenizer, launch, machine, median, step_times, table  # noqa: E402

MODEL_115M = dict(vocab_size=16384, num_layers=6, num_heads=16, num_kv_heads=4, embed_dim=1024, max_seq_len=2048,
                  intermediate_dim=3584, norm_eps=1e-5, rope_base=500000.0)


def prepare(work: Path, dims: dict) -> Path:
    """A model folder: random weights of shape ``dims`` in HF format + the demo tokenizer."""
    from gdt_tune.cli.demo_assets import write_model

    model = work / f"model_{dims['num_layers']}x{dims['embed_dim']}_{dims['vocab_size']}"
    if not (model / "model.safetensors").exists():
        write_model(model, seed=0, dims=dims)
        for name in ("tokenizer.model", "special_tokens.json"):
            shutil.copy(work / "demo" / "model" / name, model / name)
    return model


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="/tmp/gdt_bench_ckpt", help="scratch folder")
    ap.add_argument("--tiny", action="store_true", help="the demo's tiny model instead of the 115M one")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--every", type=int, default=2)
    args = ap.parse_args()
    work = Path(args.work)
    demo_tokenizer(work)
    from gdt_tune.cli.demo_assets import TINY_MODEL

    dims = TINY_MODEL if args.tiny else MODEL_115M
    model = prepare(work, dims)
    data = work / "short"
    if not data.exists():
        from gdt_tune.data.synthetic import write_cohort

        write_cohort(data, 40, seed=0, splits_per_lot=4, token_budget=150)
    import torch
    from torchtune.models.llama3 import llama3

    with torch.device("meta"):
        n_params = sum(p.numel() for p in llama3(**dims).parameters())
    print(f"# checkpoint benchmark\n\nmachine: {machine()}\ncommand: `{command_line()}`\n"
          f"model: Llama 3 shape {dims} = {n_params / 1e6:.1f}M parameters, fp32, AdamW; 2 CPU ranks; "
          f"{args.steps} steps, a save every {args.every}; synthetic samples with history trimmed to about 500 tokens\n")
    base = [f"demo_dir={work / 'demo'}", f"checkpointer.checkpoint_dir={model}", "dataset_val=null",
            "run_val_every_n_steps=null", f"dataset.data_files={data / 'train'}", "dataset.max_seq_len=1024", f"max_steps_per_epoch={args.steps}",
            "keep_last_n_checkpoints=2", *[f"model.{k}={v}" for k, v in dims.items()]]
    runs, rows = {}, []
    for mode in ("sync", "async"):
        out = work / mode
        shutil.rmtree(out, ignore_errors=True)
        res = launch(RECIPE, TINY_CONFIG, [*base, f"output_dir={out}", f"save_every_n_steps={args.every}",
                                           f"async_checkpointing={mode == 'async'}"], out / "logs")
        times = step_times(res["rows"])
        blocked = [r["checkpoint_blocked_seconds"] for r in res["rows"] if "checkpoint_blocked_seconds" in r]
        saves = {r["step"] for r in res["rows"] if "checkpoint_blocked_seconds" in r}
        gaps = {s: times[s] - times[s - 1] for s in times if s - 1 in times}
        plain = [g for s, g in gaps.items() if s - 1 not in saves]
        after = [g - b for s, g in gaps.items() for r in res["rows"] if s - 1 in saves
                 and r["step"] == s - 1 and (b := r.get("checkpoint_blocked_seconds")) is not None]
        runs[mode] = {"res": res, "blocked": blocked, "first": times[min(times)] - res["launched"],
                      "step": median(plain), "out": out}
        rows.append([mode, len(blocked), median(blocked), max(blocked), median(plain), median(after)])
    print("## training blocked per interim save\n")
    print(table(["mode", "saves", "blocked s (median)", "blocked s (max)", "step s (no save before)",
                 "step s right after a save (minus blocked)"], rows))
    ratio = median(runs["async"]["blocked"]) / median(runs["sync"]["blocked"])
    print(f"\nasync blocked / sync blocked: {ratio:.1%} (target <= 10%)\n")

    start = args.steps - args.every
    out = work / "resumed"
    shutil.rmtree(out, ignore_errors=True)
    res = launch(RECIPE, TINY_CONFIG, [*base, f"output_dir={out}", "save_every_n_steps=null",
                                       f"resume_from_checkpoint={runs['sync']['out'] / f'step_{start}'}"], out / "logs")
    times = step_times(res["rows"])
    resumed_first = times[min(times)] - res["launched"]
    fresh_first = runs["sync"]["first"]
    print("## launch to first step\n")
    print(table(["start", "launch to first logged step s", "of which one step s"],
                [["fresh (HF weights)", fresh_first, runs["sync"]["step"]],
                 [f"resumed from step_{start}", resumed_first, runs["sync"]["step"]]]))
    print(f"\nresumed / fresh: {resumed_first / fresh_first:.2f}x (target <= 1.2x)\n")

    read = re.search(r"weights: read ([\d.]+) MB of HF weights on rank 0 only", runs["sync"]["res"]["stdout"])
    size = du(model) / 2**20
    print("## HF weights read at a fresh start\n")
    print(table(["what", "MB"], [["HF checkpoint on disk (safetensors + config + tokenizer)", size],
                                 ["bytes read from the checkpoint per node (2 ranks; rank 0 reads, the shards are "
                                  "scattered)", float(read.group(1)) if read else "not logged"],
                                 ["before: every rank read it", 2 * float(read.group(1)) if read else "n/a"]]))
    print()

    step_dir = runs["sync"]["out"] / f"step_{args.steps}"
    hf = du(runs["sync"]["out"] / "epoch_0")
    listing = subprocess.run(["ls", "-la", str(step_dir)], capture_output=True, text=True).stdout
    print("## size on disk\n")
    print(table(["what", "MB"], [[f"interim checkpoint step_{args.steps} (model + AdamW state, sharded)",
                                  du(step_dir) / 2**20], ["final HF checkpoint epoch_0 (model only)", hf / 2**20]]))
    print(f"\n```\n{listing.strip()}\n```")


if __name__ == "__main__":
    main()

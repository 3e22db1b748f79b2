"""``gdt-tune`` command line: prepare-demo and demo."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
RECIPE = Path(__file__).resolve().parent / "recipes" / "full_finetune_fsdp_ckpt.py"
DEMO_CONFIG = REPO_ROOT / "configs" / "tiny_gdt_cpu.yaml"


def _prepare_demo(args) -> int:
    from gdt_tune.demo_assets import prepare_demo

    root = prepare_demo(args.dir, seed=args.seed)
    print(f"demo assets ready in {root}: data/ (synthetic patients), model/ (tiny Llama 3, HF format + tokenizer)")
    return 0


def demo_command(demo_dir: Path, steps: int, nproc: int, extra: list[str]) -> list[str]:
    """The ``tune run`` command line that `gdt-tune demo` launches, from the repository root
    (`tune run` imports a recipe file as a module relative to the working directory)."""
    return ["tune", "run", "--nproc_per_node", str(nproc), str(RECIPE.relative_to(REPO_ROOT)), "--config", str(DEMO_CONFIG),
            f"demo_dir={demo_dir}", f"max_steps_per_epoch={steps}", *extra]


def _demo(args) -> int:
    from gdt_tune.demo_assets import prepare_demo

    if not DEMO_CONFIG.is_file():
        print(f"error: {DEMO_CONFIG} not found; run gdt-tune demo from a source checkout (pip install -e .)",
              file=sys.stderr)
        return 2
    demo_dir = Path(args.dir).resolve()
    prepare_demo(demo_dir)
    cmd = demo_command(demo_dir, args.steps, args.nproc, args.overrides)
    print(f"+ (cd {REPO_ROOT} && {' '.join(cmd)})", flush=True)
    # tiktoken caches tokenizer files by path; the demo tokenizer may be rebuilt at the same path.
    env = dict(os.environ, TIKTOKEN_CACHE_DIR="")
    rc = subprocess.call(cmd, env=env, cwd=REPO_ROOT)
    if rc == 0:
        run = demo_dir / "run"
        print(f"\ndone. logs: {run / 'logs'}  interim checkpoints: {run}/step_*  final HF checkpoint: {run / 'epoch_0'}")
    return rc


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="gdt-tune", description="Train GDT-style clinical digital-twin models with torchtune.")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare-demo", help="write a synthetic cohort, a tiny tokenizer and a tiny HF Llama 3 model")
    p.add_argument("--dir", default=".gdt_demo", help="output directory (default .gdt_demo)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_prepare_demo)
    d = sub.add_parser("demo", help="prepare the demo assets if missing and train the tiny model on 2 CPU processes")
    d.add_argument("--dir", default=".gdt_demo", help="demo directory (default .gdt_demo)")
    d.add_argument("--steps", type=int, default=150, help="optimizer steps (default 150)")
    d.add_argument("--nproc", type=int, default=2, help="CPU processes (default 2)")
    d.add_argument("overrides", nargs="*", help="extra config overrides, key=value")
    d.set_defaults(func=_demo)
    args = ap.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

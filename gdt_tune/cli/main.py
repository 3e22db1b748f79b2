"""``gdt-tune`` command line: train, cp, prepare-demo, demo, evaluate, data-report, export, plot-run."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import time
from pathlib import Path

from gdt_tune.runtime.errors import OneLineError, one_line
from gdt_tune.runtime.redact import redacted_argv

PACKAGE = Path(__file__).resolve().parents[1]  # gdt_tune/
CONFIGS = PACKAGE / "configs"  # shipped inside the package; configs/ in a checkout links here
RECIPE = PACKAGE / "recipes" / "full_finetune_fsdp_ckpt.py"
RECIPE_MODULE = "gdt_tune.recipes.full_finetune_fsdp_ckpt"
DEMO_CONFIG = CONFIGS / "tiny_gdt_cpu.yaml"
#: torchrun options that choose the rendezvous themselves (else a single node runs --standalone)
_RENDEZVOUS = ("--nnodes", "--rdzv", "--master", "--node_rank", "--node-rank", "--standalone")


TRAIN_EXAMPLES = """examples:
  gdt-tune train --nproc_per_node 8 --config llama3_1_8b_gdt_full model_dir=/models/llama data_dir=/data/gdt \\
      output_dir=/runs/gdt
  gdt-tune train --nproc_per_node 8 --config llama3_1_8b_gdt_full output_dir=/runs/gdt resume_from_checkpoint=true
  gdt-tune train --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HEAD:29500 --rdzv_id gdt \\
      --config my.yaml
torchrun options (python -m torch.distributed.run --help) go before --config, key=value overrides after it."""


def shipped_configs() -> list[str]:
    return sorted(p.stem for p in CONFIGS.glob("*.yaml"))


def resolve_config(name: str) -> Path:
    """A config file path, or the name of a shipped config (with or without .yaml)."""
    path = Path(name)
    if path.is_file():
        return path.resolve()
    shipped = CONFIGS / (name if name.endswith(".yaml") else f"{name}.yaml")
    if shipped.is_file():
        return shipped
    raise ValueError(f"--config {name}: no such file and no shipped config of that name; shipped: "
                     f"{', '.join(shipped_configs())} (or gdt-tune cp NAME DEST to edit a copy)")


def train_command(args: list[str]) -> list[str]:
    """``torchrun [launcher options] -m gdt_tune.recipes... --config FILE [key=value ...]`` for
    ``gdt-tune train [launcher options] --config NAME|FILE [key=value ...]``; runs from any folder."""
    args = [part for a in args for part in (a.split("=", 1) if a.startswith("--config=") else [a])]
    if "--config" not in args or args.index("--config") == len(args) - 1:
        raise ValueError("train needs --config NAME|FILE (shipped: " + ", ".join(shipped_configs()) + ")")
    i = args.index("--config")
    launcher, config, overrides = args[:i], resolve_config(args[i + 1]), args[i + 2:]
    bad = [a for a in overrides if not _is_override(a)]
    if bad:
        raise ValueError(f"train: {bad[0]!r} after --config is not a key=value or ~key override; put launcher "
                         "options (--nproc_per_node, --nnodes, ...) before --config")
    _parse_config(config, overrides)  # YAML that does not parse: one line here, not a traceback per rank
    _check_torchrun_options(launcher)
    if not any(a.startswith(_RENDEZVOUS) for a in launcher):
        launcher = ["--standalone", *launcher]
    return [sys.executable, "-m", "torch.distributed.run", *launcher, "-m", RECIPE_MODULE, "--config", str(config),
            *overrides]


def _is_override(arg: str) -> bool:
    """torchtune's command-line overrides: ``key=value``, and ``~key`` (removes the key)."""
    return "=" in arg or (arg.startswith("~") and len(arg) > 1 and not arg.startswith("~-"))


def _check_torchrun_options(launcher: list[str]) -> None:
    """torchrun's own parser on the launcher options: a bad one is one line, not its usage block."""
    from torch.distributed.run import get_args_parser

    parser = get_args_parser()

    def fail(message: str):
        raise ValueError(f"train: torchrun options before --config: {message}; see python -m torch.distributed.run "
                         "--help")

    parser.error = fail
    parser.parse_args([*launcher, "-m", RECIPE_MODULE])


def _run_training(cmd: list[str], command: str = "train") -> int:
    from gdt_tune.cli.launcher import run_training

    # tiktoken caches tokenizer files by path; the demo tokenizer may be rebuilt at the same path.
    return run_training(cmd, dict(os.environ, TIKTOKEN_CACHE_DIR=os.environ.get("TIKTOKEN_CACHE_DIR", "")), command)


def _train(args) -> int:
    if not args.args or args.args[0] in ("-h", "--help"):
        print(args.usage)
        return 0
    try:
        cmd = train_command(args.args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return _run_training(cmd)


def _cp(args) -> int:
    """Copy a shipped config (by name) or the recipe to DEST, like ``tune cp``."""
    source = RECIPE if args.what in ("recipe", RECIPE.stem) else None
    try:
        source = source or resolve_config(args.what)
    except ValueError as e:
        print(f"error: {e.args[0].replace('--config ', 'cp ')}", file=sys.stderr)
        return 2
    dest = Path(args.dest)
    if dest.is_dir():
        dest = dest / source.name
    if not dest.parent.is_dir():
        print(f"error: cp: {dest.parent} is not a folder; create it first or give another DEST", file=sys.stderr)
        return 2
    if dest.exists() and not args.force:
        print(f"error: {dest} exists; pass --force to overwrite", file=sys.stderr)
        return 2
    shutil.copyfile(source, dest)
    print(f"copied {source.name} to {dest}")
    return 0


def _prepare_demo(args) -> int:
    from gdt_tune.cli.demo_assets import prepare_demo

    root = prepare_demo(args.dir, seed=args.seed)
    print(f"demo assets ready in {root}: data/ (synthetic patients), model/ (tiny Llama 3, HF format + tokenizer)")
    return 0


def demo_command(demo_dir: Path, steps: int, nproc: int, extra: list[str]) -> list[str]:
    """The training command that `gdt-tune demo` launches (from any folder)."""
    # a demo run replaces the previous one: it moves to run/previous-<run id>-*/ (never deleted)
    return train_command(["--nproc_per_node", str(nproc), "--config", str(DEMO_CONFIG), f"demo_dir={demo_dir}",
                          f"max_steps_per_epoch={steps}", "overwrite_output_dir=true", *extra])


def _demo(args) -> int:
    from gdt_tune.cli.demo_assets import prepare_demo

    demo_dir = Path(args.dir).resolve()
    prepare_demo(demo_dir)
    try:
        cmd = demo_command(demo_dir, args.steps, args.nproc, args.overrides)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rc = _run_training(cmd)
    if rc == 0:
        from gdt_tune.eval.run_report import plot_run

        run = demo_dir / "run"
        plots, text = plot_run(run)
        print(f"\n{text}\n\ndone. training curves: {', '.join(map(str, plots))}  logs: {run / 'logs'}  interim checkpoints: {run}/step_*  "
              f"final HF checkpoint: {run / 'epoch_0'}")
    return rc


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line naming the option, and where the help is."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _at_least(minimum: int):
    """An argparse type: an integer >= ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= {minimum}")
        return value
    return parse


def _parse_config(path: Path, overrides: list[str]):
    """The config file merged with the ``key=value`` overrides; a file that is not YAML (a tab, an
    unclosed bracket) or an override that does not parse is one line naming it."""
    from omegaconf import OmegaConf

    def problem(error: Exception) -> str:
        return " ".join(str(error).split())[:240]

    try:
        cfg = OmegaConf.load(path)
    except Exception as e:  # yaml's scanner and parser errors, OmegaConf's
        raise ValueError(f"--config {path} is not valid YAML ({problem(e)}); fix that line (indent with spaces, "
                         "not tabs)") from None
    for override in (a for a in overrides if not a.startswith("~")):
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([override]))
        except Exception as e:
            shown = redacted_argv([override])[0]  # never an inline patient id list
            raise ValueError(f"override {shown!r} does not parse ({problem(e) if shown == override else 'redacted'}); "
                             "write key=value, a list as key=[a,b], a text with spaces in quotes") from None
    return cfg


def _load_config(path, overrides):
    if not path:
        return None
    from omegaconf import OmegaConf

    bad = [a for a in overrides if not _is_override(a)]
    if bad:
        raise ValueError(f"{bad[0]!r} is not a key=value or ~key config override")
    cfg = _parse_config(resolve_config(path), overrides)
    for key in (a[1:] for a in overrides if a.startswith("~")):  # torchtune's ~key: remove the key
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        if node is None or leaf not in node:
            raise ValueError(f"~{key}: the config has no key {key!r} to remove")
        if OmegaConf.is_dict(node[leaf]) and "_component_" in node[leaf]:  # as tune run
            raise ValueError(f"~{key}: a component cannot be removed; set {key}=null instead")
        node.pop(leaf)
    return cfg


def _export(args) -> int:
    from gdt_tune.cli.export import export_checkpoint

    try:
        out = export_checkpoint(args.checkpoint, args.out, _load_config(args.config, args.overrides),
                                replace=args.replace)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"exported {args.checkpoint} to {out}: load it with transformers.AutoModelForCausalLM / AutoTokenizer, "
          f"or serve it with vllm serve {out}")
    return 0


def _plot_run(args) -> int:
    from gdt_tune.eval.run_report import plot_run

    try:
        plots, text = plot_run(args.run_dir, args.out)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(text)
    print(f"\nwrote {', '.join(map(str, plots))} and {plots[0].with_name('summary.md')}")
    return 0


def evaluate_command(argv: list[str], nproc: int) -> list[str]:
    """``torchrun --standalone --nproc_per_node N -m gdt_tune.cli evaluate ...`` (without the
    ``--nproc_per_node`` option itself)."""
    rest, skip = [], False
    for a in argv:
        if skip or a.startswith("--nproc_per_node="):
            skip = False
            continue
        skip = a == "--nproc_per_node"
        if not skip:
            rest.append(a)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), "-m",
            "gdt_tune.cli", *rest]


def _evaluate(args) -> int:
    from gdt_tune.eval.evaluate import evaluate, summary

    if args.nproc_per_node > 1 and "LOCAL_RANK" not in os.environ:  # torchrun, its output as for train
        rc = _run_training(evaluate_command(args.argv, args.nproc_per_node), "evaluate")
        return rc if rc in (0, 129, 130, 143) else 1
    started = time.perf_counter()
    try:
        cfg = _load_config(args.config, args.overrides)
        metrics = evaluate(args.checkpoint, args.data, args.out, cfg=cfg, max_samples=args.max_samples,
                           train_data=args.train_data, samples=args.samples, batch_size=args.batch_size,
                           device=args.device, dtype=args.dtype, seed=args.seed, prompt=args.prompt,
                           train_samples=args.train_samples)
    except ValueError as e:
        if os.environ.get("RANK", "0") == "0":  # every rank fails alike: one line
            print(f"error: {e}", file=sys.stderr)
        return 1
    if metrics is None:  # not rank 0
        return 0
    print(summary(metrics))
    print(f"wrote {Path(args.out) / 'metrics.json'}, summary.md, predictions.jsonl, forecast_mae.png"
          + (", event_calibration.png" if metrics["events"].get("tasks") else ""))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    print(f"evaluated in {time.perf_counter() - started:.1f} s on {world} process{'es' if world > 1 else ''}")
    return 0


def _data_report(args) -> int:
    from gdt_tune.data.layout import DEFAULT_MAX_SEQ_LEN
    from gdt_tune.eval.data_report import data_report
    from gdt_tune.trained.prompting import load_tokenizer

    try:
        if not Path(args.tokenizer).is_file():
            raise ValueError(f"--tokenizer {args.tokenizer} is not a file; give the model's tokenizer.model")
        try:
            tokenizer = load_tokenizer(args.tokenizer, args.special_tokens)
        except ValueError as e:
            raise ValueError(f"--tokenizer {e}") from None
        data_report(args.data, tokenizer, args.out, max_seq_len=args.max_seq_len or DEFAULT_MAX_SEQ_LEN,
                    world_size=args.world_size)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print((Path(args.out) / "report.md").read_text())
    print(f"wrote {Path(args.out) / 'report.md'} and its plots")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """``gdt-tune``'s parser, every subcommand with its options (also read by the docs' command test)."""
    ap = _Parser(prog="gdt-tune", description="Train GDT-style clinical digital-twin models with torchtune.")
    sub = ap.add_subparsers(dest="command", required=True, parser_class=_Parser)
    t = sub.add_parser("train", help="run the recipe with torchrun from any folder: gdt-tune train [--nproc_per_node N "
                       "--nnodes ...] --config NAME|FILE [key=value ...]", prefix_chars="\0", add_help=False,
                       usage="gdt-tune train [torchrun options] --config NAME|FILE [key=value ...]",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=TRAIN_EXAMPLES)
    t.add_argument("args", nargs=argparse.REMAINDER, help="torchrun options, then --config NAME|FILE, then key=value "
                   f"overrides; shipped configs: {', '.join(shipped_configs())}")
    t.set_defaults(func=_train, usage=t.format_help())
    c = sub.add_parser("cp", help="copy a shipped config (or 'recipe') to edit it, like tune cp")
    c.add_argument("what", help=f"{', '.join(shipped_configs())} or recipe")
    c.add_argument("dest", help="file or folder")
    c.add_argument("--force", action="store_true", help="overwrite DEST")
    c.set_defaults(func=_cp)
    p = sub.add_parser("prepare-demo", help="write a synthetic cohort, a tiny tokenizer and a tiny HF Llama 3 model")
    p.add_argument("--dir", default=".gdt_demo", help="output directory (default .gdt_demo)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_prepare_demo)
    d = sub.add_parser("demo", help="prepare the demo assets if missing and train the tiny model on 2 CPU processes")
    d.add_argument("--dir", default=".gdt_demo", help="demo directory (default .gdt_demo)")
    d.add_argument("--steps", type=_at_least(1), default=150, help="optimizer steps (default 150)")
    d.add_argument("--nproc", type=_at_least(1), default=2, help="CPU processes (default 2)")
    d.add_argument("overrides", nargs="*", help="extra config overrides, key=value")
    d.set_defaults(func=_demo)
    e = sub.add_parser("evaluate", help="clinical-task metrics of a checkpoint on held-out samples")
    e.add_argument("--checkpoint", required=True, help="final HF folder (epoch_N) or interim step_N (needs --config)")
    e.add_argument("--data", required=True, help="held-out JSONL: a file, a glob or a folder")
    e.add_argument("--config", help="the training config (model, tokenizer, system prompt, training data)")
    e.add_argument("--out", default="eval", help="output folder (default eval)")
    e.add_argument("--max-samples", type=_at_least(1), default=None)
    e.add_argument("--train-data", help="training JSONL: clip bounds, censoring distribution and baselines (default: "
                   "the config's dataset)")
    e.add_argument("--train-samples", type=_at_least(1), default=20_000, help="read at most this many training "
                   "samples, the first ones (default 20000)")
    e.add_argument("--prompt", choices=["training", "gdt"], default="training", help="training: the exact training "
                   "layout (default); gdt: GDT's evaluation prompt (date lines, answer after a system header)")
    e.add_argument("--samples", type=_at_least(0), default=10, help="sampled completions per forecast, besides the "
                   "greedy one (default 10, as GDT)")
    e.add_argument("--batch-size", type=_at_least(1), default=4, help="samples per forward pass; forecasting "
                   "decodes batch x (1 + samples) rows from the batch's prompt caches (default 4)")
    e.add_argument("--nproc_per_node", type=_at_least(1), default=1, help="processes (torchrun), one device each; "
                   "the samples are split over them (default 1)")
    e.add_argument("--seed", type=int, default=0, help="seed of the sampled forecasts (default 0)")
    e.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    e.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default: bf16 on CUDA, fp32 on CPU")
    e.add_argument("overrides", nargs="*", help="config overrides, key=value (e.g. demo_dir=...)")
    e.set_defaults(func=_evaluate)
    x = sub.add_parser("export", help="an HF folder that serves with the training prompt (tokenizer.json, chat "
                       "template, generation_config.json) from epoch_N or step_N")
    x.add_argument("--checkpoint", required=True, help="final epoch_N, or interim step_N (needs --config)")
    x.add_argument("--out", required=True, help="output folder: new or empty (or an earlier export, with --replace)")
    x.add_argument("--replace", action="store_true", help="replace an earlier export in --out (only a folder "
                   "that gdt-tune export wrote)")
    x.add_argument("--config", help="the training config (name or file): model, tokenizer, system prompt")
    x.add_argument("overrides", nargs="*", help="config overrides, key=value")
    x.set_defaults(func=_export)
    pr = sub.add_parser("plot-run", help="loss.png, val_metrics.png and summary.md of a run from its DiskLogger logs")
    pr.add_argument("run_dir", help="the run's output_dir")
    pr.add_argument("--out", default=None, help="output folder (default: the run folder)")
    pr.set_defaults(func=_plot_run)
    r = sub.add_parser("data-report", help="counts, lengths, task mix and split overlap of a dataset (no text)")
    r.add_argument("--data", required=True, action="append", help="JSONL file, glob or folder; repeat for splits, "
                   "or a folder with train/validation/test")
    r.add_argument("--tokenizer", required=True, help="tokenizer.model of the model to train")
    r.add_argument("--special-tokens", help="special_tokens.json (default: beside the tokenizer, if there)")
    r.add_argument("--max-seq-len", type=_at_least(16), help="the samples' token cap (default: the training cap, "
                   "8000, DEFAULT_MAX_SEQ_LEN)")
    r.add_argument("--out", default="data_report", help="output folder (default data_report)")
    r.add_argument("--world-size", type=_at_least(1), default=8, help="ranks of the expected rank balance, random vs "
                   "length-balanced steps (default 8)")
    r.set_defaults(func=_data_report)
    return ap


class Stopped(Exception):
    """SIGTERM or SIGHUP to a tool (Slurm's preemption, a closed terminal): ended like Ctrl-C."""


def _stop(signum, frame):
    raise Stopped(signal.Signals(signum).name)


def main(argv=None) -> int:
    """Exit codes: 0, 1 (an ``error:`` line), 2 (a usage error), 130 / 143 / 129 (stopped by Ctrl-C,
    SIGTERM, SIGHUP: one line, no traceback; under ``gdt-tune``'s launcher the launcher says it)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    quiet = "GDT_LAUNCHER_PID" in os.environ or os.environ.get("RANK", "0") != "0"  # a rank: the launcher speaks
    old = {s: signal.signal(s, _stop) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        return args.func(args)
    except OneLineError as e:  # a full disk, among others
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, Stopped) as e:
        name = "SIGINT" if isinstance(e, KeyboardInterrupt) else str(e)
        if not quiet:
            from gdt_tune.cli.launcher import stopped_line

            how = "interrupted (Ctrl-C)" if name == "SIGINT" else f"stopped by {name}"
            print(f"error: {stopped_line(args.command, how)}", file=sys.stderr, flush=True)
        return 128 + signal.Signals[name].value
    finally:
        for s, handler in old.items():
            if signal.getsignal(s) is _stop:  # the launcher may have set its own for the job's end
                signal.signal(s, handler)


if __name__ == "__main__":
    sys.exit(main())

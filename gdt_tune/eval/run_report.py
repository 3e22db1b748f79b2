"""``gdt-tune plot-run RUN_DIR``: training curves and a one-screen summary from a run's DiskLogger
files (``RUN_DIR/logs/*.txt``), for runs without wandb::

    gdt-tune plot-run /runs/gdt     # writes loss.png, val_metrics.png (a panel per validation metric) and summary.md

The validation series (``val_loss_forecasting``, ``val_loss_events``, ``val_events_*``,
``val_metrics_seconds``) get a panel each and their last values in the summary.

Logs of a resumed run (one file per launch) are merged; a step logged twice keeps its last value.
"""

from __future__ import annotations

import re
from pathlib import Path

from gdt_tune.runtime.files import check_output_folder, write_atomically
from gdt_tune.training.step_dirs import final_dirs, list_checkpoints

_LINE = re.compile(r"^Step (\d+) \| (.*)$")


def read_logs(run_dir: Path) -> dict[str, dict[int, float]]:
    """``{metric: {step: value}}`` from every DiskLogger file of the run, oldest file first."""
    files = sorted((run_dir / "logs").glob("*.txt"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise ValueError(f"{run_dir}/logs holds no DiskLogger *.txt files; plot-run reads runs logged with "
                         "metric_logger._component_=torchtune.training.metric_logging.DiskLogger")
    metrics: dict[str, dict[int, float]] = {}
    for path in files:
        for line in path.read_text().splitlines():
            m = _LINE.match(line)
            if not m:
                continue
            for item in m.group(2).split():
                key, _, value = item.partition(":")
                try:
                    metrics.setdefault(key, {})[int(m.group(1))] = float(value)
                except ValueError:
                    continue
    return metrics


def smooth(values: list[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average, debiased (as TensorBoard's smoothing)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight ** i))
    return out


def validation_series(metrics: dict[str, dict[int, float]]) -> dict[str, dict[int, float]]:
    """The validation metrics besides ``val_loss``, in a fixed order (per-event AUROCs by name)."""
    first = ["val_loss_forecasting", "val_loss_events", "val_events_accuracy", "val_events_brier", "val_events_auroc",
             "val_events_cindex"]
    per_event = sorted(k for k in metrics if k.startswith("val_events_auroc_"))
    return {k: metrics[k] for k in [*first, *per_event, "val_metrics_seconds"] if metrics.get(k)}


def summary(run_dir: Path, metrics: dict[str, dict[int, float]]) -> list[tuple[str, str]]:
    loss, val = metrics.get("loss", {}), metrics.get("val_loss", {})
    last = sorted(loss)[-10:]
    tps, balance = metrics.get("tokens_per_second_per_device", {}), metrics.get("rank_balance", {})
    steps = [p for _, p, complete in list_checkpoints(run_dir) if complete]
    rows = [("steps logged", f"{min(loss)}..{max(loss)} ({len(loss)} values)" if loss else "none"),
            ("tokens seen", f"{int(max(metrics['tokens_seen'].values())):,}" if metrics.get("tokens_seen") else "n/a"),
            ("tokens/s per device (mean)", f"{sum(tps.values()) / len(tps):,.0f}" if tps else "n/a"),
            ("train loss, first -> mean of last 10", f"{loss[min(loss)]:.4f} -> {sum(loss[s] for s in last) / len(last):.4f}"
             if loss else "n/a"),
            ("validation loss, last", f"{val[max(val)]:.4f} at step {max(val)}" if val else "n/a"),
            *[(f"{name}, last", f"{values[max(values)]:.4f} at step {max(values)}")
              for name, values in validation_series(metrics).items()],
            ("rank balance (mean; 1.0: no rank waits)", f"{sum(balance.values()) / len(balance):.3f}" if balance else "n/a"),
            ("interim checkpoints", ", ".join(p.name for p in steps) or "none"),
            ("final checkpoints", ", ".join(p.name for p in final_dirs(run_dir)) or "none")]
    return rows


def plot_run(run_dir, out=None) -> tuple[list[Path], str]:
    """Write ``loss.png``, ``val_metrics.png`` (when the run logged validation metrics) and
    ``summary.md`` (into ``out``, default the run folder); return the plots' paths and the summary text."""
    from gdt_tune.eval.plots import loss_plot, panels_plot

    run_dir = Path(run_dir)
    out = Path(out) if out else run_dir
    check_output_folder(out, "--out" if out != run_dir else "plot-run: the run folder")
    metrics = read_logs(run_dir)
    if not metrics.get("loss"):
        raise ValueError(f"{run_dir}/logs has no 'loss' values yet")
    out.mkdir(parents=True, exist_ok=True)
    loss = metrics["loss"]
    steps = sorted(loss)
    loss_plot(steps, [loss[s] for s in steps], smooth([loss[s] for s in steps]), metrics.get("val_loss", {}),
              out / "loss.png")
    plots = [out / "loss.png"]
    if series := validation_series(metrics):
        panels_plot(series, out / "val_metrics.png")
        plots.append(out / "val_metrics.png")
    text = "\n".join([f"# run {run_dir}", "", "| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in summary(run_dir, metrics)]])
    write_atomically(out / "summary.md", text + "\n")
    return plots, text

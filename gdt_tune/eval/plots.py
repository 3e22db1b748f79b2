"""PNG plots of the evaluation and data reports (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

from gdt_tune.runtime.files import atomic_output

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def forecast_mae_plot(forecasting: dict, path: Path) -> None:
    """Per-variable MAE of the model (greedy, sampled mean) beside copy-forward."""
    rows = forecasting.get("per_variable", {})
    names = sorted(rows)
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(names) + 2), 4))
    width = 0.27
    from matplotlib.patches import Patch

    handles = []
    for k, (method, label) in enumerate((("greedy", "model, greedy"), ("sampled_mean", "model, sample mean"),
                                         ("copy_forward", "copy-forward"))):
        color = f"C{k}"
        for i, name in enumerate(names):
            x, value = i + (k - 1) * width, rows[name][f"mae_{method}"]
            if value is None:  # no parseable prediction: say so instead of drawing a zero-height bar
                ax.annotate("n/a", (x, 0), xytext=(0, 2), textcoords="offset points", ha="center", va="bottom",
                            fontsize=8, rotation=90, color=color)
            else:
                ax.bar(x, value, width, color=color)
        handles.append(Patch(color=color, label=label))
    ax.set_xlim(-1.5 * width - 0.2, max(len(names) - 1, 0) + 1.5 * width + 0.2)  # room for every n/a mark
    ax.set_xticks(range(len(names)), [n.split(" - ")[0] for n in names], rotation=30, ha="right")
    ax.set_ylabel("MAE")
    ax.set_title("Forecasting MAE per variable" if names else "Forecasting MAE (no forecasting tasks)")
    ax.legend(handles=handles)
    _save(fig, path)


def calibration_plot(events: dict, path: Path) -> None:
    """Reliability curve of P(not censored and occurred)."""
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect")
    cal = events.get("calibration", [])
    if cal:
        ax.plot([c["mean_predicted"] for c in cal], [c["observed"] for c in cal], "o-", label="model")
    ax.set_xlabel("predicted P(occurred)")
    ax.set_ylabel("observed frequency")
    ax.set_title(f"Event calibration ({events.get('tasks', 0)} tasks)")
    ax.legend()
    _save(fig, path)


def length_histogram(counts, edges, cap: int, path: Path) -> None:
    """Token-length histogram with the length cap marked."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(edges[:-1], counts, width=[b - a for a, b in zip(edges[:-1], edges[1:])], align="edge")
    ax.axvline(cap, color="red", linestyle="--", label=f"max_seq_len {cap}")
    ax.set_xlabel("tokens per sample (spec layout)")
    ax.set_ylabel("samples")
    ax.legend()
    _save(fig, path)


def bar_chart(labels: list[str], values: list[int], title: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(labels) + 2), 3.5))
    ax.bar(range(len(labels)), values)
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set_title(title)
    _save(fig, path)


def loss_plot(steps: list[int], loss: list[float], smoothed: list[float], val: dict[int, float], path: Path) -> None:
    """Training loss (raw, faint; smoothed) and validation loss per step."""
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, loss, color="tab:blue", alpha=0.25, linewidth=1, label="train loss")
    ax.plot(steps, smoothed, color="tab:blue", linewidth=2, label="train loss, smoothed")
    if val:
        ax.plot(sorted(val), [val[s] for s in sorted(val)], "o-", color="tab:orange", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss per label token")
    ax.legend()
    _save(fig, path)


def panels_plot(series: dict[str, dict[int, float]], path: Path) -> None:
    """One small panel per metric (``{name: {step: value}}``), values against step."""
    cols = min(3, len(series))
    rows = -(-len(series) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), squeeze=False)
    for ax, (name, values) in zip(axes.flat, series.items()):
        steps = sorted(values)
        ax.plot(steps, [values[s] for s in steps], "o-", markersize=3)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
    for ax in list(axes.flat)[len(series):]:
        ax.axis("off")
    _save(fig, path)


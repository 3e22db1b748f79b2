"""`gdt-tune plot-run`: curves and summary from DiskLogger files, resumed runs merged."""

from gdt_tune.eval.run_report import plot_run, read_logs, smooth
from gdt_tune.training.step_dirs import METADATA, write_marker


def _log(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"Step {s} | {' '.join(f'{k}:{v}' for k, v in kv.items())} \n" for s, kv in lines))


def test_plot_run_merges_resumed_logs_and_summarises(tmp_path):
    _log(tmp_path / "logs" / "log_1.txt", [(1, {"loss": 4.0, "tokens_seen": 100, "tokens_per_second_per_device": 10,
                                                 "rank_balance": 0.5}),
                                           (2, {"loss": 3.0, "tokens_seen": 200, "tokens_per_second_per_device": 30,
                                                "rank_balance": 0.7}),
                                           (2, {"val_loss": 3.5, "val_loss_events": 2.5, "val_events_auroc": 0.75,
                                                "val_events_auroc_death": 0.5, "val_metrics_seconds": 1.25})])
    _log(tmp_path / "logs" / "log_2.txt", [(3, {"loss": 2.0, "tokens_seen": 300, "tokens_per_second_per_device": 20}),
                                           (3, {"checkpoint_blocked_seconds": 0.1})])
    for name in ("step_2", "step_3"):
        (tmp_path / name).mkdir()
    (tmp_path / "step_3" / METADATA).write_text("")
    write_marker(tmp_path / "step_3", "run-a", 3)
    (tmp_path / "epoch_0").mkdir()
    metrics = read_logs(tmp_path)
    assert metrics["loss"] == {1: 4.0, 2: 3.0, 3: 2.0} and metrics["val_loss"] == {2: 3.5}
    plots, text = plot_run(tmp_path)
    assert [p.name for p in plots] == ["loss.png", "val_metrics.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in plots) and (tmp_path / "summary.md").read_text().strip() == text
    for row in ("| steps logged | 1..3 (3 values) |", "| tokens seen | 300 |", "| tokens/s per device (mean) | 20 |",
                "| train loss, first -> mean of last 10 | 4.0000 -> 3.0000 |", "| validation loss, last | 3.5000 at step 2 |",
                "| rank balance (mean; 1.0: no rank waits) | 0.600 |", "| val_loss_events, last | 2.5000 at step 2 |",
                "| val_events_auroc, last | 0.7500 at step 2 |", "| val_events_auroc_death, last | 0.5000 at step 2 |",
                "| val_metrics_seconds, last | 1.2500 at step 2 |",
                "| interim checkpoints | step_3 |", "| final checkpoints | epoch_0 |"):
        assert row in text, text


def test_smoothing_is_a_debiased_moving_average():
    assert smooth([2.0, 2.0, 2.0]) == [2.0, 2.0, 2.0]
    assert smooth([0.0, 1.0], weight=0.5) == [0.0, (0.5 * 0.0 + 0.5 * 1.0) / (1 - 0.25)]


def test_plot_run_without_logs_is_one_clear_error(tmp_path):
    import pytest

    with pytest.raises(ValueError, match="holds no DiskLogger"):
        plot_run(tmp_path)

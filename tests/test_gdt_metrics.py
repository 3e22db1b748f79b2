"""GDT's metrics (gdt_tune.clinical.gdt_metrics) on hand-made cases and on a real survival table
that scikit-survival ships, where gdt_tune's code path must give scikit-survival's own numbers."""

import numpy as np
import pytest

from gdt_tune.clinical.gdt_metrics import (
    cindex_harrell,
    clip_stats,
    clipped_point,
    event_cindex,
    fill_forecast,
    forecast_ratios,
)

sksurv = pytest.importorskip("sksurv")


def test_cindex_and_brier_equal_scikit_survivals_on_the_veterans_lung_cancer_table():
    """The Veterans' Administration lung cancer trial (137 patients, sksurv.datasets), used as
    (time, event, score) directly: the first 90 patients are the "training" split that gives the
    censoring distribution, the rest the test rows."""
    from sksurv.datasets import load_veterans_lung_cancer
    from sksurv.metrics import brier_score, concordance_index_ipcw
    from sksurv.util import Surv

    x, y = load_veterans_lung_cancer()
    score = (100 - x["Karnofsky_score"].to_numpy(dtype=float)) / 100  # a low Karnofsky score: high risk
    event, time = y["Status"], y["Survival_in_days"].astype(float)
    train = {"all|death": [(float(t), bool(e)) for t, e in zip(time[:90], event[:90])]}
    rows = [{"indication": "all", "event": "death", "week": tau, "time_weeks": float(t), "occurred": bool(e),
             "p_occurred": float(s), "p_no_occurrence": 1.0 - float(s)}
            for tau in (30, 90, 180) for t, e, s in zip(time[90:], event[90:], score[90:])]
    out = event_cindex(rows, train)
    survival_train = Surv.from_arrays(event=event[:90], time=time[:90])
    kept = time[90:] <= time[:90].max()
    survival_test = Surv.from_arrays(event=event[90:][kept], time=time[90:][kept])
    assert out["dropped_beyond_training_time"] == 3 * int((~kept).sum())
    for tau in (30, 90, 180):
        want = concordance_index_ipcw(survival_train, survival_test, score[90:][kept], tau=tau)[0]
        assert out["cindex_ipcw"]["all|death"][str(tau)] == pytest.approx(want, abs=1e-12)
        _, concordant, discordant, tied_risk, _ = concordance_index_ipcw(survival_train, survival_test,
                                                                         score[90:][kept], tau=tau)
        assert out["pairs"]["all|death"][str(tau)] == concordant + discordant + tied_risk
        _, brier = brier_score(survival_train, survival_test, (1.0 - score[90:][kept])[:, None], [tau])
        assert out["brier_ipcw"]["all|death"][str(tau)] == pytest.approx(brier[0], abs=1e-12)
    assert 0.5 < out["cindex_ipcw_average"] < 1  # Karnofsky predicts survival
    # Harrell's (val_events_cindex): scikit-survival's concordance_index_censored
    from sksurv.metrics import concordance_index_censored

    tasks = [{"time_weeks": float(t), "occurred": bool(e)} for t, e in zip(time, event)]
    probs = [[float(s), 1 - float(s), 0.0] for s in score]
    assert cindex_harrell(tasks, probs) == pytest.approx(concordance_index_censored(event, time, score)[0], abs=1e-12)


def test_event_cindex_groups_by_indication_event_and_week_and_averages_the_headline_events():
    rows, train = [], {}
    rng = np.random.default_rng(0)
    for cell in ("nsclc|death", "nsclc|progression", "crc|lot", "crc|metastasis"):
        train[cell] = [(float(t), bool(e)) for t, e in zip(rng.uniform(1, 120, 40), rng.random(40) < 0.5)]
        indication, event = cell.split("|")
        for week in (8, 26):
            for t, e in zip(rng.uniform(1, 30, 12), rng.random(12) < 0.7):
                rows.append({"indication": indication, "event": event, "week": week, "time_weeks": float(t),
                             "occurred": bool(e), "p_occurred": float(1 / (1 + t)), "p_no_occurrence": float(t / (1 + t))})
    out = event_cindex(rows, train)
    assert set(out["cindex_ipcw"]) == set(train) and set(out["cindex_ipcw"]["crc|lot"]) == {"8", "26"}
    assert all(v is not None for weeks in out["cindex_ipcw"].values() for v in weeks.values())
    headline = [v for c, w in out["cindex_ipcw"].items() if not c.endswith("metastasis") for v in w.values()
                if v is not None]
    assert out["cindex_ipcw_average"] == pytest.approx(np.mean(headline))
    assert out["cindex_ipcw_metastasis"] == pytest.approx(np.mean([v for v in out["cindex_ipcw"]["crc|metastasis"].values()
                                                                    if v is not None]))
    # a cell without training rows gets no number, and says so
    missing = event_cindex(rows, {k: v for k, v in train.items() if k != "crc|lot"})
    assert "crc|lot" not in missing["cindex_ipcw"] and missing["cells_without_training_rows"] == ["crc|lot"]


def test_forecast_ratio_is_mae_over_copy_forward_per_cell_and_the_median():
    def row(ind, var, truth, pred, copy):
        return {"indication": ind, "variable": var, "truth": truth, "prediction": pred, "copy_forward": copy}

    rows = [row("a", "hb", 10, 11, 12), row("a", "hb", 10, 10, 11),      # MAE 0.5 / 1.5
            row("a", "plt", 200, 210, 220),                              # 10 / 20
            row("b", "hb", 9, 9, 9),                                     # copy-forward exact: no ratio
            row("b", "plt", 100, None, 90)]                              # no prediction: left out
    out = forecast_ratios(rows, top=1)
    assert out["per_variable"] == {"a|hb": pytest.approx(1 / 3), "a|plt": 0.5}
    assert out["median_ratio"] == pytest.approx((1 / 3 + 0.5) / 2)
    assert out["n"] == {"a|hb": 2, "a|plt": 1}
    assert out["median_ratio_top30"] == pytest.approx(1 / 3)  # top=1: the variable with the most targets, hb


def test_the_forecast_is_the_mean_of_the_draws_and_missing_points_are_filled():
    keys = [(3.0, "hb"), (6.0, "hb"), (3.0, "plt"), (9.0, "na")]
    draws = [{(3.0, "hb"): 10.0, (3.0, "plt"): 200.0}, {(3.0, "hb"): 12.0, (6.0, "plt"): 190.0}, None]
    forecast, filled = fill_forecast(draws, keys, {"hb": 11.0, "plt": 250.0, "na": 140.0})
    assert forecast[(3.0, "hb")] == 11.0 and forecast[(3.0, "plt")] == 200.0  # means of the draws holding them
    assert forecast[(6.0, "hb")] == 11.0  # filled from the model's own earlier point
    assert forecast[(9.0, "na")] == 140.0  # nothing earlier: copy-forward
    assert filled == {(6.0, "hb"), (9.0, "na")}


def test_clip_bounds_leave_outliers_out_and_clip_every_value():
    values = list(np.linspace(10, 14, 99)) + [1e6]  # one entry error
    (low, high), = clip_stats({"hb": values}).values()
    kept = np.array(values[:99])
    kept = kept[(kept >= np.percentile(values, 1)) & (kept <= np.percentile(values, 99))]
    assert (low, high) == pytest.approx((kept.mean() - 3 * kept.std(), kept.mean() + 3 * kept.std()))
    assert high < 20
    assert clipped_point(1e6, -5.0, 12.0, (low, high)) == (high, low, 12.0)
    assert clipped_point(12.0, None, None, None) == (12.0, None, None)


def test_a_metric_whose_fields_are_missing_says_so_in_one_line():
    from gdt_tune.eval.gdt_eval import TrainingSplit, gdt_metrics

    untimed = [{"type": "event", "indication": "x", "event": "death", "week": 8.0, "time_weeks": None,
                "occurred": None, "p_occurred": 0.4, "p_no_occurrence": 0.6}]
    out = gdt_metrics(untimed, TrainingSplit(), "training")
    assert out["events"] == {} and out["notes"] == [
        "the test event tasks have no meta.target_meta delta_time_numeric / occurred: the IPCW C-index and Brier "
        "score are not computed"]
    timed = [{**untimed[0], "time_weeks": 5.0, "occurred": True}]
    assert "the training event tasks have no meta.target_meta" in gdt_metrics(timed, TrainingSplit(), "gdt")["notes"][0]
    assert gdt_metrics(timed, None, "training")["notes"][0].startswith("no --train-data:")


def test_the_random_survival_forest_is_seeded_and_reads_the_instruction(demo_dir):
    from gdt_tune.eval.evaluate import read_samples
    from gdt_tune.eval.gdt_eval import event_rows, instruction_features, read_training, rsf_scores

    train = read_training(demo_dir / "data" / "train", 150)
    assert train.samples == 150 and train.rsf and train.event_rows and train.values
    features = instruction_features(read_samples(demo_dir / "data" / "test", 1)[0][1]["instruction"])
    assert isinstance(features["age"], float) and "demographics:gender" in features and "regimen" in features
    assert any(k.startswith("lab:") for k in features) and features["visits"] >= 1
    from converter_sample import INSTRUCTION

    conv = instruction_features(INSTRUCTION)
    assert conv["genetic:EGFR"] == "L858R" and conv["regimen"] == "carboplatin, pemetrexed" and conv["age"] == 67.0
    assert conv["lab:creatinine [mass/volume] in serum or plasma - 2160-0"] == 0.92  # "0.92 mg/dl"
    assert conv["lab:hemoglobin [mass per volume] in blood - 718-7"] == 11.85  # the last of the history
    rows = event_rows([{"where": "t:1", "task": 1, "event": e, "category": c, "indication": "enhanced_nsclc",
                        "horizon_weeks": 26.0, "time_weeks": 30.0, "occurred": False}
                       for e, c in [("death", "death"), ("next progression", "progression")] * 2],
                      [[0.2, 0.5, 0.3]] * 4)
    first, fit = rsf_scores(train, rows, [features] * 4, seed=3)
    again, _ = rsf_scores(train, rows, [features] * 4, seed=3)
    assert first == again and all(s is None or 0 <= s <= 1 for s in first)
    assert fit["death"]["rows"] <= 1000 and any(s is not None for s in first)


def test_a_cell_with_too_few_comparable_pairs_stays_out_of_the_headline_and_is_named():
    """The case of issue 39: one cell with one comparable pair (C-index 1.000) made the headline."""
    from gdt_tune.clinical.gdt_metrics import MIN_COMPARABLE_PAIRS

    rng = np.random.default_rng(1)
    train = {c: [(float(t), bool(e)) for t, e in zip(rng.uniform(1, 120, 60), rng.random(60) < 0.5)]
             for c in ("nsclc|death", "crc|lot")}

    def row(indication, event, t, e, p):
        return {"indication": indication, "event": event, "week": 26, "time_weeks": t, "occurred": e,
                "p_occurred": p, "p_no_occurrence": 1 - p}

    rows = [row("nsclc", "death", float(t), bool(e), float(p))
            for t, e, p in zip(rng.uniform(1, 30, 30), rng.random(30) < 0.6, rng.random(30))]
    rows += [row("crc", "lot", 5.0, True, 0.9), row("crc", "lot", 20.0, False, 0.1)]  # one comparable pair
    out = event_cindex(rows, train)
    assert out["pairs"]["crc|lot"]["26"] == 1 and out["cindex_ipcw"]["crc|lot"]["26"] == 1.0
    assert out["pairs"]["nsclc|death"]["26"] >= MIN_COMPARABLE_PAIRS
    assert out["few_pairs"] == ["crc|lot|26"]
    assert out["cindex_ipcw_average"] == out["cindex_ipcw"]["nsclc|death"]["26"] < 0.9


def test_summary_marks_ratios_of_filled_forecasts_and_lists_each_cells_comparable_pairs():
    """Every forecast unparseable and filled from copy-forward gives a ratio of 1.000: marked, with
    its filled share; the C-index cells are listed with their comparable pairs."""
    from gdt_tune.eval.gdt_eval import gdt_metrics, summary_table

    def forecast(variable, truth, copy, prediction=None):
        return {"type": "forecast", "indication": "nsclc", "variable": variable, "truth": truth, "copy_forward": copy,
                "prediction": copy if prediction is None else prediction, "filled": prediction is None,
                "greedy": copy if prediction is None else prediction, "greedy_filled": prediction is None,
                "clipped": True}

    filled = [forecast("hb", 10.0, 12.0), forecast("plt", 200.0, 220.0)]
    metrics = {"events": {}, "forecasting": {}, "gdt": gdt_metrics(filled, None, "training")}
    table = summary_table(metrics)
    assert "| forecasting: median MAE ratio to copy-forward (mean of draws) | 1.000 (100% filled) (!) |" in table
    assert "| forecasting: median ratio, greedy answer | 1.000 (100% filled) (!) |" in table
    assert "note: (!) most forecast points were unparseable or missing" in table
    parsed = [forecast("hb", 10.0, 12.0, 11.0)] * 9 + [forecast("hb", 10.0, 12.0)]
    table = summary_table({"events": {}, "forecasting": {}, "gdt": gdt_metrics(parsed, None, "training")})
    assert "| 0.550 (10% filled) |" in table and "(!)" not in table
    events = event_cindex([{"indication": "crc", "event": "lot", "week": 26, "time_weeks": t, "occurred": e,
                            "p_occurred": p, "p_no_occurrence": 1 - p} for t, e, p in ((5.0, True, 0.9), (20.0, False, 0.1))],
                          {"crc|lot": [(float(t), t % 3 == 0) for t in range(1, 60)]})
    table = summary_table({"events": {}, "forecasting": {}, "gdt": {"forecasting": {}, "events": events}})
    assert "| events: IPCW C-index, mean over death, progression, next line of therapy | – |" in table
    assert "0 of 1 cells |" in table
    assert "note: 1 of 1 C-index cells (indication, event, week) have fewer than 10 comparable pairs" in table
    assert "| crc | lot | 26 | 1.000 | 1 | 2 | no |" in table

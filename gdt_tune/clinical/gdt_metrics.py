"""GDT's published metrics (arXiv 2601.20906; docs/evaluation.md), as pure functions over the rows
that ``gdt-tune evaluate`` writes to ``predictions.jsonl``, so a reader can recompute every number:

    ratios = forecast_ratios(forecast_rows)                 # MAE(model) / MAE(copy-forward) per (indication, variable)
    events = event_cindex(event_rows, train_rows)           # IPCW C-index and Brier per (indication, event, week)

- Forecasting: per (indication, variable), MAE(model) / MAE(copy-forward) over the same points,
  pooled over samples and dates; targets, predictions and copy-forward are clipped to the
  variable's training mean ± 3 SD (``clip_stats``; outliers left out of those statistics). The
  headline is the median ratio.
- Events: ``sksurv.metrics.concordance_index_ipcw(train, test, estimate=P(occurred), tau=week)`` per
  (indication, event, week), the censoring distribution fitted on the training rows of that
  indication and event; test rows whose time exceeds the largest training time are dropped first.
  ``sksurv.metrics.brier_score`` with estimate P(no occurrence) at the week. GDT's headline is the
  mean C-index over death, progression and next line of therapy; metastasis is reported apart.
  A cell (indication, event, week) enters those averages only with ``MIN_COMPARABLE_PAIRS``
  comparable pairs (ours: one pair gives a C-index of 0 or 1); its C-index and pairs are still reported.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict

import numpy as np

#: GDT's landmark weeks and the events of its headline average (``target_category``)
LANDMARK_WEEKS = (8, 26, 52, 104)
HEADLINE_EVENTS = ("death", "progression", "lot")
#: GDT's published values, for reference (the paper's, on its own data)
PUBLISHED = {"forecasting_median_ratio": 0.87, "forecasting_median_ratio_top30": 0.83,
             "forecasting_best_baseline": 0.97, "events_cindex_average": 0.703, "events_rsf_cindex_average": 0.662}
#: the comparable pairs a cell's C-index needs to enter the headline averages
MIN_COMPARABLE_PAIRS = 10


# ---------------------------------------------------------------- forecasting
def clip_stats(values_by_variable: dict[str, list[float]], low_q: float = 1.0, high_q: float = 99.0
               ) -> dict[str, tuple[float, float]]:
    """``{variable: (low, high)}`` = mean ± 3 SD of the training targets of each variable, the
    mean and SD computed without outliers: values outside the variable's 1st-99th percentile are
    left out first. A variable with fewer than 2 values has no bounds."""
    out = {}
    for variable, values in values_by_variable.items():
        x = np.asarray(values, dtype=float)
        if len(x) < 2:
            continue
        lo, hi = np.percentile(x, [low_q, high_q])
        kept = x[(x >= lo) & (x <= hi)]
        mean, sd = float(kept.mean()), float(kept.std())
        out[variable] = (mean - 3 * sd, mean + 3 * sd)
    return out


def fill_forecast(draws: list[dict | None], truth_keys: list[tuple[float, str]], copy_forward: dict[str, float]
                  ) -> tuple[dict, set]:
    """GDT's forecast of a task: per (week, variable) of the truth, the mean of the draws that hold
    it; a point no draw holds is filled from the model's own earlier point for that variable, else
    copy-forward. Returns ``({key: value or None}, filled keys)`` (None: nothing to fill from)."""
    parsed = [d for d in draws if d is not None]
    out, filled = {}, set()
    for key in sorted(truth_keys):
        values = [d[key] for d in parsed if key in d]
        if values:
            out[key] = float(sum(values) / len(values))
            continue
        week, variable = key
        earlier = [k for k in out if k[1] == variable and k[0] < week and out[k] is not None]
        own = [(d_key, d[d_key]) for d in parsed for d_key in d if d_key[1] == variable and d_key[0] < week]
        if earlier:
            out[key] = out[max(earlier)]
        elif own:
            latest = max(k for k, _ in own)
            out[key] = float(np.mean([v for k, v in own if k == latest]))
        else:
            out[key] = copy_forward.get(variable)
        filled.add(key)
    return out, filled


def _clip(x: float, bounds) -> float:
    return x if bounds is None else min(max(x, bounds[0]), bounds[1])


def forecast_ratios(rows: list[dict], top: int = 30) -> dict:
    """``rows``: ``predictions.jsonl`` forecast rows (``indication``, ``variable``, ``truth``,
    ``prediction``, ``copy_forward``, already clipped). Per ``"indication|variable"`` the ratio
    MAE(prediction) / MAE(copy-forward) on the points that have both; the median over them, and over
    the cells of the ``top`` variables with the most targets."""
    cells = defaultdict(lambda: ([], []))
    for r in rows:
        if r["prediction"] is None or r["copy_forward"] is None:
            continue
        model, base = cells[f"{r['indication']}|{r['variable']}"]
        model.append(abs(r["prediction"] - r["truth"]))
        base.append(abs(r["copy_forward"] - r["truth"]))
    per_cell, n = {}, {}
    for cell, (model, base) in sorted(cells.items()):
        denominator = float(np.mean(base))
        if denominator > 0:
            per_cell[cell] = float(np.mean(model)) / denominator
            n[cell] = len(model)
    by_variable = Counter()
    for cell, count in n.items():
        by_variable[cell.split("|", 1)[1]] += count
    top_variables = {v for v, _ in sorted(by_variable.items(), key=lambda kv: (-kv[1], kv[0]))[:top]}
    top_cells = [r for c, r in per_cell.items() if c.split("|", 1)[1] in top_variables]
    return {"median_ratio": float(np.median(list(per_cell.values()))) if per_cell else None,
            "median_ratio_top30": float(np.median(top_cells)) if top_cells else None,
            "per_variable": per_cell, "n": n, "variables": len(by_variable)}


def clipped_point(truth: float, prediction: float | None, copy_forward: float | None, bounds) -> tuple:
    """(truth, prediction, copy-forward) each clipped to the variable's bounds (None stays None)."""
    return (_clip(truth, bounds), None if prediction is None else _clip(prediction, bounds),
            None if copy_forward is None else _clip(copy_forward, bounds))


# ---------------------------------------------------------------- events
def survival_array(occurred, time):
    """scikit-survival's structured (event, time) array."""
    from sksurv.util import Surv

    return Surv.from_arrays(event=np.asarray(occurred, dtype=bool), time=np.asarray(time, dtype=float))


def cindex_harrell(tasks: list[dict], probs: list[list[float]]) -> float | None:
    """Harrell's C-index (``sksurv.metrics.concordance_index_censored``) of P(occurred) against each
    task's (``time_weeks``, ``occurred``), pooled over events and horizons; tasks without them are
    left out; None without a comparable pair. ``val_events_cindex`` and ``evaluate``'s
    ``events.cindex_harrell``: a monitoring number on few samples, not GDT's IPCW C-index."""
    from sksurv.metrics import concordance_index_censored

    from gdt_tune.clinical.metrics import OCCURRED

    rows = [(t["occurred"], t["time_weeks"], p[OCCURRED]) for t, p in zip(tasks, probs)
            if t.get("time_weeks") is not None and t.get("occurred") is not None]
    if not any(o for o, _, _ in rows):
        return None
    try:
        return float(concordance_index_censored(np.array([o for o, _, _ in rows], dtype=bool),
                                                np.array([t for _, t, _ in rows], dtype=float),
                                                np.array([p for _, _, p in rows], dtype=float))[0])
    except (ValueError, ZeroDivisionError):
        return None


def cindex_ipcw(train_occurred, train_time, occurred, time, estimate, tau: float) -> tuple[float | None, int]:
    """``sksurv.metrics.concordance_index_ipcw`` and its comparable pairs (concordant + discordant +
    tied in risk); (None, 0) when no pair is comparable."""
    from sksurv.metrics import concordance_index_ipcw

    try:
        c, concordant, discordant, tied_risk, _ = concordance_index_ipcw(
            survival_array(train_occurred, train_time), survival_array(occurred, time),
            np.asarray(estimate, dtype=float), tau=tau)
    except (ValueError, ZeroDivisionError):
        return None, 0
    return float(c), int(concordant + discordant + tied_risk)


def brier_ipcw(train_occurred, train_time, occurred, time, survival_estimate, week: float) -> float | None:
    """``sksurv.metrics.brier_score`` at ``week`` with estimate P(no occurrence) (None when the
    censoring distribution cannot be evaluated there)."""
    from sksurv.metrics import brier_score

    try:
        _, score = brier_score(survival_array(train_occurred, train_time), survival_array(occurred, time),
                               np.asarray(survival_estimate, dtype=float)[:, None], [week])
    except ValueError:
        return None
    return float(score[0])


def event_cindex(rows: list[dict], train: dict[str, list[tuple[float, bool]]], score_key: str = "p_occurred") -> dict:
    """``rows``: ``predictions.jsonl`` event rows (``indication``, ``event``, ``week``, ``time_weeks``,
    ``occurred``, ``p_occurred``, ``p_no_occurrence``); ``train``: ``{"indication|event": [(time,
    occurred), ...]}`` of the training split. Per cell and week the IPCW C-index (estimate
    ``score_key``), its comparable pairs and the Brier score; rows beyond the largest training time
    are dropped first. The averages hold the cells with ``MIN_COMPARABLE_PAIRS``; ``few_pairs``
    names those left out."""
    groups = defaultdict(list)
    for r in rows:
        if r.get("time_weeks") is not None and r.get("occurred") is not None:
            groups[(f"{r['indication']}|{r['event']}", float(r["week"]))].append(r)
    cindex, brier, n, pairs = defaultdict(dict), defaultdict(dict), defaultdict(dict), defaultdict(dict)
    dropped, no_training = 0, set()
    for (cell, week), group in sorted(groups.items()):
        if not train.get(cell):
            no_training.add(cell)
            continue
        t_time = [t for t, _ in train[cell]]
        t_occ = [o for _, o in train[cell]]
        kept = [r for r in group if r["time_weeks"] <= max(t_time)]
        dropped += len(group) - len(kept)
        if not kept:
            continue
        label = _week_label(week)
        args = (t_occ, t_time, [r["occurred"] for r in kept], [r["time_weeks"] for r in kept])
        cindex[cell][label], pairs[cell][label] = cindex_ipcw(*args, [r[score_key] for r in kept], week)
        if score_key == "p_occurred":
            brier[cell][label] = brier_ipcw(*args, [r["p_no_occurrence"] for r in kept], week)
        n[cell][label] = len(kept)
    enough = {c: {w: v for w, v in weeks.items() if pairs[c][w] >= MIN_COMPARABLE_PAIRS} for c, weeks in cindex.items()}
    return {"cindex_ipcw": dict(cindex), "pairs": dict(pairs), "brier_ipcw": dict(brier), "n": dict(n),
            "cindex_ipcw_average": average(enough, HEADLINE_EVENTS),
            "cindex_ipcw_metastasis": average(enough, ("metastasis",)),
            "few_pairs": [f"{c}|{w}" for c, weeks in cindex.items() for w in weeks if w not in enough[c]],
            "min_comparable_pairs": MIN_COMPARABLE_PAIRS,
            "dropped_beyond_training_time": dropped, "cells_without_training_rows": sorted(no_training)}


def _week_label(week: float) -> str:
    return str(int(week)) if float(week).is_integer() else str(week)


def average(per_cell: dict, events) -> float | None:
    """Mean of the C-indices of the cells whose event is in ``events`` (every indication and week)."""
    values = [v for cell, weeks in per_cell.items() if cell.split("|", 1)[1] in events
              for v in weeks.values() if v is not None and not math.isnan(v)]
    return float(np.mean(values)) if values else None

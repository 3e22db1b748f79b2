"""Clinical-task metrics, pure functions over plain values (tested on hand-made cases).

Events: three outcomes per task, in ``OUTCOMES`` order; a prediction is a probability per outcome.
The standard definitions come from scikit-learn and scipy, as clinical reviewers know them: AUROC
(``sklearn.metrics.roc_auc_score``), the multiclass Brier score (``brier_score_loss``, the sum over
the 3 outcomes), calibration bins (``sklearn.calibration.calibration_curve``, uniform) and the
AUROC interval (``scipy.stats.bootstrap``, percentile, resampling the occurred and the not-occurred
tasks separately, as pROC's stratified bootstrap).
Forecasts: ``{(weeks, variable): value}`` per task, compared with the truth and with the
copy-forward baseline (the last observed value from the instruction's summary block,
``gdt_tune.data.text.last_values``).
"""

from __future__ import annotations

# scipy and scikit-learn are imported where used: 1.4 s that every rank and tool start paid
import math
from collections import Counter, defaultdict

import numpy as np

from gdt_tune.data.text import OUTCOMES, outcome_text

OCCURRED = OUTCOMES.index("was not censored and occurred")


def outcome_index(censored: bool, occurred: bool) -> int:
    return OUTCOMES.index(outcome_text(censored, occurred))


def softmax(scores) -> list[float]:
    m = max(scores)
    e = [math.exp(s - m) for s in scores]
    return [x / sum(e) for x in e]


def event_metrics(events: list[str], truths: list[int], probs: list[list[float]], n_bins: int = 10) -> dict:
    """Accuracy, Brier score (sum over the 3 outcomes, averaged over tasks), per-event confusion
    (rows truth, columns prediction, ``OUTCOMES`` order) and a calibration table of P(occurred)."""
    if not truths:
        return {"tasks": 0}
    p = np.asarray(probs, dtype=float)
    y = np.zeros_like(p)
    y[np.arange(len(truths)), truths] = 1.0
    pred = p.argmax(axis=1)
    confusion: dict[str, list[list[int]]] = {}
    for event, t, k in zip(events, truths, pred):
        confusion.setdefault(event, [[0] * 3 for _ in range(3)])[t][int(k)] += 1
    return {"tasks": len(truths), "accuracy": float((pred == np.asarray(truths)).mean()),
            "brier": brier(truths, p), "confusion": confusion,
            "calibration": calibration(p[:, OCCURRED], y[:, OCCURRED], n_bins)}


def brier(truths: list[int], probs) -> float:
    """Multiclass Brier score: squared error summed over the 3 outcomes, averaged over tasks."""
    from sklearn.metrics import brier_score_loss

    return float(brier_score_loss(truths, np.asarray(probs, dtype=float), labels=[0, 1, 2]))


def calibration(p: np.ndarray, y: np.ndarray, n_bins: int) -> list[dict]:
    """Equal-width bins of predicted probability (scikit-learn's ``calibration_curve``, uniform
    strategy; a bin holds (low, high]): count, mean prediction, observed frequency, non-empty bins."""
    from sklearn.calibration import calibration_curve

    p, y = np.asarray(p, dtype=float), np.asarray(y, dtype=float)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    ids = np.searchsorted(edges[1:-1], p)  # calibration_curve's own bin rule, for the counts
    counts = np.bincount(ids, minlength=n_bins)
    observed, predicted = calibration_curve(y, p, n_bins=n_bins, strategy="uniform")
    return [{"bin": [float(edges[b]), float(edges[b + 1])], "count": int(counts[b]), "mean_predicted": float(m),
             "observed": float(o)} for b, m, o in zip(np.flatnonzero(counts), predicted, observed)]


def majority_baseline(train_outcomes: dict[str, Counter], events: list[str], truths: list[int]) -> dict:
    """The training set's majority outcome per event (accuracy) and its outcome frequencies as
    probabilities (Brier)."""
    probs, known = [], []
    for event in events:
        counts = train_outcomes.get(event)
        if counts:
            total = sum(counts.values())
            probs.append([counts.get(k, 0) / total for k in range(3)])
        else:
            probs.append([1 / 3] * 3)
        known.append(bool(counts))
    majority = [max(range(3), key=lambda k: (p[k], -k)) for p in probs]
    return {"accuracy": float(np.mean(np.asarray(majority) == np.asarray(truths))) if truths else None,
            "brier": brier(truths, probs) if truths else None,
            "events_without_training_data": sorted({e for e, k in zip(events, known) if not k})}


def forecast_points(visits) -> dict[tuple[float, str], float]:
    """``{(cumulative weeks, variable): value}`` of a parsed forecasting task (weeks in the answer
    are deltas from the previous visit)."""
    out, weeks = {}, 0.0
    for delta, values in visits:
        weeks += delta
        for name, value in values.items():
            if isinstance(value, float):
                out[(round(weeks, 4), name)] = value
    return out


def forecast_metrics(items: list[dict]) -> dict:
    """``items``: one per forecasting task, ``{"truth": points, "predictions": [points or None, ...],
    "last": {variable: value}}`` (``predictions[0]`` greedy, the rest sampled; None: unparseable).
    MAE per variable and overall for greedy, the sample mean and copy-forward; scaled MAE = MAE /
    standard deviation of the true values of that variable; share of unparseable outputs."""
    errors = {k: defaultdict(list) for k in ("greedy", "sampled_mean", "copy_forward")}
    truths_by_var = defaultdict(list)
    outputs = unparseable = missing = 0
    for item in items:
        preds = item["predictions"]
        outputs += len(preds)
        unparseable += sum(p is None for p in preds)
        sampled = [p for p in preds[1:] if p is not None]
        for key, true in item["truth"].items():
            var = key[1]
            truths_by_var[var].append(true)
            greedy = preds[0].get(key) if preds and preds[0] is not None else None
            if greedy is None:
                missing += 1
            else:
                errors["greedy"][var].append(abs(greedy - true))
            values = [p[key] for p in sampled if key in p]
            if values:
                errors["sampled_mean"][var].append(abs(sum(values) / len(values) - true))
            if var in item["last"]:
                errors["copy_forward"][var].append(abs(item["last"][var] - true))
    out = {"tasks": len(items), "targets": sum(map(len, truths_by_var.values())), "outputs": outputs,
           "unparseable_share": unparseable / outputs if outputs else None,
           "targets_missing_from_greedy": missing, "per_variable": {}}
    for var, truths in sorted(truths_by_var.items()):
        sd = float(np.std(truths)) if len(truths) > 1 else 0.0
        row = {"n": len(truths)}
        for method, errs in errors.items():
            e = errs.get(var, [])
            row[f"mae_{method}"] = float(np.mean(e)) if e else None
            row[f"scaled_mae_{method}"] = float(np.mean(e)) / sd if e and sd > 0 else None
            row[f"n_{method}"] = len(e)
        out["per_variable"][var] = row
    for method, errs in errors.items():
        all_e = [x for e in errs.values() for x in e]
        out[f"mae_{method}"] = float(np.mean(all_e)) if all_e else None
        scaled = [v[f"scaled_mae_{method}"] for v in out["per_variable"].values() if v[f"scaled_mae_{method}"] is not None]
        out[f"scaled_mae_{method}"] = float(np.mean(scaled)) if scaled else None
    return out


#: Event horizon buckets, weeks: (name, low exclusive, high inclusive).
HORIZON_BUCKETS = (("<=13 weeks", 0.0, 13.0), ("14-52 weeks", 13.0, 52.0), (">52 weeks", 52.0, math.inf))


def auroc(scores, labels) -> float | None:
    """Area under the ROC curve (``roc_auc_score``: ties count half); None when ``labels`` hold
    only one class."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(labels, dtype=bool)
    if y.all() or not y.any():
        return None
    return float(roc_auc_score(y, np.asarray(scores, dtype=float)))


def _auroc_of_groups(positives, negatives, axis=-1):
    """AUROC of two score groups (the Mann-Whitney U over n_pos x n_neg), vectorised for the bootstrap."""
    from scipy.stats import mannwhitneyu

    u = mannwhitneyu(positives, negatives, axis=axis, method="asymptotic", use_continuity=False).statistic
    return u / (positives.shape[axis] * negatives.shape[axis])


def bootstrap_ci(scores, labels, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> list[float] | None:
    """Percentile bootstrap interval of :func:`auroc` (``scipy.stats.bootstrap``, stratified: the
    occurred and the not-occurred tasks are resampled separately); None when a class has fewer
    than 2 tasks, or ``n_boot`` is 0."""
    from scipy.stats import bootstrap

    s, y = np.asarray(scores, dtype=float), np.asarray(labels, dtype=bool)
    if n_boot == 0 or y.sum() < 2 or (~y).sum() < 2:
        return None
    with np.errstate(invalid="ignore"):
        result = bootstrap((s[y], s[~y]), _auroc_of_groups, n_resamples=n_boot, confidence_level=level,
                           method="percentile", vectorized=True, rng=np.random.default_rng(seed))
    low, high = result.confidence_interval
    return [float(low), float(high)]


def horizon_bucket(weeks: float) -> str:
    return next(name for name, low, high in HORIZON_BUCKETS if low < weeks <= high)


def event_auroc(events: list[str], horizons: list[float], truths: list[int], probs: list[list[float]],
                n_boot: int = 1000) -> dict:
    """AUROC of P(occurred) among uncensored tasks (occurred vs did not occur), per event and per
    horizon bucket (and over all), each with its task count, positives and a bootstrap 95% interval."""
    rows = [(e, horizon_bucket(h), t == OCCURRED, p[OCCURRED]) for e, h, t, p in zip(events, horizons, truths, probs)
            if t != OUTCOMES.index("was censored and did not occur")]

    def cell(selected) -> dict:
        scores, labels = [r[3] for r in selected], [r[2] for r in selected]
        return {"auroc": auroc(scores, labels), "ci95": bootstrap_ci(scores, labels, n_boot),
                "tasks": len(selected), "occurred": int(sum(labels))}

    out: dict = {"all": {"all": cell(rows)}}
    for event in sorted({r[0] for r in rows}):
        out[event] = {"all": cell([r for r in rows if r[0] == event])}
        for name, _, _ in HORIZON_BUCKETS:
            out[event][name] = cell([r for r in rows if r[0] == event and r[1] == name])
    for name, _, _ in HORIZON_BUCKETS:
        out["all"][name] = cell([r for r in rows if r[1] == name])
    return out

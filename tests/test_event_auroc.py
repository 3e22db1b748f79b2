"""AUROC per event and horizon bucket, against scikit-learn on hand-made and random cases."""

import numpy as np
import pytest

from gdt_tune.clinical.metrics import OCCURRED, OUTCOMES, auroc, bootstrap_ci, event_auroc, horizon_bucket

metrics = pytest.importorskip("sklearn.metrics")


@pytest.mark.parametrize("scores, labels", [
    ([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]),
    ([0.5, 0.5, 0.5, 0.5], [0, 1, 0, 1]),          # all tied
    ([0.9, 0.1, 0.9, 0.1, 0.5], [1, 0, 0, 1, 1]),  # some ties across classes
])
def test_auroc_matches_scikit_learn(scores, labels):
    assert auroc(scores, labels) == pytest.approx(metrics.roc_auc_score(labels, scores), abs=1e-12)


def test_auroc_random_and_degenerate():
    rng = np.random.default_rng(0)
    for _ in range(20):
        y = rng.integers(0, 2, 50)
        s = np.round(rng.random(50), 1)  # many ties
        if 0 < y.sum() < 50:
            assert auroc(s, y) == pytest.approx(metrics.roc_auc_score(y, s), abs=1e-12)
    assert auroc([0.2, 0.3], [1, 1]) is None and auroc([], []) is None


def test_bootstrap_interval_brackets_the_estimate():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200)
    s = y * 0.3 + rng.random(200)
    lo, hi = bootstrap_ci(s, y, n_boot=300)
    assert lo < auroc(s, y) < hi and hi - lo < 0.25
    assert bootstrap_ci([0.1, 0.2], [1, 1]) is None


def test_event_auroc_per_event_and_horizon():
    def probs(p_occurred):
        return [p_occurred, (1 - p_occurred) / 2, (1 - p_occurred) / 2]

    occurred, not_occurred = OCCURRED, OUTCOMES.index("was not censored and did not occur")
    censored = OUTCOMES.index("was censored and did not occur")
    events = ["death"] * 5 + ["next progression"] * 3
    horizons = [4, 10, 30, 60, 80, 13, 14, 53]
    truths = [occurred, not_occurred, occurred, not_occurred, censored, occurred, not_occurred, occurred]
    p = [probs(x) for x in (0.9, 0.2, 0.6, 0.7, 0.99, 0.3, 0.4, 0.8)]
    out = event_auroc(events, horizons, truths, p, n_boot=50)
    assert [horizon_bucket(h) for h in (13, 14, 52, 53)] == ["<=13 weeks", "14-52 weeks", "14-52 weeks", ">52 weeks"]
    # the censored death task is left out: death has 4 uncensored tasks, 2 occurred
    assert out["death"]["all"]["tasks"] == 4 and out["death"]["all"]["occurred"] == 2
    assert out["death"]["all"]["auroc"] == pytest.approx(metrics.roc_auc_score([1, 0, 1, 0], [0.9, 0.2, 0.6, 0.7]))
    assert out["death"]["<=13 weeks"]["auroc"] == 1.0 and out["death"][">52 weeks"]["tasks"] == 1
    assert out["death"][">52 weeks"]["auroc"] is None  # one class only: no number, the count says why
    assert out["all"]["all"]["tasks"] == 7
    assert out["all"]["all"]["auroc"] == pytest.approx(metrics.roc_auc_score(
        [1, 0, 1, 0, 1, 0, 1], [0.9, 0.2, 0.6, 0.7, 0.3, 0.4, 0.8]))

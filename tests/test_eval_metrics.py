"""Clinical-task metrics on hand-made cases."""

from collections import Counter

import pytest

from gdt_tune.clinical.metrics import (
    OUTCOMES,
    event_metrics,
    forecast_metrics,
    forecast_points,
    majority_baseline,
    outcome_index,
    softmax,
)
from gdt_tune.data.text import last_values
from gdt_tune.eval.evaluate import parsed_forecast

OCC, NOT, CENS = (OUTCOMES.index(o) for o in ("was not censored and occurred", "was not censored and did not occur",
                                                "was censored and did not occur"))


def test_outcome_order_and_softmax():
    assert outcome_index(False, True) == OCC and outcome_index(True, False) == CENS
    assert softmax([0.0, 0.0, 0.0]) == pytest.approx([1 / 3] * 3)
    assert softmax([-1.0, -2.0, -3.0])[0] == pytest.approx(1 / (1 + 2.718281828 ** -1 + 2.718281828 ** -2))


def test_event_metrics_by_hand():
    probs = [[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8]]
    truths = [OCC, NOT, NOT, CENS]
    probs = [[p[OUTCOMES.index(o)] for o in ("was not censored and occurred", "was not censored and did not occur",
                                              "was censored and did not occur")] for p in probs]
    m = event_metrics(["death", "death", "next progression", "death"], truths, probs, n_bins=2)
    assert m["tasks"] == 4 and m["accuracy"] == 0.75  # the third predicts "occurred"
    brier = ((0.2 ** 2 + 0.1 ** 2 + 0.1 ** 2) + (0.2 ** 2 + 0.3 ** 2 + 0.1 ** 2) + (0.6 ** 2 + 0.7 ** 2 + 0.1 ** 2)
             + (0.1 ** 2 + 0.1 ** 2 + 0.2 ** 2)) / 4
    assert m["brier"] == pytest.approx(brier)
    assert m["confusion"]["next progression"][NOT][OCC] == 1
    assert m["confusion"]["death"][OCC][OCC] == 1 and m["confusion"]["death"][CENS][CENS] == 1
    low, high = m["calibration"]  # P(occurred): 0.2, 0.1 (no), 0.8 (yes), 0.6 (no)
    assert (low["count"], low["mean_predicted"], low["observed"]) == (2, pytest.approx(0.15), 0.0)
    assert (high["count"], high["mean_predicted"], high["observed"]) == (2, pytest.approx(0.7), 0.5)
    assert event_metrics([], [], []) == {"tasks": 0}


def test_majority_baseline_uses_training_frequencies():
    train = {"death": Counter({CENS: 3, OCC: 1})}
    m = majority_baseline(train, ["death", "death", "next metastasis"], [CENS, OCC, NOT])
    assert m["accuracy"] == pytest.approx(1 / 3)  # death -> censored; unknown event -> uniform, picks index 0
    p = [0.0] * 3
    p[CENS], p[OCC] = 0.75, 0.25
    one = sum((p[k] - (k == CENS)) ** 2 for k in range(3))
    two = sum((p[k] - (k == OCC)) ** 2 for k in range(3))
    three = sum((1 / 3 - (k == NOT)) ** 2 for k in range(3))
    assert m["brier"] == pytest.approx((one + two + three) / 3)
    assert m["events_without_training_data"] == ["next metastasis"]


# the converter's summary block as docs/data-format.md gives it (written out here, not by gdt_tune's writer)
INSTRUCTION_TAIL = ("\tECOG is 1.\n\n\n\n\nHere we repeat the last observed values of each genetic event in the input data:\n\n"
                    "0 weeks later, the patient visited and experienced the following: \n\tEGFR is positive,\n"
                    "\t</genetic>.\n\nThe most recent line of therapy:\n\tdocetaxel\n\n"
                    "The last values of the variables in the input data are:\n\themoglobin - 718-7 was 12.5\n"
                    "\tplatelets - 777-3 was 200\n\nYou will now have multiple tasks to complete.")


def test_last_values_and_points():
    assert last_values("history...\n" + INSTRUCTION_TAIL) == {"hemoglobin - 718-7": 12.5, "platelets - 777-3": 200.0}
    assert last_values("no summary") == {}
    visits = [(3.0, {"hb": 12.0, "qa": "c"}), (2.0, {"hb": 11.0})]
    assert forecast_points(visits) == {(3.0, "hb"): 12.0, (5.0, "hb"): 11.0}


def test_parsed_forecast_accepts_answers_and_rejects_garbage():
    text = ("Task 1 is time to event prediction:\nHere is the prediction: the event (death) was censored and did not "
            "occur.\n\nTask 2 is forecasting:\n3 weeks later, the patient visited and experienced the following: \n"
            "\thb is 12.5.\n\n1 weeks later, the patient visited and experienced the following: \n\thb is 11.\n")
    assert parsed_forecast(text) == {(3.0, "hb"): 12.5, (4.0, "hb"): 11.0}
    assert parsed_forecast("Task 1 is the event prediction: the event") is None
    assert parsed_forecast(text.split("\n\nTask 2")[0]) is None  # no forecasting task


def test_forecast_metrics_by_hand():
    items = [
        {"truth": {(3.0, "hb"): 12.0, (3.0, "plt"): 200.0}, "last": {"hb": 13.0, "plt": 180.0},
         "predictions": [{(3.0, "hb"): 11.0, (3.0, "plt"): 210.0}, {(3.0, "hb"): 12.0}, None]},
        {"truth": {(3.0, "hb"): 10.0}, "last": {"hb": 10.5},
         "predictions": [None, {(3.0, "hb"): 9.0}, {(3.0, "hb"): 10.0}]},
    ]
    m = forecast_metrics(items)
    assert (m["tasks"], m["targets"], m["outputs"]) == (2, 3, 6)
    assert m["unparseable_share"] == pytest.approx(2 / 6)
    assert m["targets_missing_from_greedy"] == 1  # the second greedy output did not parse
    hb = m["per_variable"]["hb"]
    assert hb["mae_greedy"] == 1.0 and hb["n_greedy"] == 1
    assert hb["mae_sampled_mean"] == pytest.approx((0.0 + 0.5) / 2)  # sample means 12 and 9.5
    assert hb["mae_copy_forward"] == pytest.approx((1.0 + 0.5) / 2)
    assert hb["scaled_mae_copy_forward"] == pytest.approx(0.75 / 1.0)  # std of truths 12, 10 is 1
    plt = m["per_variable"]["plt"]
    assert plt["mae_greedy"] == 10.0 and plt["scaled_mae_greedy"] is None  # one truth: no spread
    assert m["mae_greedy"] == pytest.approx((1.0 + 10.0) / 2)
    assert m["mae_copy_forward"] == pytest.approx((1.0 + 0.5 + 20.0) / 3)

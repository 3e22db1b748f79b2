import pytest

from gdt_tune.data.text import drop_oldest_visits, fmt_number, visit_spans

INSTRUCTION = (
    "Preamble.\nStarting with demographic data:\n\tage of patient is 59 years.\n\n"
    "On the first visit, the patient experienced the following: \n\tECOG is 0.\n\n"
    "2 weeks later, the patient visited and experienced the following: \n\themoglobin - 718-7 is 12.\n\n"
    "1 weeks later, the patient visited and experienced the following: \n\tdrug x is administered,\n\tECOG is 1.\n\n"
    "3.5 weeks later, the patient visited and experienced the following: \n\tdeath.\n"
    "\nThe most recent line of therapy: x.\n\nTask 1 is forecasting:\n\tfoo the future weeks 3\n"
)


@pytest.mark.parametrize("x, s", [(12.0, "12"), (12.5, "12.5"), (12.50, "12.5"), (0.125, "0.12"),
                                  (3.456, "3.46"), (-0.001, "0"), (100, "100"), (-2.5, "-2.5")])
def test_fmt_number(x, s):
    assert fmt_number(x) == s


def test_visit_spans_find_all_visits_and_weeks():
    spans = visit_spans(INSTRUCTION)
    assert [w for _, _, w in spans] == [None, 2.0, 1.0, 3.5]
    assert INSTRUCTION[spans[-1][0]:spans[-1][1]].endswith("\tdeath.\n\n")


def test_drop_oldest_visits_merges_week_deltas_and_keeps_first():
    one = drop_oldest_visits(INSTRUCTION, 1)
    assert "hemoglobin" not in one and "ECOG is 0" in one
    assert "3 weeks later, the patient visited and experienced the following: \n\tdrug x" in one
    two = drop_oldest_visits(INSTRUCTION, 2)
    assert "6.5 weeks later, the patient visited and experienced the following: \n\tdeath.\n\nThe most" in two
    three = drop_oldest_visits(INSTRUCTION, 3)
    assert three.endswith("the following: \n\tECOG is 0.\n\nThe most recent line of therapy: x.\n\n"
                          "Task 1 is forecasting:\n\tfoo the future weeks 3\n")
    assert drop_oldest_visits(INSTRUCTION, 0) == INSTRUCTION
    with pytest.raises(ValueError, match="only 3 after the first"):
        drop_oldest_visits(INSTRUCTION, 4)

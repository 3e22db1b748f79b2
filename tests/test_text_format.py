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


# ---------------------------------------------------------------- the converter's own wording
def test_readers_accept_the_converters_text():
    """A sample written by hand from the spec's §4 (tests/converter_sample.py) reads back whole."""
    from converter_sample import ANSWER, INSTRUCTION

    from gdt_tune.data.answers import parse_answer
    from gdt_tune.data.text import event_horizons, last_values

    assert event_horizons(INSTRUCTION) == {2: ("next metastasis", 75.0), 4: ("death", 8.0)}
    assert event_horizons(INSTRUCTION.replace("occured or not", "occurred or not")) == event_horizons(INSTRUCTION)
    assert last_values(INSTRUCTION) == {"hemoglobin [mass per volume] in blood - 718-7": 11.85,
                                        "platelets [#/volume] in blood - 777-3": 212.0}
    # the summary's "0 weeks later" genetic recap is not a visit
    spans = visit_spans(INSTRUCTION)
    assert [w for _, _, w in spans] == [None, 1.0, 3.14]
    cut = drop_oldest_visits(INSTRUCTION, 1)
    assert "4.14 weeks later, the patient visited and experienced the following: \n\tecog is 1," in cut
    assert cut.endswith(INSTRUCTION[INSTRUCTION.index("mg/dl.\n"):])
    assert "0 weeks later" in drop_oldest_visits(INSTRUCTION, 2)
    tasks = parse_answer(ANSWER)
    assert [t.type for t in tasks] == ["forecasting", "time to event prediction", "forecasting QA",
                                       "time to event prediction"]
    assert tasks[0].visits == [(3.0, {"hemoglobin [mass per volume] in blood - 718-7": 11.6}),
                               (3.0, {"hemoglobin [mass per volume] in blood - 718-7": 11.2}),
                               (6.0, {"hemoglobin [mass per volume] in blood - 718-7": 10.95})]
    assert (tasks[1].event, tasks[1].censored, tasks[1].occurred) == ("next metastasis", False, False)
    assert (tasks[3].event, tasks[3].censored, tasks[3].occurred) == ("death", True, False)


# Every line of a converter instruction that is not a data line, typed out from §4 (not imported).
CONVERTER_LINES = (
    r"The following is a patient, starting with the demographic data, following visit by visit everything that the "
    r"patient experienced\. All lab codes refer to LOINC codes\.",
    r"Starting with demographic data:",
    r"On the first visit, the patient experienced the following: ",
    r"\d+(\.\d+)? weeks later, the patient visited and experienced the following: ",
    r"Here we repeat the last observed values of each genetic event in the input data:",
    r"No genetic data available\.",
    r"The most recent line of therapy:",
    r"The last values of the variables in the input data are:",
    r"You will now have multiple tasks to complete\. Please answer for each task in the same order as they are "
    r"presented\. Before every response state the task nr, e\.g\. 'Task 2:'\.",
    r"Task \d+ is (forecasting|forecasting QA|time to event prediction):",
    r"Your task is to predict the future values of the following variables for each cumulative week starting from "
    r"the last visit:",
    r"Your task is to predict the appropriate bins for the future values of the following variables for each "
    r"cumulative week starting from the date of the last visit:",
    r"Your task is to predict whether the following event was censored \d+ weeks from the last clinical visit and "
    r"whether the event occured or not: (death|next progression|next line of therapy|next metastasis)\.",
    r"Please provide your prediction in the following format: 'Here is the prediction: the event \(<name of event>\) "
    r"was \[not\] censored and \[did not occur\]/\[occured\]\.'",
    r"",
)
DATA_LINES = (
    r"\t[^\t\n]+ is [^\t\n]+[,.]?", r"\tdrug [^\t\n]+ is administered[,.]?", r"\tdeath[,.]?",
    r"\t<genetic>", r"\t</genetic>[,.]?", r"\t[^\t\n]+ was -?[0-9.]+", r"\t[^\t\n]+ the future weeks [0-9., ]+",
    r"\tThe possible bins are: a: bin \(-inf, [^,]+\], b: bin \([^]]+\], c: bin \([^]]+\], d: bin \([^]]+\], "
    r"e: bin \([^,]+, inf\)", r"\t[a-z0-9, ]+",
)


def test_generator_writes_the_converters_wording():
    import re

    from converter_sample import INSTRUCTION

    from gdt_tune.data.synthetic import generate_cohort

    line_re = re.compile("|".join(f"(?:{p})" for p in CONVERTER_LINES + DATA_LINES))
    samples = [s for _, s in generate_cohort(12, seed=3, splits_per_lot=1)]
    for text in [INSTRUCTION] + [s["instruction"] for s in samples]:
        bad = [line for line in text.split("\n") if not line_re.fullmatch(line)]
        assert not bad, bad[:3]
    joined = "\n".join(s["instruction"] for s in samples)
    for marker in ("whether the event occured or not: ", "[did not occur]/[occured].'\n\n", ".\n\n\n\n\nHere we repeat",
                   "\n\n0 weeks later, the patient visited and experienced the following: \n\t", "\t</genetic>.\n\n",
                   "The most recent line of therapy:\n\t", "\t<genetic>\n\t", "\t</genetic>,\n\t",
                   "Here we repeat the last observed values of each genetic event in the input data:\n"
                   "No genetic data available.\n"):
        assert marker in joined, marker
    # one intro sentence per sample, even for one task
    assert all(s["instruction"].count("You will now have multiple tasks to complete.") == 1 for s in samples)

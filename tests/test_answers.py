import pytest

from gdt_tune.data.answers import Task, parse_answer

# Written the way the original TwinWeaver converter writes it: "1 weeks later", a trailing space
# after every visit header, a blank line between visits and after each task.
ORIGINAL = (
    "Task 1 is time to event prediction:\n"
    "Here is the prediction: the event (next line of therapy) was censored and did not occur.\n\n"
    "Task 2 is forecasting:\n"
    "1 weeks later, the patient visited and experienced the following: \n"
    "\themoglobin - 718-7 is 11.2,\n\tplatelets - 777-3 is 250.\n\n"
    "2.5 weeks later, the patient visited and experienced the following: \n"
    "\themoglobin - 718-7 is -0.5.\n\n"
    "Task 3 is forecasting QA:\n"
    "3 weeks later, the patient visited and experienced the following: \n"
    "\tneutrophils - 751-8 is c.\n\n"
    "Task 4 is time to event prediction:\n"
    "Here is the prediction: the event (death) was not censored and occurred.\n"
)


def test_parses_original_converter_output():
    assert parse_answer(ORIGINAL) == [
        Task(1, "time to event prediction", event="next line of therapy", censored=True, occurred=False),
        Task(2, "forecasting", visits=[(1.0, {"hemoglobin - 718-7": 11.2, "platelets - 777-3": 250.0}),
                                       (2.5, {"hemoglobin - 718-7": -0.5})]),
        Task(3, "forecasting QA", visits=[(3.0, {"neutrophils - 751-8": "c"})]),
        Task(4, "time to event prediction", event="death", censored=False, occurred=True),
    ]


def test_header_without_trailing_space_and_singular_week():
    text = "Task 1 is forecasting:\n1 week later, the patient visited and experienced the following:\n\tx - 1-1 is 2.\n"
    assert parse_answer(text)[0].visits == [(1.0, {"x - 1-1": 2.0})]


@pytest.mark.parametrize("text, expected", [
    ("", "at least one 'Task N is <type>:'"),
    ("hello\nTask 1 is forecasting:\n", "start with 'Task 1"),
    ("Task 1 is time to event prediction:\nthe event happened\n", "Here is the prediction"),
    ("Task 1 is forecasting:\n\themoglobin is 3.\n", "weeks later, the patient visited"),
    ("Task 1 is forecasting:\n1 weeks later, the patient visited and experienced the following: \n\th is 3\n", "end with '.'"),
    ("Task 1 is forecasting:\n1 weeks later, the patient visited and experienced the following: \n\th = 3.\n", "' is '"),
    ("Task 1 is forecasting:\n1 weeks later, the patient visited and experienced the following: \n\th is high.\n", "a number"),
    ("Task 1 is forecasting QA:\n1 weeks later, the patient visited and experienced the following: \n\th is 3.\n", "bin letter"),
])
def test_malformed_answers_raise_value_error(text, expected):
    with pytest.raises(ValueError, match=expected.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        parse_answer(text)


def test_event_tasks_give_where_their_outcome_starts():
    """evaluate scores the outcome after the answer text up to this position; no second parse."""
    events = [t for t in parse_answer(ORIGINAL) if t.event is not None]
    assert [ORIGINAL[t.outcome_start:].split(".")[0] for t in events] == [
        "was censored and did not occur", "was not censored and occurred"]
    assert ORIGINAL[: events[1].outcome_start].endswith("the event (death) ")

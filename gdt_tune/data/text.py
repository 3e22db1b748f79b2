"""The TwinWeaver text format, verbatim, in one place (docs/data-format.md §3): every string that
gdt_tune writes (the synthetic generator) or reads (the answer parser, event scoring, evaluate,
data-report, the dataset's history truncation) is defined here. The sentences are the converter's
own, typos included ("occured" in the event prompt). Pure functions, no I/O.

    >>> event_prompt(3, "death", 75)
    "Task 3 is time to event prediction:\\nYour task is to predict whether the following event was censored 75 ..."
    >>> event_horizons(sample["instruction"])          # {task number: (event name, weeks)}
    {2: ('next metastasis', 75.0)}
"""

from __future__ import annotations

import re

# ---------------------------------------------------------------- task types
FORECASTING = "forecasting"
FORECASTING_QA = "forecasting QA"
EVENT = "time to event prediction"
TASK_TYPES = (FORECASTING_QA, FORECASTING, EVENT)  # the longer name first, for regex alternatives

# ---------------------------------------------------------------- the instruction, in order
PREAMBLE = ("The following is a patient, starting with the demographic data, following visit by visit everything "
            "that the patient experienced. All lab codes refer to LOINC codes.")
DEMOGRAPHICS_HEADER = "Starting with demographic data:"
FIRST_VISIT_HEADER = "On the first visit, the patient experienced the following: "
LATER_VISIT_HEADER = "{weeks} weeks later, the patient visited and experienced the following: "
GENETIC_OPEN, GENETIC_CLOSE = "\t<genetic>", "\t</genetic>"
SUMMARY_GENETIC = "Here we repeat the last observed values of each genetic event in the input data:"
NO_GENETIC = "No genetic data available."
SUMMARY_LOT = "The most recent line of therapy:"
SUMMARY_LAST_VALUES = "The last values of the variables in the input data are:"
TASKS_INTRO = ("You will now have multiple tasks to complete. Please answer for each task in the same order as they "
               "are presented. Before every response state the task nr, e.g. 'Task 2:'.")
FORECAST_PROMPT = ("Your task is to predict the future values of the following variables for each cumulative week "
                   "starting from the last visit:")
QA_PROMPT = ("Your task is to predict the appropriate bins for the future values of the following variables for "
             "each cumulative week starting from the date of the last visit:")
FORECAST_VARIABLE = "\t{name} the future weeks {weeks}"
QA_BINS = "\tThe possible bins are: {bins}"
EVENT_PROMPT = ("Your task is to predict whether the following event was censored {weeks} weeks from the last "
                "clinical visit and whether the event occured or not: {name}.")
EVENT_FORMAT = ("Please provide your prediction in the following format: 'Here is the prediction: the event "
                "(<name of event>) was [not] censored and [did not occur]/[occured].'")
#: event names in prompts and answers, and the converter's ``target_category`` of each
EVENT_CATEGORIES = {"death": "death", "next progression": "progression", "next line of therapy": "lot",
                    "next metastasis": "metastasis"}

# ---------------------------------------------------------------- the answer
EVENT_OUTCOMES = {
    # text -> (censored, occurred); "occurred" is spelled right in answers
    "was not censored and occurred": (False, True),
    "was not censored and did not occur": (False, False),
    "was censored and did not occur": (True, False),
}
OUTCOMES = tuple(EVENT_OUTCOMES)  # in this order wherever probabilities over the outcomes are listed
EVENT_ANSWER = "Here is the prediction: the event ({name}) {outcome}."

# ---------------------------------------------------------------- readers
#: ``Task N is <type>:`` on its own line (instruction task list and answer)
TASK_HEADER_RE = re.compile(r"^Task (\d+) is (" + "|".join(TASK_TYPES) + r"):[ \t]*$", re.MULTILINE)
# A later-visit header on its own line. Tolerant of the converter's quirks (no plural fix,
# optional trailing space) and of decimal week deltas.
LATER_VISIT_RE = re.compile(
    r"^(\d+(?:\.\d+)?) weeks? later, the patient visited and experienced the following:[ \t]*$", re.MULTILINE)
FIRST_VISIT_RE = re.compile(r"^On the first visit, the patient experienced the following:[ \t]*$", re.MULTILINE)
#: the event prompt of a task: number, weeks, event name ("occurred" accepted too: later TwinWeaver versions)
EVENT_PROMPT_RE = re.compile(
    r"^Task (\d+) is time to event prediction:[ \t]*\n"
    + re.escape(EVENT_PROMPT).replace(r"\{weeks\}", r"(\d+(?:\.\d+)?)").replace("occured", "occurr?ed")
    .replace(r"\{name\}", r"(.+?)") + "[ \t]*$", re.MULTILINE)
_LAST_VALUES_RE = re.compile("^" + re.escape(SUMMARY_LAST_VALUES) + r"[ \t]*\n((?:\t.*\n?)+)", re.MULTILINE)
_LAST_VALUE_RE = re.compile(r"^\t(.+) was (\S+?)[,.]?$")
_HISTORY_ENDS = (SUMMARY_GENETIC, NO_GENETIC, SUMMARY_LOT, TASKS_INTRO, SUMMARY_LAST_VALUES)


def fmt_number(x: float) -> str:
    """Round to 2 decimals, drop trailing zeros and a trailing '.': 12.0 -> '12', 12.50 -> '12.5'."""
    s = f"{round(float(x), 2):.2f}".rstrip("0").rstrip(".")
    return "0" if s in ("-0", "") else s


def visit_block(header: str, lines: list[str]) -> str:
    """One visit: header line, event lines joined by ',\\n', ended by '.\\n'."""
    return header + "\n" + ",\n".join(lines) + ".\n"


def later_visit_header(weeks: float) -> str:
    return LATER_VISIT_HEADER.format(weeks=fmt_number(weeks))


def genetic_lines(genes: list[tuple[str, str]]) -> list[str]:
    """A visit's genetic results as event lines: ``\\t<genetic>\\n\\t{gene} is {value},`` ... ``\\t</genetic>``
    (the opening tag is followed by a newline, not by ``,\\n``)."""
    return [GENETIC_OPEN + "\n" + "".join(f"\t{g} is {v},\n" for g, v in genes) + GENETIC_CLOSE]


def summary_block(genes: list[tuple[str, str]], regimen: str, last_values: dict[str, str]) -> str:
    """What follows the last visit's ``.\\n``: four newlines, the genetic recap (the converter keeps a
    ``0 weeks later`` header and ``</genetic>.``), the latest line of therapy and, when a forecasting
    task exists, the last value of each forecast variable; ends where the task list begins."""
    if genes:
        genetic = (f"{SUMMARY_GENETIC}\n\n{later_visit_header(0)}\n" + "".join(f"\t{g} is {v},\n" for g, v in genes)
                   + GENETIC_CLOSE + ".\n")
    else:
        genetic = f"{SUMMARY_GENETIC}\n{NO_GENETIC}\n"
    text = "\n\n\n\n" + genetic + f"\n{SUMMARY_LOT}\n\t{regimen}\n"
    if last_values:
        text += f"\n{SUMMARY_LAST_VALUES}\n" + "".join(f"\t{n} was {v}\n" for n, v in last_values.items())
    return text + "\n"


def task_header(number: int, task_type: str) -> str:
    return f"Task {number} is {task_type}:"


def forecast_prompt(number: int, weeks: dict[str, list[float]]) -> str:
    """The task-list entry of a forecasting task: ``{variable: cumulative weeks}``."""
    lines = "".join(FORECAST_VARIABLE.format(name=n, weeks=", ".join(map(fmt_number, w))) + "\n"
                    for n, w in weeks.items())
    return f"{task_header(number, FORECASTING)}\n{FORECAST_PROMPT}\n\n{lines}\n"


def qa_bins_text(edges: list[float]) -> str:
    """``a: bin (-inf, 63], b: bin (63, 70.6], ..., e: bin (91.4, inf)`` for 4 inner edges."""
    bounds = ["-inf", *map(fmt_number, edges), "inf"]
    return ", ".join(f"{letter}: bin ({lo}, {hi}{')' if hi == 'inf' else ']'}"
                     for letter, lo, hi in zip("abcde", bounds, bounds[1:]))


def qa_prompt(number: int, weeks: dict[str, list[float]], edges: dict[str, list[float]]) -> str:
    """The task-list entry of a forecasting QA task: each variable's weeks, then its bins."""
    lines = "".join(FORECAST_VARIABLE.format(name=n, weeks=", ".join(map(fmt_number, w))) + "\n"
                    + QA_BINS.format(bins=qa_bins_text(edges[n])) + "\n" for n, w in weeks.items())
    return f"{task_header(number, FORECASTING_QA)}\n{QA_PROMPT}\n{lines}\n"


def event_prompt(number: int, name: str, weeks: float) -> str:
    """The task-list entry of an event task (``weeks``: the horizon)."""
    return (f"{task_header(number, EVENT)}\n{EVENT_PROMPT.format(weeks=fmt_number(weeks), name=name)}\n"
            f"{EVENT_FORMAT}\n\n")


def task_list(prompts: list[str]) -> str:
    """The end of an instruction: the converter's intro sentence and the task prompts."""
    return f"{TASKS_INTRO}\n\n" + "".join(prompts)


def outcome_text(censored: bool, occurred: bool) -> str:
    """``"was not censored and occurred"`` etc. for an event outcome."""
    return next(t for t, v in EVENT_OUTCOMES.items() if v == (censored, occurred))


def event_answer(name: str, censored: bool, occurred: bool) -> str:
    return EVENT_ANSWER.format(name=name, outcome=outcome_text(censored, occurred))


def event_horizons(instruction: str) -> dict[int, tuple[str, float]]:
    """``{task number: (event name, horizon weeks)}`` of the event prompts in an instruction."""
    return {int(n): (name, float(w)) for n, w, name in EVENT_PROMPT_RE.findall(instruction)}


def last_values(instruction: str) -> dict[str, float]:
    """``{variable: value}`` from the summary block's 'The last values of the variables ...' lines
    (values that are not numbers are left out)."""
    m = _LAST_VALUES_RE.search(instruction)
    out = {}
    for line in m.group(1).splitlines() if m else []:
        v = _LAST_VALUE_RE.match(line.rstrip())
        if v:
            try:
                out[v.group(1)] = float(v.group(2))
            except ValueError:
                pass
    return out


def history_end(instruction: str, start: int = 0) -> int:
    """Where the visit history ends: the summary block (its genetic recap holds a ``0 weeks later``
    header that is not a visit) or the task list, whichever comes first after ``start``."""
    found = [i for i in (instruction.find(marker, start) for marker in _HISTORY_ENDS) if i >= 0]
    return min(found, default=len(instruction))


def visit_spans(instruction: str) -> list[tuple[int, int, float | None]]:
    """(start, end, weeks) of every visit block in an instruction, oldest first.

    A block runs from its header to the start of the next header; the last one ends after its
    first blank line. ``weeks`` is None for the first visit. Empty when the text has no visits.
    Headers after the history (the summary block's genetic recap) are not visits.
    """
    first = FIRST_VISIT_RE.search(instruction)
    if first is None:
        return []
    end_of_history = history_end(instruction, first.end())
    headers = [(first.start(), None)] + [
        (m.start(), float(m.group(1)))
        for m in LATER_VISIT_RE.finditer(instruction, first.end(), end_of_history)
    ]
    spans = []
    for i, (start, weeks) in enumerate(headers):
        if i + 1 < len(headers):
            end = headers[i + 1][0]
        else:
            blank = instruction.find("\n\n", start, end_of_history)
            end = end_of_history if blank < 0 else blank + 2
        spans.append((start, end, weeks))
    return spans


def drop_oldest_visits(instruction: str, n: int, spans=None) -> str:
    """Remove the ``n`` oldest visits after the first one (the first visit is always kept).

    The week delta of the next kept visit absorbs the removed visits' deltas, so the time since
    the first visit stays right. ``spans`` may pass a precomputed ``visit_spans(instruction)``.
    """
    spans = visit_spans(instruction) if spans is None else spans
    if n <= 0:
        return instruction
    if n > len(spans) - 1:
        raise ValueError(f"cannot drop {n} visits: only {len(spans) - 1} after the first")
    cut_start, cut_end = spans[1][0], spans[n][1]
    rest = instruction[cut_end:]
    if n + 1 < len(spans):
        weeks = sum(w for _, _, w in spans[1 : n + 2])
        m = LATER_VISIT_RE.match(rest)
        rest = later_visit_header(weeks) + rest[m.end() :]
    return instruction[:cut_start] + rest

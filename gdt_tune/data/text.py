"""The TwinWeaver text format shared by the synthetic generator, the answer parser and the
dataset's history truncation (docs/data-format.md §3). Pure functions, no I/O."""

from __future__ import annotations

import re

FORECASTING = "forecasting"
FORECASTING_QA = "forecasting QA"
EVENT = "time to event prediction"

FIRST_VISIT_HEADER = "On the first visit, the patient experienced the following: "
LATER_VISIT_HEADER = "{weeks} weeks later, the patient visited and experienced the following: "

# A later-visit header on its own line. Tolerant of the converter's quirks (no plural fix,
# optional trailing space) and of decimal week deltas.
LATER_VISIT_RE = re.compile(
    r"^(\d+(?:\.\d+)?) weeks? later, the patient visited and experienced the following:[ \t]*$",
    re.MULTILINE,
)
FIRST_VISIT_RE = re.compile(
    r"^On the first visit, the patient experienced the following:[ \t]*$", re.MULTILINE
)

EVENT_OUTCOMES = {
    # text -> (censored, occurred)
    "was not censored and occurred": (False, True),
    "was not censored and did not occur": (False, False),
    "was censored and did not occur": (True, False),
}


def fmt_number(x: float) -> str:
    """Round to 2 decimals, drop trailing zeros and a trailing '.': 12.0 -> '12', 12.50 -> '12.5'."""
    s = f"{round(float(x), 2):.2f}".rstrip("0").rstrip(".")
    return "0" if s in ("-0", "") else s


def visit_block(header: str, lines: list[str]) -> str:
    """One visit: header line, event lines joined by ',\\n', ended by '.\\n'."""
    return header + "\n" + ",\n".join(lines) + ".\n"


def later_visit_header(weeks: float) -> str:
    return LATER_VISIT_HEADER.format(weeks=fmt_number(weeks))


OUTCOMES = tuple(EVENT_OUTCOMES)  # in this order wherever probabilities over the outcomes are listed


def outcome_text(censored: bool, occurred: bool) -> str:
    """``"was not censored and occurred"`` etc. for an event outcome."""
    return next(t for t, v in EVENT_OUTCOMES.items() if v == (censored, occurred))


def event_answer(name: str, censored: bool, occurred: bool) -> str:
    outcome = outcome_text(censored, occurred)
    return f"Here is the prediction: the event ({name}) {outcome}."


def task_header(number: int, task_type: str) -> str:
    return f"Task {number} is {task_type}:"


def visit_spans(instruction: str) -> list[tuple[int, int, float | None]]:
    """(start, end, weeks) of every visit block in an instruction, oldest first.

    A block runs from its header to the start of the next header; the last one ends after its
    first blank line. ``weeks`` is None for the first visit. Empty when the text has no visits.
    """
    first = FIRST_VISIT_RE.search(instruction)
    if first is None:
        return []
    headers = [(first.start(), None)] + [
        (m.start(), float(m.group(1)))
        for m in LATER_VISIT_RE.finditer(instruction, first.end())
    ]
    spans = []
    for i, (start, weeks) in enumerate(headers):
        if i + 1 < len(headers):
            end = headers[i + 1][0]
        else:
            blank = instruction.find("\n\n", start)
            end = len(instruction) if blank < 0 else blank + 2
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

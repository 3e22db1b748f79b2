"""Parse GDT answer text back into tasks (docs/data-format.md §3; the strings are ``gdt_tune.data.text``'s).

    >>> [t.type for t in parse_answer(sample["answer"])]
    ['time to event prediction', 'forecasting']

Accepts the original TwinWeaver converter's quirks ("1 weeks later", a trailing space after each
visit header). Malformed text raises ``ValueError`` saying what was expected.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from gdt_tune.data.text import EVENT, EVENT_ANSWER, EVENT_OUTCOMES, FORECASTING, FORECASTING_QA, TASK_HEADER_RE

_TASK_RE = TASK_HEADER_RE
#: the same header in bytes (attributing tokens to tasks: ``clinical.validation.label_kinds``)
TASK_HEADER_BYTES = re.compile(_TASK_RE.pattern.encode(), re.MULTILINE)
_VISIT_SPLIT_RE = re.compile(
    r"(?:^|\n)(\d+(?:\.\d+)?) weeks? later, the patient visited and experienced the following:[ \t]*\n"
)
_EVENT_RE = re.compile(
    re.escape(EVENT_ANSWER).replace(r"\{name\}", "(.+?)").replace(r"\{outcome\}",
                                                               "(" + "|".join(map(re.escape, EVENT_OUTCOMES)) + ")"))
_QA_VALUE_RE = re.compile(r"[a-e]")


@dataclass
class Task:
    number: int
    type: str
    event: str | None = None
    censored: bool | None = None
    occurred: bool | None = None
    #: event tasks: where the outcome text ("was not censored and ...") starts in the parsed text
    outcome_start: int | None = field(default=None, compare=False)
    visits: list[tuple[float, dict[str, float | str]]] = field(default_factory=list)


def parse_answer(text: str) -> list[Task]:
    """One ``Task`` per ``Task N is ...:`` block, in order."""
    headers = list(_TASK_RE.finditer(text))
    if not headers:
        raise ValueError("expected at least one 'Task N is <type>:' line in the answer")
    if text[: headers[0].start()].strip():
        raise ValueError("expected the answer to start with 'Task 1 is <type>:'")
    tasks = []
    for i, m in enumerate(headers):
        end = headers[i + 1].start() if i + 1 < len(headers) else len(text)
        number, kind, body = int(m.group(1)), m.group(2), text[m.end() : end]
        try:
            tasks.append(_parse_event(number, body, m.end()) if kind == EVENT else _parse_forecast(number, kind, body))
        except ValueError as e:
            raise ValueError(f"task {number} ({kind}): {e}") from None
    return tasks


def _parse_event(number: int, body: str, body_start: int) -> Task:
    m = _EVENT_RE.fullmatch(body.strip())
    if m is None:
        raise ValueError(
            "expected 'Here is the prediction: the event (<name>) was [not] censored and "
            "[did not occur|occurred].'"
        )
    censored, occurred = EVENT_OUTCOMES[m.group(2)]
    start = body_start + len(body) - len(body.lstrip()) + m.start(2)
    return Task(number, EVENT, event=m.group(1), censored=censored, occurred=occurred, outcome_start=start)


def _parse_forecast(number: int, kind: str, body: str) -> Task:
    parts = _VISIT_SPLIT_RE.split(body)
    # parts = [before first header, weeks, visit text, weeks, visit text, ...]
    if parts[0].strip() or len(parts) < 3:
        raise ValueError("expected '<N> weeks later, the patient visited and experienced the following: ' visits")
    visits = []
    for weeks, content in zip(parts[1::2], parts[2::2]):
        content = content.rstrip()
        if not content.endswith("."):
            raise ValueError(f"expected the visit {weeks} weeks later to end with '.'")
        values = {}
        for item in content[:-1].split(",\n"):
            name, sep, value = item.strip().partition(" is ")
            if not sep or not name:
                raise ValueError(f"expected '<variable> is <value>', got a line without ' is ' ({len(item)} chars)")
            values[name] = _parse_value(kind, value.strip())
        visits.append((float(weeks), values))
    return Task(number, kind, visits=visits)


def _parse_value(kind: str, value: str) -> float | str:
    if kind == FORECASTING_QA:
        if not _QA_VALUE_RE.fullmatch(value):
            raise ValueError("expected a bin letter a-e as a forecasting QA value")
        return value
    assert kind == FORECASTING
    try:
        return float(value)
    except ValueError:
        raise ValueError("expected a number as a forecasting value") from None

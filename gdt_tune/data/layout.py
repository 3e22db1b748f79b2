"""Pure functions for the token layout of docs/data-format.md §4: messages, tokens and labels, truncation and
validation. No I/O; tested with exact token lists."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from enum import IntEnum

from torchtune.data import CROSS_ENTROPY_IGNORE_IDX, Message

from gdt_tune.data.text import drop_oldest_visits, visit_spans

# torchtune 0.6.1's tiktoken limits (modules/transforms/tokenizers/_tiktoken.py): pieces it encodes
# whole, and the longest run of spaces or non-spaces it leaves unsplit
_MAX_ENCODE_CHARS, _MAX_RUN = 400_000, 25_000

#: gdt_tune's own system prompt (docs/data-format.md §4). Pass the original text via ``system_prompt`` to
#: reproduce GDT exactly.
DEFAULT_SYSTEM_PROMPT = (
    "You are a clinical forecasting model for oncology. Given a cancer patient's history of "
    "demographics, genomic results, treatments, laboratory values and prior responses, predict "
    "the patient's future course. Answer every requested task, in order and in the requested "
    "format."
)
#: GDT's token cap per sample (``dataset.max_seq_len``).
DEFAULT_MAX_SEQ_LEN = 8000
#: SHA-256 of the original GDT system prompt (docs/data-format.md §4).
GDT_SYSTEM_PROMPT_SHA256 = "ba8b11af665571cc5f925b66f74d6f8b02dc0c321cbeee7d5418787c4d5dd98e"

TRUNCATION_POLICIES = ("gdt", "drop", "history")
#: how GDT's evaluation prompt opens its system turn (docs/evaluation.md; not its training layout)
GDT_EVAL_DATE_LINES = "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"


def trained_with(dataset) -> tuple[str, int]:
    """(system prompt, max_seq_len) that a ``dataset`` config block, or a dataset's ``settings``,
    says a model was trained with; an unset key is gdt_tune's default (an empty system prompt is a
    prompt, not unset). Used wherever a tool or the recipe needs the training prompt."""
    dataset = dataset or {}
    return system_prompt_or_default(dataset.get("system_prompt")), dataset.get("max_seq_len") or DEFAULT_MAX_SEQ_LEN


def shift_labels(labels: list[int]) -> list[int]:
    """A sample's labels as targets of the position before (position t predicts token t+1); the last
    position predicts nothing. The one place that shifts labels: training rows
    (``training.batches``) and event scoring (``clinical.event_scoring``) both call it."""
    return [*labels[1:], CROSS_ENTROPY_IGNORE_IDX]


def system_prompt_or_default(system_prompt: str | None) -> str:
    """``system_prompt``, or gdt_tune's default when it is None (unset)."""
    return DEFAULT_SYSTEM_PROMPT if system_prompt is None else system_prompt


class Status(IntEnum):
    """What the length cap did to a sample. Values are stored in the index cache."""

    KEPT = 0
    TRUNCATED = 1  # "gdt": cut after max_seq_len tokens
    HISTORY_TRIMMED = 2  # "history": oldest visits removed
    DROPPED_HEADER_CUT = 3  # "gdt": the assistant header does not fit
    DROPPED_TOO_LONG = 4  # "drop"/"history": does not fit

    @property
    def dropped(self) -> bool:
        return self >= Status.DROPPED_HEADER_CUT


def system_prompt_sha256(prompt: str) -> str:
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Layout:
    """The fixed pieces of the layout for one tokenizer and system prompt, tokenized once:

        <|begin_of_text|><|start_header_id|>system<|end_header_id|>\\n\\n{system}<|eot_id|>
        <|start_header_id|>user<|end_header_id|>\\n\\n{instruction}<|eot_id|>
        <|start_header_id|>assistant<|end_header_id|>\\n\\n{answer}<|eot_id|>
    """

    tokenizer: object
    bos_id: int
    eot_id: int
    prefix: tuple[int, ...]  # BOS + whole system turn
    user_header: tuple[int, ...]
    assistant_header: tuple[int, ...]

    @classmethod
    def build(cls, tokenizer, system_prompt: str, answer_role: str = "assistant") -> Layout:
        """``answer_role``: the header the answer follows (``system`` in GDT's evaluation prompt)."""
        def header(role: str) -> tuple[int, ...]:
            toks = tokenizer.tokenize_message(Message(role=role, content=""))
            return tuple(toks[:-1])  # drop the empty body's <|eot_id|>

        system = tokenizer.tokenize_message(Message(role="system", content=system_prompt))
        return cls(tokenizer, tokenizer.bos_id, tokenizer.eot_id, (tokenizer.bos_id, *system),
                   header("user"), header(answer_role))

    def _encode(self, text: str) -> list[int]:
        """``tokenizer.encode(text.strip())`` without BOS/EOS. torchtune's tiktoken ``encode`` walks
        every character in Python to split 400,000-character pieces and runs of more than 25,000
        spaces or non-spaces (tiktoken issue 195), 60% of a sample's cost; text with neither
        (every GDT sample: ``str.split`` splits where ``str.isspace`` says, as that walk does) is
        one call of the BPE, the same ids (tests/test_meta_tokenizer.py)."""
        text = text.strip()
        bpe = getattr(getattr(self.tokenizer, "tt_model", None), "tt_model", None)
        if bpe is not None and len(text) <= _MAX_ENCODE_CHARS:
            words = text.split()
            if max(map(len, words), default=0) <= _MAX_RUN and len(text) - sum(map(len, words)) <= _MAX_RUN:
                return bpe.encode(text, allowed_special=set(), disallowed_special=())
        return self.tokenizer.encode(text, add_bos=False, add_eos=False)

    def prompt_tokens(self, instruction: str) -> list[int]:
        """Everything before the assistant header (all masked)."""
        return [*self.prefix, *self.user_header, *self._encode(instruction), self.eot_id]

    def answer_tokens(self, answer: str) -> list[int]:
        """Assistant header, answer and final <|eot_id|> (all trained)."""
        return [*self.assistant_header, *self._encode(answer), self.eot_id]


def apply_cap(layout: Layout, instruction: str, answer: str, max_seq_len: int,
              truncation: str) -> tuple[list[int], list[int], Status]:
    """Tokens, labels and status of one sample under the length cap (``truncation`` policy).

    - "gdt": keep the first ``max_seq_len`` tokens (no EOS substituted); drop the sample if the
      assistant header does not fit.
    - "drop": drop every over-length sample.
    - "history": remove the oldest visits (never the first) until the sample fits, answer whole;
      drop if it still does not fit.
    Dropped samples come back with empty token lists.
    """
    prompt, reply = layout.prompt_tokens(instruction), layout.answer_tokens(answer)
    status = Status.KEPT
    if len(prompt) + len(reply) > max_seq_len:
        if truncation == "gdt":
            if len(prompt) + len(layout.assistant_header) > max_seq_len:
                return [], [], Status.DROPPED_HEADER_CUT
            reply, status = reply[: max_seq_len - len(prompt)], Status.TRUNCATED
        elif truncation == "history":
            prompt = _trim_history(layout, instruction, max_seq_len - len(reply))
            if prompt is None:
                return [], [], Status.DROPPED_TOO_LONG
            status = Status.HISTORY_TRIMMED
        else:
            return [], [], Status.DROPPED_TOO_LONG
    return prompt + reply, [CROSS_ENTROPY_IGNORE_IDX] * len(prompt) + reply, status


def _trim_history(layout: Layout, instruction: str, budget: int) -> list[int] | None:
    """Prompt tokens with the fewest oldest visits removed so that they fit ``budget``."""
    spans = visit_spans(instruction)

    def prompt(n: int) -> list[int]:
        return layout.prompt_tokens(drop_oldest_visits(instruction, n, spans))

    lo, hi = 1, len(spans) - 1
    if hi < lo or len(best := prompt(hi)) > budget:
        return None
    while lo < hi:  # smallest n that fits; token count falls as visits go
        mid = (lo + hi) // 2
        if len(tokens := prompt(mid)) <= budget:
            hi, best = mid, tokens
        else:
            lo = mid + 1
    return best


def validate(tokens: list[int], labels: list[int], layout: Layout, max_seq_len: int, status: Status) -> None:
    """Check one sample against the layout of docs/data-format.md §4; raise ValueError saying what is wrong."""
    if len(tokens) != len(labels):
        raise ValueError(f"{len(tokens)} tokens but {len(labels)} labels")
    if not tokens or len(tokens) > max_seq_len:
        raise ValueError(f"{len(tokens)} tokens, expected 1..{max_seq_len}")
    if tokens[0] != layout.bos_id or tokens.count(layout.bos_id) != 1:
        raise ValueError("expected exactly one <|begin_of_text|>, as the first token")
    if status != Status.TRUNCATED and tokens[-1] != layout.eot_id:
        raise ValueError("expected <|eot_id|> as the last token")
    masked = labels.count(CROSS_ENTROPY_IGNORE_IDX)  # in C: the masked prompt, when it is all of them
    if labels[:masked] == [CROSS_ENTROPY_IGNORE_IDX] * masked:
        start = masked if masked < len(labels) else None
    else:  # a masked position after the first trained one: found, and refused, below
        start = next(i for i, x in enumerate(labels) if x != CROSS_ENTROPY_IGNORE_IDX)
    header = list(layout.assistant_header)
    if start is None or tokens[start : start + len(header)] != header[: len(tokens) - start]:
        raise ValueError("expected the trained span to start at the assistant header")
    if labels[start:] != tokens[start:]:
        raise ValueError("expected labels to equal tokens from the assistant header on")

"""Exact token layout (docs/data-format.md §4), truncation policies and validation, on the tiny tokenizer."""

import pytest
from torchtune.data import Message

from gdt_tune.data.layout import Layout, Status, apply_cap, validate
from gdt_tune.data.text import drop_oldest_visits, visit_spans

SYSTEM = "  You predict patient trajectories.\n"
INSTRUCTION = (
    "Intro.\nStarting with demographic data:\n\tage of patient is 59 years.\n\n"
    + "On the first visit, the patient experienced the following: \n\tECOG is 0.\n\n"
    + "".join(f"{k} weeks later, the patient visited and experienced the following: \n"
              f"\themoglobin - 718-7 is 1{k}.5,\n\tplatelets - 777-3 is 2{k}0.\n\n" for k in range(1, 9))
    + "The most recent line of therapy: docetaxel.\n\nTask 1 is time to event prediction:\n\tdeath 4 weeks\n"
)
ANSWER = "Task 1 is time to event prediction:\nHere is the prediction: the event (death) was not censored and occurred.\n"


@pytest.fixture(scope="module")
def layout(tokenizer):
    return Layout.build(tokenizer, SYSTEM)


def ids(tok, name):
    return tok.special_tokens[name]


def test_exact_tokens_and_labels(tokenizer, layout):
    enc = lambda s: tokenizer.encode(s, add_bos=False, add_eos=False)  # noqa: E731
    sh, eh, eot = ids(tokenizer, "<|start_header_id|>"), ids(tokenizer, "<|end_header_id|>"), ids(tokenizer, "<|eot_id|>")
    prompt = ([ids(tokenizer, "<|begin_of_text|>"), sh, *enc("system"), eh, *enc("\n\n"), *enc(SYSTEM.strip()), eot,
               sh, *enc("user"), eh, *enc("\n\n"), *enc(INSTRUCTION.strip()), eot])
    reply = [sh, *enc("assistant"), eh, *enc("\n\n"), *enc(ANSWER.strip()), eot]
    tokens, labels, status = apply_cap(layout, INSTRUCTION, ANSWER, 8000, "gdt")
    assert status == Status.KEPT
    assert tokens == prompt + reply
    assert labels == [-100] * len(prompt) + reply
    # the tiny tokenizer's special ids are small, and the text round-trips
    assert tokens[0] == 1014 and tokens[-1] == 1021 and max(tokens) < 1024
    assert tokenizer.decode(tokens, skip_special_tokens=False) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n" + SYSTEM.strip() + "<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n" + INSTRUCTION.strip() + "<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n" + ANSWER.strip() + "<|eot_id|>")


def test_same_as_torchtune_messages_without_trailing_eos(tokenizer, layout):
    """Stock tokenize_messages gives the same sequence plus an <|end_of_text|> that GDT does not train."""
    messages = [Message(role="system", content=SYSTEM, masked=True), Message(role="user", content=INSTRUCTION, masked=True),
                Message(role="assistant", content=ANSWER, masked=False)]
    stock_tokens, stock_mask = tokenizer.tokenize_messages(messages)
    tokens, labels, _ = apply_cap(layout, INSTRUCTION, ANSWER, 8000, "gdt")
    assert stock_tokens[-1] == tokenizer.eos_id
    assert tokens == stock_tokens[:-1]
    assert [lab == -100 for lab in labels] == stock_mask[:-1]


def test_gdt_truncation_keeps_first_tokens_without_eos(layout):
    full, full_labels, _ = apply_cap(layout, INSTRUCTION, ANSWER, 8000, "gdt")
    n_prompt = full_labels.count(-100)
    header = len(layout.assistant_header)
    cap = n_prompt + header + 3
    tokens, labels, status = apply_cap(layout, INSTRUCTION, ANSWER, cap, "gdt")
    assert status == Status.TRUNCATED
    assert tokens == full[:cap] and labels == full_labels[:cap]
    assert tokens[-1] != layout.eot_id
    validate(tokens, labels, layout, cap, status)
    # exactly the header fits: kept, header trained
    tokens, _, status = apply_cap(layout, INSTRUCTION, ANSWER, n_prompt + header, "gdt")
    assert status == Status.TRUNCATED and tokens[n_prompt:] == list(layout.assistant_header)
    # the header does not fit: dropped
    assert apply_cap(layout, INSTRUCTION, ANSWER, n_prompt + header - 1, "gdt") == ([], [], Status.DROPPED_HEADER_CUT)


def test_drop_policy(layout):
    full, _, _ = apply_cap(layout, INSTRUCTION, ANSWER, 8000, "drop")
    assert apply_cap(layout, INSTRUCTION, ANSWER, len(full), "drop")[2] == Status.KEPT
    assert apply_cap(layout, INSTRUCTION, ANSWER, len(full) - 1, "drop") == ([], [], Status.DROPPED_TOO_LONG)


def test_history_policy_removes_fewest_oldest_visits(layout):
    full, _, _ = apply_cap(layout, INSTRUCTION, ANSWER, 8000, "history")
    reply = layout.answer_tokens(ANSWER)
    cap = len(full) - 40
    tokens, labels, status = apply_cap(layout, INSTRUCTION, ANSWER, cap, "history")
    assert status == Status.HISTORY_TRIMMED
    n = next(n for n in range(1, 9)
             if len(layout.prompt_tokens(drop_oldest_visits(INSTRUCTION, n))) + len(reply) <= cap)
    expected_prompt = layout.prompt_tokens(drop_oldest_visits(INSTRUCTION, n))
    assert tokens == expected_prompt + reply  # the answer stays whole
    assert labels == [-100] * len(expected_prompt) + reply
    validate(tokens, labels, layout, cap, status)
    # even with every visit but the first removed it cannot fit: dropped
    only_first = layout.prompt_tokens(drop_oldest_visits(INSTRUCTION, len(visit_spans(INSTRUCTION)) - 1))
    assert apply_cap(layout, INSTRUCTION, ANSWER, len(only_first) + len(reply) - 1, "history")[2] == Status.DROPPED_TOO_LONG


@pytest.mark.parametrize("corrupt, message", [
    (lambda t, lab: (t[:-1], lab), "labels"),
    (lambda t, lab: (t[1:], lab[1:]), "one <|begin_of_text|>"),
    (lambda t, lab: (t[:1] + t, lab[:1] + lab), "one <|begin_of_text|>"),
    (lambda t, lab: (t[:-1], lab[:-1]), "<|eot_id|> as the last"),
    (lambda t, lab: (t, [-100] * 3 + t[3:]), "start at the assistant header"),
    (lambda t, lab: (t, lab[:-1] + [5]), "labels to equal tokens"),
])
def test_validate_rejects_bad_layouts(layout, corrupt, message):
    tokens, labels, status = apply_cap(layout, INSTRUCTION, ANSWER, 8000, "gdt")
    validate(tokens, labels, layout, 8000, status)
    bad_tokens, bad_labels = corrupt(list(tokens), list(labels))
    with pytest.raises(ValueError, match=message.replace("|", r"\|")):
        validate(bad_tokens, bad_labels, layout, 8000, status)


def test_gdts_evaluation_prompt_on_request(tokenizer):
    """``evaluate --prompt gdt``: the system turn opens with GDT's date lines and the answer follows a
    ``system`` header; ``--prompt training`` is the training layout itself."""
    from gdt_tune.eval.evaluate import evaluation_layout

    enc = lambda s: tokenizer.encode(s, add_bos=False, add_eos=False)  # noqa: E731
    sh, eh, eot = ids(tokenizer, "<|start_header_id|>"), ids(tokenizer, "<|end_header_id|>"), ids(tokenizer, "<|eot_id|>")
    gdt = evaluation_layout(tokenizer, SYSTEM, "gdt")
    dates = "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
    system_turn = [ids(tokenizer, "<|begin_of_text|>"), sh, *enc("system"), eh, *enc("\n\n"),
                   *enc(dates + SYSTEM.strip()), eot]
    assert gdt.prompt_tokens(INSTRUCTION)[: len(system_turn)] == system_turn
    assert list(gdt.assistant_header) == [sh, *enc("system"), eh, *enc("\n\n")]
    training = evaluation_layout(tokenizer, SYSTEM, "training")
    assert training == Layout.build(tokenizer, SYSTEM) and gdt.user_header == training.user_header
    assert eot == gdt.eot_id

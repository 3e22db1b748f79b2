"""Event tasks scored in one forward per sample (``gdt-tune evaluate`` and ``val_metrics_samples``).

Each event task's three completions are scored by mean per-token log-probability after the
prompt, the assistant header and the true answer up to that task's outcome. The contexts of a
sample's tasks are prefixes of one sequence (the *trunk*: prompt + true answer up to the last
event outcome), so one forward carries all of them: every completion is a *branch* that starts
with its context's last token (same position id), attends to the trunk before that position and
to itself (boolean mask, ``input_pos``), and predicts its own tokens. The numbers equal a forward
of ``context + completion`` per completion (tests/test_event_scoring.py, 1e-5 in fp32)::

    tasks = event_candidates(layout, record)   # per task: context, 3 candidates, truth, horizon
    packs = pack_sample(tasks, limit=model.max_seq_len)
    (scores,) = score_samples(LossOnlyHead(model, 1), [packs], pad_id, device, batch_size=4)  # [[s0, s1, s2] per task]
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX

from gdt_tune.clinical.metrics import OUTCOMES, outcome_index
from gdt_tune.data.answers import parse_answer
from gdt_tune.data.layout import Layout, shift_labels
from gdt_tune.data.records import event_time, task_target
from gdt_tune.data.text import EVENT, EVENT_CATEGORIES, EVENT_PROMPT, event_horizons


def event_category(record: dict, task) -> str:
    """The task's ``target_category`` (death, progression, lot, metastasis), from ``meta.target_meta``
    or else from the event's name in the text."""
    return task_target(record, task.number).get("target_category") or EVENT_CATEGORIES.get(task.event, task.event)


def event_candidates(layout: Layout, record: dict) -> list[dict]:
    """For each event task: the context tokens (prompt, assistant header, answer up to the
    outcome), the three candidate completions' tokens, the true outcome, the horizon, and from
    ``meta.target_meta`` when present its (``time_weeks``, ``occurred``); its ``category``."""
    answer = record["answer"].strip()
    context = [*layout.prompt_tokens(record["instruction"]), *layout.assistant_header]
    horizons = event_horizons(record["instruction"])
    encode = layout.tokenizer.encode
    out = []
    for task in [t for t in parse_answer(answer) if t.type == EVENT]:
        prefix = answer[: task.outcome_start].rstrip()  # "... the event (death)"; the space goes with the outcome
        if task.number not in horizons:
            raise ValueError(f"the instruction has no event prompt for task {task.number} (expected 'Task "
                             f"{task.number} is time to event prediction:' then '{EVENT_PROMPT[:48]}...')")
        if horizons[task.number][0] != task.event:
            raise ValueError(f"event task {task.number} asks about {horizons[task.number][0]!r} in the instruction but "
                             f"answers about {task.event!r}")
        time_weeks, occurred = event_time(record, task.number)
        out.append({"event": task.event, "truth": outcome_index(task.censored, task.occurred), "task": task.number,
                     "horizon_weeks": horizons[task.number][1], "time_weeks": time_weeks, "occurred": occurred,
                     "category": event_category(record, task),
                     "context": context + encode(prefix, add_bos=False, add_eos=False),
                     # the "." after the outcome may merge with "\n": not scored
                     "candidates": [encode(f" {o}", add_bos=False, add_eos=False) for o in OUTCOMES]})
    return out


@dataclass
class Pack:
    """One sequence: ``trunk`` tokens at positions 0.., then branches ``(start, tokens, scored_from)``
    at positions ``start..``; a branch predicts its tokens from index ``scored_from`` on. ``owners``:
    (task, candidate) of each branch."""

    trunk: list[int]
    branches: list[tuple[int, list[int], int]] = field(default_factory=list)
    owners: list[tuple[int, int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.trunk) + sum(len(b[1]) for b in self.branches)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def pack_sample(tasks: list[dict], limit: int) -> list[Pack]:
    """The sample's sequences (one, unless the branches do not fit ``limit`` tokens beside the trunk)."""
    if not tasks:
        return []
    longest = max((t["context"] for t in tasks), key=len)
    branches = []
    for i, task in enumerate(tasks):
        ctx = task["context"]
        start = min(_common_prefix(ctx, longest), len(ctx) - 1)  # the branch repeats the context's last token
        for j, candidate in enumerate(task["candidates"]):
            branches.append(((start, ctx[start:] + candidate, len(ctx) - 1 - start), (i, j)))
    trunk = longest[: max(b[0][0] for b in branches)]
    packs = [Pack(trunk)]
    for branch, owner in branches:
        if len(packs[-1]) + len(branch[1]) > limit and packs[-1].branches:
            packs.append(Pack(trunk))
        if len(packs[-1]) + len(branch[1]) > limit:
            raise ValueError(f"its {len(trunk) + len(branch[1])} tokens to score exceed the model's max_seq_len "
                             f"({limit})")
        packs[-1].branches.append(branch)
        packs[-1].owners.append(owner)
    return packs


def pack_tensors(packs: list[Pack], pad_id: int) -> dict[str, torch.Tensor]:
    """Padded ``tokens``, ``input_pos``, boolean ``mask`` [b, s, s] (True: attend) and ``labels``
    shifted as training shifts them (``data.layout.shift_labels``) of a batch of packs."""
    length = max(map(len, packs))
    tokens = torch.full((len(packs), length), pad_id, dtype=torch.long)
    labels = torch.full((len(packs), length), CROSS_ENTROPY_IGNORE_IDX, dtype=torch.long)
    pos = torch.zeros((len(packs), length), dtype=torch.long)
    segment = torch.full((len(packs), length), -1, dtype=torch.long)  # -1 pad, 0 trunk, k branch k
    sees_trunk_below = torch.zeros((len(packs), length), dtype=torch.long)
    for b, pack in enumerate(packs):
        n = len(pack.trunk)
        tokens[b, :n] = torch.tensor(pack.trunk, dtype=torch.long)
        pos[b, :n] = torch.arange(n)
        segment[b, :n] = 0
        sees_trunk_below[b, :n] = torch.arange(1, n + 1)
        at = n
        for k, (start, toks, scored_from) in enumerate(pack.branches, start=1):
            end = at + len(toks)
            tokens[b, at:end] = torch.tensor(toks, dtype=torch.long)
            pos[b, at:end] = torch.arange(start, start + len(toks))
            segment[b, at:end] = k
            sees_trunk_below[b, at:end] = start
            scored = [CROSS_ENTROPY_IGNORE_IDX] * (scored_from + 1) + toks[scored_from + 1:]
            labels[b, at:end] = torch.tensor(shift_labels(scored), dtype=torch.long)
            at = end
    index = torch.arange(length)
    trunk_key = (segment == 0)[:, None, :] & (pos[:, None, :] < sees_trunk_below[:, :, None])
    own_branch = ((segment[:, :, None] == segment[:, None, :]) & (segment[:, :, None] > 0)
                  & (index[None, None, :] <= index[None, :, None]))
    mask = trunk_key | own_branch | torch.eye(length, dtype=torch.bool)[None]  # a pad row sees itself only
    return {"tokens": tokens, "labels": labels, "input_pos": pos, "mask": mask}


@torch.no_grad()
def score_packs(head, packs: list[Pack], pad_id: int, device) -> list[float]:
    """Mean log-probability of every branch of ``packs``, in order (one forward).
    ``head``: a :class:`~gdt_tune.training.loss_head.LossOnlyHead` on the model."""
    t = {k: v.to(device) for k, v in pack_tensors(packs, pad_id).items()}
    ce = head(t["tokens"], t["labels"], per_token=True, mask=t["mask"], input_pos=t["input_pos"]).double().cpu()
    out, at = [], 0
    for pack in packs:
        for _, toks, scored_from in pack.branches:
            n = len(toks) - 1 - scored_from
            out.append(-float(ce[at: at + n].mean()))
            at += n
    return out


def task_scores(packs: list[Pack], branch_scores: list[float]) -> list[list[float]]:
    """One sample's branch scores (its packs in order) as ``[[s0, s1, s2] per task]``."""
    owners = [o for pack in packs for o in pack.owners]
    scores = [[0.0] * len(OUTCOMES) for _ in range(max((t for t, _ in owners), default=-1) + 1)]
    for (task, cand), value in zip(owners, branch_scores):
        scores[task][cand] = value
    return scores


def score_samples(head, samples: list[list[Pack]], pad_id: int, device, batch_size: int, progress=None,
                  forwards: int = 0, filler: Pack | None = None, stop=None) -> list[list[list[float]]] | None:
    """``[[s0, s1, s2] per task]`` of each sample's packs, ``batch_size`` packs per forward.
    ``progress(n)`` is called after each forward with its number of packs. With a sharded model,
    ``forwards``: at least that many forwards, the extra ones of ``filler`` (results dropped), so
    that every rank joins the same collectives. ``stop()`` is asked before each forward (every rank
    asks it equally often); when it says True, None is returned at once."""
    flat = [(i, pack) for i, packs in enumerate(samples) for pack in packs]
    branch_scores: list[list[float]] = [[] for _ in samples]
    for start in range(0, len(flat), batch_size):
        if stop is not None and stop():
            return None
        batch = flat[start:start + batch_size]
        values = iter(score_packs(head, [p for _, p in batch], pad_id, device))
        for i, pack in batch:
            branch_scores[i] += [next(values) for _ in pack.branches]
        if progress is not None:
            progress(len(batch))
    for _ in range(forwards - -(-len(flat) // batch_size)):
        if stop is not None and stop():
            return None
        score_packs(head, [filler], pad_id, device)
    return [task_scores(packs, scores) for packs, scores in zip(samples, branch_scores)]

"""What validation logs beside ``val_loss`` (the recipe; the same numbers as ``gdt-tune evaluate``).

- ``val_loss_forecasting`` / ``val_loss_events``: the mean loss of the label tokens of each task
  type. A label token belongs to the task whose ``Task N is <type>:`` header precedes it in the
  answer (the parser's header pattern, on the tokens' bytes); the assistant header before the first
  task belongs to none, the final ``<|eot_id|>`` to the last task. Forecasting QA counts as forecasting.
- ``val_metrics_samples: K``: the event tasks of K fixed validation samples (:func:`metrics_subset`)
  scored in one forward per sample (``clinical.event_scoring``), logged as :func:`event_summary`::

    val_metrics_samples: 256        # 0: off
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from gdt_tune.clinical.event_scoring import Pack, event_candidates, pack_sample
from gdt_tune.clinical.gdt_metrics import cindex_harrell
from gdt_tune.clinical.metrics import event_auroc, event_metrics
from gdt_tune.data.answers import TASK_HEADER_BYTES
from gdt_tune.data.text import EVENT

#: ``val_loss_<kind>``, in the order of :func:`label_kinds` codes
KINDS = ("forecasting", "events")


def metrics_subset(n: int, k: int, seed: int) -> list[int]:
    """The validation samples that ``val_metrics_samples: k`` scores: ``k`` of ``n`` drawn with
    ``seed`` (the run's seed), in index order; all when ``k >= n``."""
    if k >= n:
        return list(range(n))
    return sorted(torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].tolist())


@dataclass
class MetricSamples:
    """The scored validation samples: each one's event tasks, sequences and ``file:line``; and
    the chosen ones left out because they are longer than the model (``too_long``, ``file:line``)."""

    tasks: list[list[dict]] = field(default_factory=list)
    packs: list[list[Pack]] = field(default_factory=list)
    where: list[str] = field(default_factory=list)
    too_long: list[str] = field(default_factory=list)


def choose_metric_samples(dataset, layout, k: int, seed: int, limit: int) -> MetricSamples:
    """:func:`metrics_subset` of ``dataset`` (a ``CGDBInstructDataset``), read and packed once. A
    sample whose scoring sequence exceeds ``limit`` (the model's ``max_seq_len``) is left out:
    training does not stop for a monitoring metric (the recipe warns)."""
    out = MetricSamples()
    for i in metrics_subset(len(dataset), k, seed):
        try:
            tasks = event_candidates(layout, dataset.record(i))
        except ValueError as e:
            raise ValueError(f"{dataset.where(i)}: answer does not parse ({e})") from None
        try:
            out.packs.append(pack_sample(tasks, limit))
        except ValueError:
            out.too_long.append(dataset.where(i))
            continue
        out.tasks.append(tasks)
        out.where.append(dataset.where(i))
    return out


def metric_name(event: str) -> str:
    """``next line of therapy`` -> ``next_line_of_therapy`` (a log key)."""
    return re.sub(r"[^a-z0-9]+", "_", event.lower()).strip("_")


def event_summary(tasks: list[dict], probs: list[list[float]]) -> dict[str, float]:
    """``val_events_accuracy``, ``val_events_brier``, ``val_events_auroc`` (P(occurred), uncensored
    tasks), ``val_events_auroc_<event>`` and ``val_events_cindex`` (Harrell's, from each task's
    ``meta.target_meta`` time and outcome); an AUROC with one class only, or a C-index without a
    comparable pair, is left out."""
    if not tasks:
        return {}
    events, truths = [t["event"] for t in tasks], [t["truth"] for t in tasks]
    m = event_metrics(events, truths, probs)
    auroc = event_auroc(events, [t["horizon_weeks"] for t in tasks], truths, probs, n_boot=0)
    out = {"val_events_accuracy": m["accuracy"], "val_events_brier": m["brier"],
           "val_events_auroc": auroc["all"]["all"]["auroc"], "val_events_cindex": cindex_harrell(tasks, probs)}
    out.update({f"val_events_auroc_{metric_name(e)}": cells["all"]["auroc"] for e, cells in auroc.items() if e != "all"})
    return {k: v for k, v in out.items() if v is not None}


def token_bytes(tokenizer, ids: list[int]) -> list[bytes]:
    """The bytes of each token (torchtune's tiktoken-based Llama 3 tokenizer)."""
    encoding = tokenizer.tt_model.tt_model
    return [encoding.decode_single_token_bytes(i) for i in ids]


def label_kinds(tokenizer, targets: list[int]) -> list[int]:
    """Per label token of one sample (in order): 0 forecasting, 1 events, -1 none (see above)."""
    pieces = token_bytes(tokenizer, targets)
    text = b"".join(pieces)
    headers = [(m.start(), int(m.group(2) == EVENT.encode())) for m in TASK_HEADER_BYTES.finditer(text)]
    kinds, end, h = [], 0, -1
    for piece in pieces:
        end += len(piece)
        while h + 1 < len(headers) and headers[h + 1][0] < end:
            h += 1
        kinds.append(headers[h][1] if h >= 0 else -1)
    return kinds

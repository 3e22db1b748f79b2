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

import torch

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


def metric_name(event: str) -> str:
    """``next line of therapy`` -> ``next_line_of_therapy`` (a log key)."""
    return re.sub(r"[^a-z0-9]+", "_", event.lower()).strip("_")


def event_summary(tasks: list[dict], probs: list[list[float]]) -> dict[str, float]:
    """``val_events_accuracy``, ``val_events_brier``, ``val_events_auroc`` (P(occurred), uncensored
    tasks) and ``val_events_auroc_<event>``; an AUROC with one class only is left out."""
    if not tasks:
        return {}
    events, truths = [t["event"] for t in tasks], [t["truth"] for t in tasks]
    m = event_metrics(events, truths, probs)
    auroc = event_auroc(events, [t["horizon_weeks"] for t in tasks], truths, probs, n_boot=0)
    out = {"val_events_accuracy": m["accuracy"], "val_events_brier": m["brier"],
           "val_events_auroc": auroc["all"]["all"]["auroc"]}
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

"""Validation during training, as torchtitan's ``components/validate.py``: the recipe asks
``should_validate(step)`` and calls ``validate(model, step)``::

    run_val_every_n_steps: 20000    # and at the end; null: at the end only
    batch_size_val: 1               # rows per rank per forward; null: batch_size
    val_metrics_samples: 512        # event metrics of this many fixed validation samples; 0: off

``validate`` logs nothing itself; it returns ``val_loss`` (the mean loss per label token over the
whole validation set, each sample once, in rows laid out as training lays them out:
``training.batches``), ``val_loss_forecasting`` / ``val_loss_events`` and the ``val_events_*`` of the
scored samples (``clinical.validation``), or None when a stop signal cut it short (asked on every
rank before each batch and each scoring forward).
"""

from __future__ import annotations

import logging
import os
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

from gdt_tune.clinical.event_scoring import score_samples
from gdt_tune.clinical.metrics import softmax
from gdt_tune.clinical.validation import KINDS, MetricSamples, choose_metric_samples, event_summary, label_kinds
from gdt_tune.data.layout import Layout
from gdt_tune.datasets import PatientDataset
from gdt_tune.training.batches import IGNORE, EvalRows, RowPlan
from gdt_tune.training.config import Validation
from gdt_tune.training.stop_signals import StopSignals

log = logging.getLogger("gdt_tune")
SAMPLES_FILE = "val_metrics_samples.txt"


class Validator:
    """``dataset``: ``dataset_val``; ``batch_size``: the training batch (``batch_size_val: null``);
    ``layout``: the training prompt's layout; ``max_seq_len``: the model's context (a scored sample
    longer than it is left out, with a warning)."""

    def __init__(self, cfg: Validation, dataset, plan: RowPlan, *, tokenizer, layout: Layout, signals: StopSignals,
                 batch_size: int, seed: int, max_seq_len: int, rank: int, world_size: int, device: torch.device):
        self.cfg, self.dataset = cfg, dataset
        self.tokenizer, self.signals = tokenizer, signals
        self.batch_size = cfg.batch_size_val or batch_size
        self.rank, self.world_size, self.device = rank, world_size, device
        self.validated_step = -1  # the last step whose validation finished
        self.scored = self._choose_scored_samples(layout, seed, max_seq_len)
        # the rows (index order, fixed): laid out once, read again at every validation
        self.rows = EvalRows(dataset, plan, self.batch_size, rank, world_size, tokenizer.pad_id,
                             tag=lambda targets: label_kinds(tokenizer, targets))

    def _choose_scored_samples(self, layout: Layout, seed: int, limit: int) -> MetricSamples:
        """The ``val_metrics_samples`` subset, read and packed once (before the weights load)."""
        k = self.cfg.val_metrics_samples
        if not k:
            return MetricSamples()
        if not isinstance(self.dataset, PatientDataset):
            raise ValueError("config key 'val_metrics_samples': needs dataset_val from "
                             "gdt_tune.datasets.cgdb_instruct_dataset; set val_metrics_samples=0")
        chosen = choose_metric_samples(self.dataset, layout, k, seed, limit)
        if chosen.too_long and self.rank == 0:
            log.warning("val_metrics_samples: %d of the chosen validation samples are longer than model.max_seq_len "
                        "(%d) and are not scored, e.g. %s", len(chosen.too_long), limit, chosen.too_long[0])
        return chosen

    def record_scored_samples(self, output_dir) -> None:
        """Rank 0 lists the scored samples (``file:line``, no text) in ``output_dir/val_metrics_samples.txt``
        for reviewers and for ``gdt-tune evaluate`` of the same samples."""
        chosen = self.scored
        if not chosen.where or self.rank != 0:
            return
        path = os.path.join(output_dir, SAMPLES_FILE)
        with open(path, "w") as f:
            f.writelines(f"{where}\n" for where in chosen.where)
        tasks = sum(map(len, chosen.tasks))
        if tasks == 0:
            log.warning("val_metrics_samples: the %d chosen validation samples hold no event task, so no val_events_* "
                        "is logged (raise val_metrics_samples or check dataset_val)", len(chosen.where))
        else:
            log.info("val_metrics_samples: %d event tasks of %d of the %d validation samples (listed in %s)", tasks,
                     len(chosen.where), len(self.dataset), path)

    def resumed(self, step: int, pending: bool) -> None:
        """A resumed step's validation ran before its save, unless a signal cut it short (``pending``)."""
        if step and self._due(step) and not pending:
            self.validated_step = step

    def _due(self, step: int) -> bool:
        every = self.cfg.run_val_every_n_steps
        return bool(every) and step % every == 0

    def should_validate(self, step: int, last: bool = False) -> bool:
        """On the interval, and after the ``last`` step unless that step was validated already."""
        return (self._due(step) or last) and self.validated_step != step

    @torch.no_grad()
    def validate(self, model, step: int) -> dict[str, float] | None:
        """The metrics of the module docstring. ``model``: the decoder behind its ``LossOnlyHead``
        (``training.loss_head``), as training calls it."""
        head = model
        head.model.eval()
        try:
            values = self._losses(head, self.rows)
            if values is not None and any(self.scored.packs):
                events = self._event_metrics(head)
                values = None if events is None else {**values, **events}
        finally:
            head.model.train()
        if values is not None:
            self.validated_step = step
        return values

    def _losses(self, head, rows: EvalRows) -> dict[str, float] | None:
        # weighted loss sum and label tokens: all, then each of KINDS
        sums = torch.zeros(1 + len(KINDS), dtype=torch.float64, device=self.device)
        counts = torch.zeros(1 + len(KINDS), dtype=torch.float64, device=self.device)
        batches = iter(rows)
        with tqdm(range(rows.num_batches_all_ranks), desc="validation", leave=False,
                  disable=self.rank != 0) as bar:
            for _ in bar:
                if self.signals.poll("validation"):
                    return None
                batch = next(batches, None) or rows.filler()  # a rank with none left keeps the collectives matched
                tokens, labels, kwargs = batch.to(self.device)
                weights = kwargs.pop("weights", None)
                keep = labels != IGNORE
                ce = head(tokens, labels, per_token=True, **kwargs).double()
                w = weights[keep].double() if weights is not None else torch.ones_like(ce)
                kinds = batch.tags.to(self.device)[keep] if batch.tags is not None else torch.full_like(labels[keep], -1)
                sums[0] += (ce * w).sum()
                counts[0] += w.sum()
                known = kinds >= 0
                sums[1:].index_add_(0, kinds[known], (ce * w)[known])
                counts[1:].index_add_(0, kinds[known], w[known])
        totals = torch.cat([sums, counts])
        dist.all_reduce(totals)
        loss, n = totals[:1 + len(KINDS)].tolist(), totals[1 + len(KINDS):].tolist()
        out = {"val_loss": loss[0] / max(n[0], 1.0)}
        out.update({f"val_loss_{kind}": loss[1 + i] / n[1 + i] for i, kind in enumerate(KINDS) if n[1 + i]})
        return out

    def _event_metrics(self, head) -> dict[str, float] | None:
        """The event metrics of the ``val_metrics_samples`` subset with the sharded model in place:
        sample i is scored on rank i % world (one forward per sample, ``clinical.event_scoring``),
        every rank runs as many forwards (FSDP's all-gathers stay matched), the scores are gathered."""
        started = time.perf_counter()
        packs, world = self.scored.packs, self.world_size
        mine = range(self.rank, len(packs), world)
        forwards = max(-(-sum(len(packs[i]) for i in range(r, len(packs), world)) // self.batch_size)
                       for r in range(world))
        scores = score_samples(head, [packs[i] for i in mine], self.tokenizer.pad_id, self.device, self.batch_size,
                               forwards=forwards, filler=next(p for sample in packs for p in sample),
                               stop=lambda: self.signals.poll("event scoring"))
        if scores is None:  # a stop signal
            return None
        parts = [None] * world
        dist.all_gather_object(parts, dict(zip(mine, scores)))
        by_sample = {i: s for part in parts for i, s in part.items()}
        tasks = [t for sample in self.scored.tasks for t in sample]
        probs = [softmax(s) for i in range(len(packs)) for s in by_sample[i]]
        return {**event_summary(tasks, probs), "val_metrics_seconds": time.perf_counter() - started}

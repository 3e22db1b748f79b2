"""Batch samplers whose order depends only on the seed, the epoch and the position, so a run can
resume at any step by recomputing where it was (no hidden iterator state)."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import Sampler


def balanced_order(order: list[int], lengths, group: int, window: int, seed: int) -> list[int]:
    """``order`` rearranged so that each run of ``group`` consecutive samples has similar lengths:
    the order is cut into windows of ``group x window`` samples, each window sorted by length
    (stable), cut into groups of ``group``, and all groups of the epoch shuffled (seeded by
    ``seed``); a last partial group stays last. A permutation of ``order`` that depends only on it,
    the lengths, ``group``, ``window`` and ``seed``: not on world size, batch size or accumulation.

    YAML (the recipe; docs/performance.md, "Length-balanced steps")::

        balanced_steps: true
        balance_group: 8        # samples per group; null (default): the global batch (batch_size x ranks x accumulation)
        balance_window: 64      # groups sorted together: larger balances better, shuffles less
    """
    order, span = np.asarray(order, dtype=np.int64), group * window
    by_length = np.asarray(lengths)[order]
    ranked = np.concatenate([order[s:s + span][np.argsort(by_length[s:s + span], kind="stable")]
                             for s in range(0, len(order), span)] or [order])
    full = len(ranked) // group * group
    groups = ranked[:full].reshape(-1, group)
    shuffled = groups[torch.randperm(len(groups), generator=torch.Generator().manual_seed(seed)).numpy()]
    return np.concatenate([shuffled.reshape(-1), ranked[full:]]).tolist()


def rank_balance(works) -> float:
    """Mean over ranks of a step's per-rank work divided by the largest (1.0: no rank waits)."""
    works = [float(w) for w in works]
    return sum(works) / len(works) / max(works) if max(works) > 0 else 1.0


def expected_rank_balance(lengths, world_size: int, window: int = 64, seed: int = 0) -> tuple[float, float]:
    """(random, balanced): the mean :func:`rank_balance` over the steps of one epoch at
    ``world_size`` ranks with one sample per rank, in a random order and in :func:`balanced_order`
    (groups of ``world_size``), a sample's work being its training FLOPs at the Llama-3.1-8B shape
    (``training.mfu``, attention included)."""
    from gdt_tune.training.mfu import LLAMA3_1_8B, flops_per_token

    lengths = np.asarray(lengths, dtype=np.float64)
    work = lengths * flops_per_token(*LLAMA3_1_8B, lengths)
    order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed)).tolist()
    steps = len(lengths) // world_size * world_size

    def mean_balance(o) -> float:
        per_step = work[np.asarray(o[:steps], dtype=np.int64)].reshape(-1, world_size)
        return float(np.mean(per_step.mean(axis=1) / per_step.max(axis=1))) if steps else 1.0

    return mean_balance(order), mean_balance(balanced_order(order, lengths, world_size, window, seed + 1))


class GlobalOrderBatchSampler(Sampler[list]):
    """This rank's micro-batches of one global order per epoch, from any sample on.

    ``order`` is ``randperm(n)`` seeded with ``seed + epoch`` (or ``range(n)`` without shuffling):
    it depends on neither the world size nor the batch size. Started at sample ``S`` (the samples
    of the epoch consumed so far), micro-batch ``m`` is ``order[S + m*B*W + r*B : S + m*B*W + (r+1)*B]``
    for rank ``r`` of ``W`` with ``B`` samples per rank; an incomplete last global micro-batch is
    dropped, so every rank yields the same number of batches. A step of ``a`` accumulated
    micro-batches thus takes samples ``S .. S + B*W*a`` of the order, whatever ``B``, ``W`` and
    ``a`` are, which is what lets a run resume on another number of ranks. With ``lengths`` (the
    samples' token counts) the order is :func:`balanced_order` of it, in groups of ``group``.

    With ``rows`` (``rows(order, seed) -> [row, ...]``, ``training.batches.RowPlan.rows``) the order
    is cut into rows first and the batches hold rows instead of samples (``samples_of(row)`` samples
    each); ``S`` is then the samples of the rows consumed, which the same rows reach on any world size.
    """

    def __init__(self, num_samples: int, batch_size: int, rank: int, world_size: int, seed: int, shuffle: bool,
                 lengths=None, group: int = 0, window: int = 64, rows=None, samples_of=None):
        self.num_samples, self.batch_size = num_samples, batch_size
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.lengths, self.group, self.window = lengths, group, window
        self._rows, self._samples_of = rows, samples_of
        self._cache: tuple[int, list, np.ndarray] | None = None  # (epoch, its rows, samples before each row)
        self.epoch, self.first = 0, 0

    def set_epoch(self, epoch: int, start_sample: int = 0) -> None:
        """Iterate epoch ``epoch`` from sample ``start_sample`` of its global order on."""
        self.epoch, self.first = epoch, self._first_row(epoch, start_sample)

    def order(self, epoch: int | None = None) -> list[int]:
        epoch = self.epoch if epoch is None else epoch
        if not self.shuffle:
            order = list(range(self.num_samples))
        else:
            g = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.num_samples, generator=g).tolist()
        if self.lengths is None:
            return order
        return balanced_order(order, self.lengths, self.group, self.window, seed=self.seed + epoch + 7919)

    def rows(self, epoch: int) -> tuple[list, np.ndarray]:
        """The epoch's rows and the samples before each (one more entry: all of them)."""
        if self._cache is None or self._cache[0] != epoch:
            order = self.order(epoch)
            rows = order if self._rows is None else self._rows(order, self.seed + epoch)
            sizes = [1] * len(rows) if self._rows is None else [self._samples_of(r) for r in rows]
            self._cache = (epoch, rows, np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]))
        return self._cache[1], self._cache[2]

    def _first_row(self, epoch: int, start_sample: int) -> int:
        rows, before = self.rows(epoch)
        first = int(np.searchsorted(before, start_sample))
        if first >= len(before) or before[first] != start_sample:
            raise ValueError(f"resume: sample {start_sample} of epoch {epoch} is not where a row starts, so the rows "
                             "are not those the checkpoint was written with; resume with the packing settings it was "
                             "written with, or start a new run in a new output_dir")
        return first

    def rows_left(self, epoch: int, start_sample: int = 0) -> int:
        return len(self.rows(epoch)[0]) - self._first_row(epoch, start_sample)

    def __len__(self) -> int:
        return max(0, len(self.rows(self.epoch)[0]) - self.first) // (self.batch_size * self.world_size)

    def __iter__(self):
        rows, per_micro_batch = self.rows(self.epoch)[0], self.batch_size * self.world_size
        for m in range(len(self)):
            first = self.first + m * per_micro_batch + self.rank * self.batch_size
            yield rows[first : first + self.batch_size]


class EvalBatchSampler(Sampler[list[int]]):
    """Every sample exactly once over all ranks (rank r takes r, r+W, ...), in batches. Ranks may
    hold one batch fewer than others: ``num_batches_all_ranks`` says how many steps to run so that
    collectives stay matched."""

    def __init__(self, num_samples: int, batch_size: int, rank: int, world_size: int):
        self.indices = list(range(rank, num_samples, world_size))
        self.batch_size = batch_size
        self.num_batches_all_ranks = math.ceil(math.ceil(num_samples / world_size) / batch_size)

    def __len__(self) -> int:
        return math.ceil(len(self.indices) / self.batch_size)

    def __iter__(self):
        for i in range(0, len(self.indices), self.batch_size):
            yield self.indices[i : i + self.batch_size]

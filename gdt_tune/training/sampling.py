"""Batch samplers whose order depends only on the seed, the epoch and the position, so a run can
resume at any step by recomputing where it was (no hidden iterator state)."""

from __future__ import annotations

import math

import torch
from torch.utils.data import Sampler


class GlobalOrderBatchSampler(Sampler[list[int]]):
    """This rank's micro-batches of one global order per epoch, from any sample on.

    ``order`` is ``randperm(n)`` seeded with ``seed + epoch`` (or ``range(n)`` without shuffling):
    it depends on neither the world size nor the batch size. Started at sample ``S`` (the samples
    of the epoch consumed so far), micro-batch ``m`` is ``order[S + m*B*W + r*B : S + m*B*W + (r+1)*B]``
    for rank ``r`` of ``W`` with ``B`` samples per rank; an incomplete last global micro-batch is
    dropped, so every rank yields the same number of batches. A step of ``a`` accumulated
    micro-batches thus takes samples ``S .. S + B*W*a`` of the order, whatever ``B``, ``W`` and
    ``a`` are, which is what lets a run resume on another number of ranks.
    """

    def __init__(self, num_samples: int, batch_size: int, rank: int, world_size: int, seed: int, shuffle: bool):
        self.num_samples, self.batch_size = num_samples, batch_size
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start_sample: int = 0) -> None:
        """Iterate epoch ``epoch`` from sample ``start_sample`` of its global order on."""
        self.epoch, self.start = epoch, start_sample

    def order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_samples))
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.num_samples, generator=g).tolist()

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start) // (self.batch_size * self.world_size)

    def __iter__(self):
        order, per_micro_batch = self.order(), self.batch_size * self.world_size
        for m in range(len(self)):
            first = self.start + m * per_micro_batch + self.rank * self.batch_size
            yield order[first : first + self.batch_size]


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

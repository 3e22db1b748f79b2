"""Batch samplers whose order depends only on the seed, the epoch and the position, so a run can
resume at any step by recomputing where it was (no hidden iterator state)."""

from __future__ import annotations

import math

import torch
from torch.utils.data import Sampler


class GlobalOrderBatchSampler(Sampler[list[int]]):
    """This rank's micro-batches of one global order per epoch.

    Micro-batch ``m`` of the epoch is ``order[m*B*W + r*B : m*B*W + (r+1)*B]`` for rank ``r`` of
    ``W`` with ``B`` samples per rank; the incomplete last global micro-batch is dropped, so every
    rank yields the same number of batches. ``order`` is ``randperm(n)`` seeded with
    ``seed + epoch`` (or ``range(n)`` without shuffling).
    """

    def __init__(self, num_samples: int, batch_size: int, rank: int, world_size: int, seed: int, shuffle: bool):
        self.num_samples, self.batch_size = num_samples, batch_size
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.start = 0, 0

    @property
    def micro_batches_per_epoch(self) -> int:
        return self.num_samples // (self.batch_size * self.world_size)

    def set_epoch(self, epoch: int, start_micro_batch: int = 0) -> None:
        """Iterate epoch ``epoch`` from global micro-batch ``start_micro_batch`` on."""
        self.epoch, self.start = epoch, start_micro_batch

    def order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_samples))
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.num_samples, generator=g).tolist()

    def __len__(self) -> int:
        return max(0, self.micro_batches_per_epoch - self.start)

    def __iter__(self):
        order, per_step = self.order(), self.batch_size * self.world_size
        for m in range(self.start, self.micro_batches_per_epoch):
            first = m * per_step + self.rank * self.batch_size
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

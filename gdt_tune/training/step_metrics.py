"""What a logged step reports beside its loss, over the steps since the last log (as torchtitan's
``MetricsProcessor``)::

    metrics = StepMetrics(world_size, flops_per_token, peak_tflops, device, log_peak_memory, row_length)
    metrics.add(counts)                         # every step (training.batches.StepCounts)
    payload = metrics.payload(loss=..., lr=..., tokens_seen=..., grad_norm=...)   # every log_every_n_steps

Keys: ``tokens_per_second_per_device`` (the rows' tokens, padding left out),
``label_tokens_per_second_per_device``, ``rank_balance``, ``mfu`` (with a known GPU peak: PaLM's FLOPs,
the attention span of each token being its own sample's), peak CUDA memory, and with packed rows
``pack_fill`` (tokens / row capacity) and ``samples_per_row``; with shared prefixes
``sample_tokens_per_second_per_device`` (the separate samples' tokens a second) and ``prefix_sharing``
(the separate samples' tokens / the tokens trained, since the run started: data-report's ratio).
"""

from __future__ import annotations

import time

import torch

from gdt_tune.training.batches import StepCounts
from gdt_tune.training.mfu import mfu


class StepMetrics:
    """``row_length``: a packed row's tokens (None: one sample a row, no packing keys)."""

    def __init__(self, world_size: int, flops_per_token, peak_tflops: float | None, device: torch.device,
                 log_peak_memory: bool, row_length: int | None = None):
        self.world_size, self.flops_per_token, self.peak_tflops = world_size, flops_per_token, peak_tflops
        self.device, self.log_peak_memory, self.row_length = device, log_peak_memory, row_length
        self._reset()

    def _reset(self) -> None:
        self._sum = {"labels": 0.0, "tokens": 0.0, "sample_tokens": 0.0, "samples": 0.0, "rows": 0.0,
                     "attention_work": 0.0, "rank_balance": 0.0}
        self._steps = 0
        self._since = time.perf_counter()

    def add(self, counts: StepCounts) -> None:
        for key in self._sum:
            self._sum[key] += getattr(counts, key)
        self._steps += 1

    def first_step(self, started: float) -> float:
        """Seconds of the first step of this process (torch.compile compiles in it)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - started

    def payload(self, *, loss: float, lr: float, tokens_seen: int, sample_tokens_seen: int | None = None,
                grad_norm: float | None = None) -> dict:
        s, seconds = self._sum, time.perf_counter() - self._since
        per_device = s["tokens"] / self.world_size / seconds
        out = {"loss": loss, "lr": lr, "tokens_per_second_per_device": per_device,
               "label_tokens_per_second_per_device": s["labels"] / self.world_size / seconds,
               "tokens_seen": tokens_seen, "rank_balance": s["rank_balance"] / max(self._steps, 1)}
        if grad_norm is not None:
            out["grad_norm"] = grad_norm
        if self.peak_tflops is not None:
            context = s["attention_work"] / max(s["tokens"], 1.0)  # a sample of n tokens: n
            out["mfu"] = mfu(per_device, self.flops_per_token(context), self.peak_tflops)
        if self.row_length is not None:
            out["pack_fill"] = s["tokens"] / max(s["rows"] * self.row_length, 1.0)
            out["samples_per_row"] = s["samples"] / max(s["rows"], 1.0)
        if sample_tokens_seen is not None and sample_tokens_seen > tokens_seen:  # a trie trains shared tokens once
            out["sample_tokens_per_second_per_device"] = s["sample_tokens"] / self.world_size / seconds
            out["prefix_sharing"] = sample_tokens_seen / tokens_seen
        if self.device.type == "cuda" and self.log_peak_memory:
            out["peak_memory_alloc_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            out["peak_memory_reserved_gib"] = torch.cuda.max_memory_reserved(self.device) / 2**30
        self._reset()
        return out

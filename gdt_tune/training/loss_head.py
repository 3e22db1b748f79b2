"""The output head only where there is a loss: a GDT sample is ~90% prompt, whose positions carry
no label (-100), yet a decoder projects every position onto the 128k vocabulary (~5% of the 8B
model's FLOPs per token, and ~3 GiB of chunked logits at 8k tokens). :class:`LossOnlyHead` takes
the decoder's ``unembed`` (final norm + output projection): the decoder then returns the summed
cross-entropy of the labelled positions, computed in chunks of those positions only. The math is
the same as projecting everything and ignoring -100 (tests/test_loss_head.py: loss and every
gradient within 1e-6 relative in fp32). It runs inside the decoder's forward, so FSDP2's
unsharding of the root and of a separately sharded ``output`` works as for the stock head::

    head = LossOnlyHead(model, num_chunks=8)       # the recipe: loss.num_output_chunks
    ce_sum = head(tokens, labels)                  # labels already shifted (data.layout.shift_labels)
    ce_sum = head(tokens, labels, weights=w, mask=mask, input_pos=pos)    # a label shared by k samples: weight k
    ce = head(tokens, labels, per_token=True, mask=mask, input_pos=pos)   # one value per labelled position
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX

from gdt_tune.runtime.torch_env import compile_backend


def _chunk_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), target, reduction="sum")


def _weighted_chunk_loss(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return (F.cross_entropy(logits.float(), target, reduction="none") * weight).sum()


class LossOnlyHead:
    """``compile``: compile the per-chunk cross-entropy (dynamic shapes: the labelled positions vary)."""

    def __init__(self, model, num_chunks: int, compile: bool = False):
        self.model, self.num_chunks = model, max(1, num_chunks)
        self._labels: torch.Tensor | None = None
        self._weights: torch.Tensor | None = None
        self._per_token = False
        compiled = (lambda fn: torch.compile(fn, dynamic=True, backend=compile_backend())) if compile else (lambda fn: fn)
        self._chunk_loss, self._weighted_chunk_loss = compiled(_chunk_loss), compiled(_weighted_chunk_loss)
        model.unembed = types.MethodType(self._unembed, model)

    def __call__(self, tokens: torch.Tensor, labels: torch.Tensor, *, per_token: bool = False,
                 weights: torch.Tensor | None = None, **model_kwargs) -> torch.Tensor:
        """Summed cross-entropy over the positions of ``labels`` that are not -100, each times its
        ``weights`` entry when given; with ``per_token``, the (unweighted) cross-entropy of each of
        those positions (row-major order, fp32). ``model_kwargs`` (``mask``, ``input_pos``) go to the
        decoder."""
        self._labels, self._weights, self._per_token = labels, weights, per_token
        try:
            return self.model(tokens, **model_kwargs)
        finally:
            self._labels = self._weights = None

    def _unembed(self, model, h: torch.Tensor) -> torch.Tensor:
        if self._labels is None:  # the model called directly, not through the head: the stock output
            return type(model).unembed(model, h)
        keep = self._labels != CROSS_ENTROPY_IGNORE_IDX
        hidden, targets = model.norm(h)[keep], self._labels[keep]
        # exactly num_chunks calls of the output layer on every rank (some may be empty): with a
        # separately sharded output, each call is an FSDP all-gather that all ranks must join
        pairs = zip(torch.tensor_split(hidden, self.num_chunks), torch.tensor_split(targets, self.num_chunks))
        if self._per_token:
            return torch.cat([F.cross_entropy(model.output(part).float(), target, reduction="none")
                              for part, target in pairs])
        total = h.new_zeros((), dtype=torch.float32)
        if self._weights is None:
            for part, target in pairs:
                total = total + self._chunk_loss(model.output(part), target)
            return total
        for (part, target), weight in zip(pairs, torch.tensor_split(self._weights[keep], self.num_chunks)):
            total = total + self._weighted_chunk_loss(model.output(part), target, weight)
        return total

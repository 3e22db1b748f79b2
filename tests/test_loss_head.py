"""The loss-only head is the same math as projecting every position and ignoring -100: loss and
every parameter's gradient in fp32, on a tiny Llama 3 with GDT-like labels (answer only)."""

import copy

import pytest
import torch
from torchtune.models.llama3 import llama3
from torchtune.modules.loss import CEWithChunkedOutputLoss

from gdt_tune.cli.demo_assets import TINY_MODEL
from gdt_tune.training.loss_head import LossOnlyHead


def _batch(seed=0, batch=2, length=300, answer=30):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, TINY_MODEL["vocab_size"], (batch, length), generator=g)
    labels = torch.full_like(tokens, -100)
    labels[0, -answer:] = tokens[0, -answer:]  # the answer of sample 0
    labels[1, length // 2: length // 2 + answer // 2] = tokens[1, length // 2: length // 2 + answer // 2]
    return tokens, labels


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("chunks", [8, 1])
def test_loss_and_gradients_equal_the_full_head_in_fp32(chunks):
    torch.manual_seed(0)
    full = llama3(**TINY_MODEL)
    ours = copy.deepcopy(full)
    tokens, labels = _batch()
    loss_fn = CEWithChunkedOutputLoss(num_output_chunks=chunks)
    full.set_num_output_chunks(chunks)
    logits = full(tokens)
    reference = sum(loss_fn.compute_cross_entropy(lc.reshape(-1, lc.size(-1)), lab.reshape(-1))
                    for lc, lab in zip(logits, labels.chunk(chunks, dim=1)))
    reference.backward()
    loss = LossOnlyHead(ours, chunks)(tokens, labels)
    loss.backward()
    assert abs(loss.item() - reference.item()) <= 1e-6 * abs(reference.item())
    want, got = _grads(full), _grads(ours)
    assert want.keys() == got.keys() and len(want) == len(list(full.parameters()))
    for name in want:
        error = (got[name] - want[name]).norm() / want[name].norm()
        assert error <= 1e-6, (name, error.item())


def test_a_batch_without_labels_gives_zero_and_calls_the_output_layer_num_chunks_times():
    """A rank whose validation ran out runs a fully masked batch: the same number of output-layer
    calls as the other ranks (each is an FSDP all-gather when the output is sharded on its own)."""
    model = llama3(**TINY_MODEL)
    calls = []
    model.output.register_forward_hook(lambda *a: calls.append(1))
    tokens, labels = _batch()
    assert LossOnlyHead(model, 8)(tokens, torch.full_like(labels, -100)).item() == 0.0
    assert len(calls) == 8

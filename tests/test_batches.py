"""Every way of filling a row gives the loss and the gradients of the separate samples (fp32, CPU,
the tiny Llama 3): one sample a row, packed rows (document-causal mask, positions restarting at 0),
and a patient's samples as a trie (shared prefixes once, labels shared by k samples weighted k).
Also: the mask a GPU gets (flex attention's block mask) is the mask the CPU gets, the rows of an
epoch are a fixed function of the order, and float8's padding to 16 tokens changes no loss."""

import pytest
import torch
from torchtune.models.llama3 import llama3

from gdt_tune.cli.demo_assets import TINY_MODEL
from gdt_tune.training.batches import (
    IGNORE,
    Batch,
    RowPlan,
    attention_mask,
    best_fit_rows,
    collate,
    flex_block_mask,
    lay_out,
    trie_size,
)
from gdt_tune.training.loss_head import LossOnlyHead

PAD = 1000


def sample(tokens: list[int], answer_from: int) -> dict:
    """A sample as the dataset gives it: labels -100 before ``answer_from``, the tokens after."""
    return {"tokens": list(tokens), "labels": [IGNORE] * answer_from + list(tokens[answer_from:])}


def _rand(n: int, seed: int) -> list[int]:
    return torch.randint(0, 999, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = llama3(**TINY_MODEL).float()
    return m, LossOnlyHead(m, num_chunks=3)


def _loss_and_grads(model, batches: list[Batch]):
    """The mean loss per (weighted) label over ``batches`` and every parameter's gradient."""
    m, head = model
    m.zero_grad(set_to_none=True)
    total = sum(b.label_count() for b in batches)
    loss = 0.0
    for b in batches:
        tokens, labels, kwargs = b.to(torch.device("cpu"))
        ce = head(tokens, labels, **kwargs) / total
        ce.backward()
        loss += float(ce)
    return loss, {n: p.grad.clone() for n, p in m.named_parameters()}


def _separately(model, samples: list[dict]):
    return _loss_and_grads(model, [collate([[[s]]], PAD) for s in samples])


def _assert_same(ours, theirs, tol=1e-5):
    assert ours[0] == pytest.approx(theirs[0], rel=tol)
    for name, grad in theirs[1].items():
        assert torch.allclose(ours[1][name], grad, rtol=tol, atol=tol * grad.abs().max()), name


def test_one_sample_a_row_is_the_stock_layout():
    """Labels shifted once per sample, rows padded to the longest; no mask or positions (causal)."""
    a, b = sample([5, 6, 7, 8], 2), sample([9, 10, 11], 1)
    batch = collate([[[a]], [[b]]], PAD)
    assert batch.tokens.tolist() == [[5, 6, 7, 8], [9, 10, 11, PAD]]
    assert batch.labels.tolist() == [[IGNORE, 7, 8, IGNORE], [10, 11, IGNORE, IGNORE]]
    assert batch.input_pos is None and batch.span_end is None and batch.weights is None
    assert (batch.samples, batch.real_tokens, batch.sample_tokens, batch.label_count()) == (2, 7, 7, 4)
    padded = collate([[[a]], [[b]]], PAD, multiple=16)
    assert padded.tokens.shape == (2, 16) and padded.labels[:, 4:].eq(IGNORE).all() and padded.real_tokens == 7


def test_packed_rows_equal_the_separate_samples(model):
    samples = [sample(_rand(n, n), n // 2) for n in (40, 23, 61, 17, 33)]
    rows = [[[samples[0]], [samples[1]], [samples[3]]], [[samples[2]], [samples[4]]]]
    batch = collate(rows, PAD, length=128)
    assert batch.tokens.shape == (2, 128) and batch.samples == 5
    # positions restart at 0 in every sample; a sample's last position predicts nothing
    assert batch.input_pos[0, 40:63].tolist() == list(range(23)) and batch.labels[0, 39] == IGNORE
    assert batch.span_end[0, 40:63].eq(63).all() and batch.span_end[0, 80:].tolist() == list(range(81, 129))
    _assert_same(_loss_and_grads(model, [batch]), _separately(model, samples))


def _patient(seed: int = 0) -> list[dict]:
    """Samples of one patient: a shared history, splits that continue it, answers on their own."""
    history, more, later = _rand(50, seed), _rand(20, seed + 1), _rand(15, seed + 2)
    a = history + more + _rand(12, seed + 3)                     # split 1: history, more, answer
    b = history + more + _rand(10, seed + 4)                     # split 2: same history, another answer
    c = a + later + _rand(9, seed + 5)                           # split 3: holds split 1 whole in its instruction
    d = history + _rand(14, seed + 6)                            # split 4: shorter history
    same_question = history + more + a[70:76] + _rand(5, seed + 7)  # split 1's question, an answer sharing its start
    return [sample(a, 70), sample(b, 70), sample(c, len(a) + 15), sample(d, 50), sample(same_question, 70)]


def test_a_trie_shares_prefixes_and_equals_the_separate_samples(model):
    samples = _patient()
    doc = lay_out(samples)
    separate = sum(len(s["tokens"]) for s in samples)
    assert len(doc.tokens) < separate * 0.55  # the history once
    # each sample ends at a node that sees exactly its tokens, one at each position 0..n-1 (its path)
    for s in samples:
        n = len(s["tokens"])
        paths = [[kv for kv in range(len(doc.tokens)) if kv <= q < doc.span_end[kv]]
                 for q in range(len(doc.tokens)) if doc.positions[q] == n - 1]
        assert any([doc.tokens[i] for i in path] == s["tokens"] and [doc.positions[i] for i in path] == list(range(n))
                   for path in paths)
    batch = collate([[samples]], PAD)
    assert batch.sample_tokens == separate and batch.real_tokens == len(doc.tokens)
    _assert_same(_loss_and_grads(model, [batch]), _separately(model, samples))


def test_duplicates_weigh_k_and_a_trie_split_across_rows_is_exact(model):
    samples = _patient(seed=10)
    twice = [*samples, samples[1], samples[1]]  # sample 2 three times
    batch = collate([[twice]], PAD)
    assert batch.weights is not None and batch.weights.max() == 3.0
    assert batch.real_tokens == len(lay_out(samples).tokens)  # duplicates add no token
    _assert_same(_loss_and_grads(model, [batch]), _separately(model, twice))
    # the same samples as two tries in two rows, each repeating its own prefix, plus another patient
    other = _patient(seed=20)[:2]
    rows = [[samples[:2], other], [samples[2:]]]
    _assert_same(_loss_and_grads(model, [collate(rows, PAD, length=256)]), _separately(model, samples + other))


def test_the_block_mask_of_a_gpu_is_the_dense_mask_of_the_cpu():
    """flex attention with the block mask (what CUDA runs) equals scaled dot-product attention with
    the dense mask (what the CPU runs), on packed rows and a trie."""
    from torch.nn.attention.flex_attention import flex_attention

    samples = _patient(seed=3)
    batch = collate([[samples[:3], [samples[3]]], [[samples[4]], samples[:2]]], PAD, length=200)
    dense = attention_mask(batch.span_end)
    q, k, v = (torch.randn(2, 2, 200, 16, generator=torch.Generator().manual_seed(i)) for i in range(3))
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense[:, None])
    got = flex_attention(q, k, v, block_mask=flex_block_mask(batch.span_end))
    assert torch.allclose(got, expected, atol=1e-5)


def test_best_fit_rows_fill_windows_and_depend_only_on_their_arguments():
    sizes = torch.randint(100, 1000, (400,), generator=torch.Generator().manual_seed(0)).tolist()
    rows = best_fit_rows(sizes, 1000, 200, seed=5)
    assert sorted(i for r in rows for i in r) == list(range(400))  # each item once
    assert all(sum(sizes[i] for i in r) <= 1000 for r in rows)
    assert all(max(r) < 200 or min(r) >= 200 for r in rows)  # never across windows
    assert sum(sizes) / (len(rows) * 1000) > 0.9
    assert rows == best_fit_rows(sizes, 1000, 200, seed=5) != best_fit_rows(sizes, 1000, 200, seed=6)
    plan = RowPlan(packing=True, capacity=1000, window=200, lengths=sizes)
    assert plan.rows(list(range(400)), seed=5) == [tuple((i,) for i in r) for r in rows]


def test_trie_size_counts_shared_prefixes_once():
    assert trie_size([[1, 2, 3], [1, 2, 4], [1, 2, 3], [5]]) == 5
    assert trie_size([[1, 2], [1, 2, 3, 4]]) == 4


def test_float8_padding_to_16_tokens_changes_no_loss():
    """torchao's float8 matmuls need token counts divisible by 16 (the weight-gradient matmul's inner
    dimension): rows are padded, the padding carries no label. In torchao's emulation on CPU the loss
    and the gradients of odd-length rows are those of the padded rows."""
    from gdt_tune.training.float8 import convert_to_float8

    torch.manual_seed(0)
    m = llama3(**TINY_MODEL).float()
    assert convert_to_float8(m, emulate=True)
    head = LossOnlyHead(m, num_chunks=2)
    samples = [sample(_rand(n, n), n // 3) for n in (37, 21)]
    odd = _loss_and_grads((m, head), [collate([[[s]] for s in samples], PAD)])
    padded_batch = collate([[[s]] for s in samples], PAD, multiple=16)
    assert padded_batch.tokens.shape == (2, 48)
    _assert_same(_loss_and_grads((m, head), [padded_batch]), odd, tol=1e-6)

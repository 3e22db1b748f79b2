"""The global-order and evaluation batch samplers on every world / batch layout."""

import pytest

from gdt_tune.training.sampling import EvalBatchSampler, GlobalOrderBatchSampler


@pytest.mark.parametrize("world, batch", [(1, 4), (2, 2), (4, 1), (3, 2)])
def test_global_order_is_the_same_for_any_world_and_batch(world, batch):
    """Micro-batch m of all ranks together is the same stretch of one seeded order."""
    n = 50
    samplers = [GlobalOrderBatchSampler(n, batch, r, world, seed=5, shuffle=True) for r in range(world)]
    reference = GlobalOrderBatchSampler(n, 1, 0, 1, seed=5, shuffle=True)
    for epoch, start in ((0, 0), (1, 6)):
        for s in samplers + [reference]:
            s.set_epoch(epoch, start_sample=start)
        merged = [i for batches in zip(*(list(s) for s in samplers)) for b in batches for i in b]
        assert merged == [i for b in reference for i in b][: len(merged)]
        assert len(merged) == (n - start) // (batch * world) * batch * world
    reference.set_epoch(0)
    first = list(reference)
    reference.set_epoch(1)
    assert list(reference) != first and sorted(first) == sorted(list(reference)) == [[i] for i in range(n)]
    unshuffled = GlobalOrderBatchSampler(6, 2, 0, 1, seed=5, shuffle=False)
    assert list(unshuffled) == [[0, 1], [2, 3], [4, 5]]


@pytest.mark.parametrize("n, world, batch", [(10, 3, 2), (2, 4, 1), (7, 2, 4), (1, 8, 1)])
def test_eval_sampler_covers_every_sample_once(n, world, batch):
    samplers = [EvalBatchSampler(n, batch, r, world) for r in range(world)]
    seen = sorted(i for s in samplers for b in s for i in b)
    assert seen == list(range(n))
    assert all(len(s) <= s.num_batches_all_ranks for s in samplers)
    assert max(len(s) for s in samplers) == samplers[0].num_batches_all_ranks


def _lengths(n, seed=0):
    import numpy as np

    return np.random.default_rng(seed).integers(1000, 8001, size=n)


def test_balanced_order_is_a_seeded_permutation_of_groups_of_similar_length():
    from gdt_tune.training.sampling import balanced_order

    lengths = _lengths(1003)
    order = GlobalOrderBatchSampler(1003, 1, 0, 1, seed=5, shuffle=True).order()
    balanced = balanced_order(order, lengths, group=8, window=16, seed=1)
    assert sorted(balanced) == list(range(1003)) and balanced != order
    assert balanced == balanced_order(order, lengths, group=8, window=16, seed=1)
    assert balanced != balanced_order(order, lengths, group=8, window=16, seed=2)
    def mean_spread(o):  # longest - shortest in a group of 8, on average
        return sum(max(lengths[o[s:s + 8]]) - min(lengths[o[s:s + 8]]) for s in range(0, 1000, 8)) / 125

    # a window of 16 groups holds 128 samples over ~7000 tokens: a group spans ~7000 x 8 / 128 = 440
    assert mean_spread(balanced) < 600 and mean_spread(order) > 4000
    assert balanced[-3:] == sorted(balanced[-3:], key=lambda i: lengths[i])  # the partial group last


@pytest.mark.parametrize("world, batch, accum", [(1, 1, 8), (2, 2, 2), (4, 1, 2), (8, 1, 1)])
def test_balanced_steps_take_the_same_samples_for_any_world_batch_and_accumulation(world, batch, accum):
    """Global batch 8 = balance_group: step k holds the same 8 samples on every layout, from any
    resume position, and they are one group of similar length."""
    lengths = _lengths(203)
    reference = GlobalOrderBatchSampler(203, 8, 0, 1, seed=3, shuffle=True, lengths=lengths, group=8)
    for start in (0, 24):
        reference.set_epoch(2, start_sample=start)
        expected = [sorted(b) for b in reference]
        samplers = [GlobalOrderBatchSampler(203, batch, r, world, seed=3, shuffle=True, lengths=lengths, group=8)
                    for r in range(world)]
        for s in samplers:
            s.set_epoch(2, start_sample=start)
        per_rank = [list(s) for s in samplers]
        steps = [sorted(i for r in range(world) for b in per_rank[r][k * accum:(k + 1) * accum] for i in b)
                 for k in range(len(per_rank[0]) // accum)]
        assert steps == expected
        assert all(max(lengths[s]) - min(lengths[s]) < 1000 for s in steps)


def test_expected_rank_balance_of_lengths_spread_over_1k_to_8k_at_8_ranks():
    from gdt_tune.training.sampling import expected_rank_balance

    random_order, balanced = expected_rank_balance(_lengths(20000), world_size=8)
    assert random_order <= 0.70 and balanced >= 0.97

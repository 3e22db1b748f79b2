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

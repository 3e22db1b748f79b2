"""Event scoring in one forward per sample equals one forward per candidate (the reference), and
the branch mask lets each candidate see exactly its context."""

import pytest
import torch

from gdt_tune.clinical.event_scoring import Pack, event_candidates, pack_sample, pack_tensors, score_samples
from gdt_tune.data.layout import Layout
from gdt_tune.eval.evaluate import read_samples
from gdt_tune.eval.reference import score_sequences
from gdt_tune.training.loss_head import LossOnlyHead


@pytest.fixture(scope="module")
def demo_model(demo_dir):
    from recipe_utils import load_trained

    return load_trained(demo_dir / "model", None, torch.device("cpu"), torch.float32)


def _reference(model, tasks, pad_id):
    pairs = [(t["context"], c) for t in tasks for c in t["candidates"]]
    flat = score_sequences(model, pairs, pad_id, torch.device("cpu"), batch_size=3)
    return [flat[3 * i:3 * i + 3] for i in range(len(tasks))]


@pytest.mark.parametrize("limit", [None, 1])
def test_one_forward_per_sample_equals_one_forward_per_candidate(demo_dir, demo_model, limit):
    """Every event task of the demo test set, fp32: within 1e-5 of the reference, with every
    sample's tasks in one sequence (limit None), or split over several when the model's length
    limit is small (limit 1: one or two branches per sequence)."""
    model, tokenizer, prompt = demo_model
    layout = Layout.build(tokenizer, prompt)
    samples = [event_candidates(layout, r) for _, r in read_samples(demo_dir / "data" / "test", None)]
    assert sum(map(len, samples)) >= 20
    packs = []
    for tasks in samples:
        cap = model.max_seq_len if limit is None else max((len(t["context"]) + 12 for t in tasks), default=1)
        packs.append(pack_sample(tasks, cap))
    got = score_samples(LossOnlyHead(model, num_chunks=2), packs, tokenizer.pad_id, torch.device("cpu"), batch_size=3)
    worst, old_tokens, new_tokens = 0.0, 0, 0
    for tasks, sample_packs, scores in zip(samples, packs, got):
        assert len(scores) == len(tasks)
        assert len(sample_packs) == min(1, len(tasks)) if limit is None else len(sample_packs) >= 2 * len(tasks)
        for expected, actual in zip(_reference(model, tasks, tokenizer.pad_id), scores):
            worst = max(worst, *(abs(a - b) for a, b in zip(expected, actual)))
        old_tokens += sum(len(t["context"]) + len(c) for t in tasks for c in t["candidates"])
        new_tokens += sum(map(len, sample_packs))
    assert worst < 1e-5
    if limit is None:  # the contexts are run once per sample instead of 3 times per task
        assert new_tokens * 5 < old_tokens


def test_branch_mask_and_labels_by_hand():
    """Trunk [10, 11, 12]; a task whose context is [10, 11] with candidates [20, 21] and [22]:
    each branch repeats token 11 at position 1, sees trunk position 0 and itself, never the other
    branch, and predicts its candidate only."""
    tasks = [{"context": [10, 11], "candidates": [[20, 21], [22], [23]]},
             {"context": [10, 11, 12, 13], "candidates": [[30], [31], [32]]}]
    (pack,) = pack_sample(tasks, limit=100)
    assert pack.trunk == [10, 11, 12] and pack.branches[0] == (1, [11, 20, 21], 0)
    t = pack_tensors([pack, Pack([10])], pad_id=0)
    assert t["tokens"][0, :6].tolist() == [10, 11, 12, 11, 20, 21]
    assert t["input_pos"][0, :6].tolist() == [0, 1, 2, 1, 2, 3]
    assert t["labels"][0, :6].tolist() == [-100, -100, -100, 20, 21, -100]
    mask = t["mask"][0]
    assert mask[4, :6].tolist() == [True, False, False, True, True, False]  # trunk 0, its own branch
    assert not mask[6:9, 3:6].any()  # the next branch does not see this one
    assert mask[2, :3].all() and not mask[2, 3:].any()  # the trunk is causal and sees no branch
    assert t["mask"][1, 1].tolist()[1] and t["mask"][1, 1].sum() == 1  # a pad row sees only itself

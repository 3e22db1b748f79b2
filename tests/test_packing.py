"""``packing: true`` and ``share_prefixes: true`` end to end on the demo cohort, in process (a world of
one): the validation loss of packed and of shared-prefix rows equals the unpacked one when the weights
do not move, a shared-prefix run killed mid-epoch resumes to the uninterrupted run's losses and
weights, what such a step logs, and data-report's sharing ratio is what training logs. (That these
rows give the separate samples' loss and gradients: tests/test_batches.py.)"""

import pytest
import torch
from recipe_utils import final_weights, logged, train_in_process

import gdt_tune.training.step_metrics as step_metrics
from gdt_tune.training.sampling import GlobalOrderBatchSampler

pytestmark = pytest.mark.xdist_group("packing")  # one worker trains the uninterrupted run

QUIET = ("dataset_val=null", "run_val_every_n_steps=null", "val_metrics_samples=0")
#: rows of 4096 tokens: room for three of the demo's ~1.2k-token samples (none is longer than 2048)
LONG_ROWS = ("model.max_seq_len=4096", "dataset.max_seq_len=4096")
RUN = ("pack_window=64", "max_steps_per_epoch=5", "save_every_n_steps=2", *LONG_ROWS, *QUIET)
LAYOUTS = {"packed": ("packing=true",), "shared prefixes": ("packing=true", "share_prefixes=true")}


@pytest.fixture(scope="module")
def unpacked_validation(demo_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("plain")
    train_in_process(demo_dir, out, *STILL)
    return out


#: lr 1e-30 moves no fp32 weight (0 is refused): every run validates the same model
STILL = ("max_steps_per_epoch=2", "run_val_every_n_steps=null", "val_metrics_samples=0", "optimizer.lr=1e-30",
         *LONG_ROWS, "dataset_val.max_seq_len=4096")


@pytest.mark.xdist_group("packing_validation")  # the other group's worker trains the uninterrupted runs
@pytest.mark.parametrize("layout", [("packing=true",), ("packing=true", "share_prefixes=true")])
def test_packed_validation_loss_equals_unpacked_when_the_weights_do_not_move(demo_dir, tmp_path, layout,
                                                                            unpacked_validation):
    """The mean loss per label token, and per task type, of packed rows and of shared-prefix rows is the
    unpacked rows'."""
    train_in_process(demo_dir, tmp_path / "packed", *STILL, *layout)
    for key in ("val_loss", "val_loss_forecasting", "val_loss_events"):
        plain, packed = logged(unpacked_validation, key), logged(tmp_path / "packed", key)
        assert list(plain) == list(packed) == [2]
        assert packed[2] == pytest.approx(plain[2], abs=1e-5), key


@pytest.fixture(scope="module", params=list(LAYOUTS))
def uninterrupted(request, demo_dir, tmp_path_factory):
    """(layout, the uninterrupted run's folder)."""
    out = tmp_path_factory.mktemp(request.param.replace(" ", "_"))
    train_in_process(demo_dir, out, *RUN, *LAYOUTS[request.param])
    return request.param, out


def test_packed_steps_log_their_fill_and_hold_several_samples(uninterrupted):
    layout, uninterrupted = uninterrupted
    fill, per_row = logged(uninterrupted, "pack_fill"), logged(uninterrupted, "samples_per_row")
    assert sorted(fill) == list(range(1, 6))
    assert all(0.7 < f <= 1.0 for f in fill.values()) and all(s >= 2 for s in per_row.values())
    tokens, sharing = logged(uninterrupted, "tokens_seen"), logged(uninterrupted, "prefix_sharing")
    assert tokens[5] > 5 * 2 * 1000  # about 1.2k-token samples, two or more a step
    if layout == "shared prefixes":
        assert sorted(sharing) == list(range(1, 6)) and all(1.0 < s < 3.0 for s in sharing.values())
    else:
        assert sharing == {}  # every token trained once


def test_a_packed_run_killed_mid_epoch_resumes_to_the_uninterrupted_losses(demo_dir, tmp_path, monkeypatch,
                                                                         uninterrupted):
    layout, uninterrupted = uninterrupted
    out = tmp_path / "run"
    add = step_metrics.StepMetrics.add

    def killed_in_step_3(self, counts):
        if getattr(self, "_killed_after", 0) == 2:
            raise RuntimeError("killed")
        self._killed_after = getattr(self, "_killed_after", 0) + 1
        return add(self, counts)

    monkeypatch.setattr(step_metrics.StepMetrics, "add", killed_in_step_3)
    with pytest.raises(RuntimeError, match="killed"):
        train_in_process(demo_dir, out, *RUN, *LAYOUTS[layout])
    assert sorted(p.name for p in out.glob("step_*")) == ["step_2"]
    monkeypatch.undo()
    train_in_process(demo_dir, out, *RUN, *LAYOUTS[layout], "resume_from_checkpoint=true")
    assert logged(out) == logged(uninterrupted)
    ours, theirs = final_weights(out, 0), final_weights(uninterrupted, 0)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_packed_rows_are_the_same_on_any_world_size():
    """With the same global batch, each step takes the same rows on 1 rank as on 2 (a resume on
    another world size continues from the same row)."""
    lengths = torch.randint(100, 1000, (300,), generator=torch.Generator().manual_seed(1)).tolist()

    def rows_fn(order, seed):
        from gdt_tune.training.batches import RowPlan

        return RowPlan(packing=True, capacity=2048, window=64, lengths=lengths).rows(order, seed)

    def steps(world, batch, start):
        samplers = [GlobalOrderBatchSampler(300, batch, r, world, seed=3, shuffle=True, rows=rows_fn,
                                            samples_of=lambda row: len(row)) for r in range(world)]
        for s in samplers:
            s.set_epoch(0, start_sample=start)
        per_rank = [list(s) for s in samplers]
        return [sorted(r for rank in per_rank for r in rank[m]) for m in range(len(per_rank[0]))]

    one, two = steps(1, 2, 0), steps(2, 1, 0)
    assert one == two and len(one) > 30
    start = sum(len(r) for step in one[:7] for r in step)  # the samples of 7 steps: a row boundary
    assert steps(2, 1, start) == one[7:]
    with pytest.raises(ValueError, match="is not where a row starts"):
        steps(2, 1, start + 1)

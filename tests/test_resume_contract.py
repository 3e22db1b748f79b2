"""Resume anywhere, in pure logic: the sampler continues from a sample position on any world size
and batch layout, and the resume contract refuses or warns about each difference."""

import pytest

from gdt_tune.training.resume import REFUSED, WARNED, compare, data_changes
from gdt_tune.training.sampling import GlobalOrderBatchSampler


def _steps(n, batch, world, accum, start=0, steps=None, seed=7):
    """The samples of each optimizer step, all ranks together, from sample ``start``."""
    samplers = [GlobalOrderBatchSampler(n, batch, r, world, seed=seed, shuffle=True) for r in range(world)]
    for s in samplers:
        s.set_epoch(3, start_sample=start)
    micro = [list(s) for s in samplers]
    per_step = (n - start) // (batch * world * accum) if steps is None else steps
    return [sorted(i for m in range(k * accum, (k + 1) * accum) for r in range(world) for i in micro[r][m])
            for k in range(per_step)]


@pytest.mark.parametrize("before, after", [((1, 2, 1), (1, 1, 2)), ((1, 1, 2), (1, 2, 1)), ((2, 4, 1), (1, 4, 2)),
                                           ((1, 8, 2), (1, 16, 1))])
def test_same_global_batch_gives_the_same_steps(before, after):
    """(batch, world, accum) -> another with the same global batch (e.g. 2 ranks -> 1 rank with
    accumulation 2, 8 GPUs -> 16): after a resume at step 5 every step takes the samples of the
    uninterrupted run's step."""
    n = 1000
    full = _steps(n, *before)
    g = before[0] * before[1] * before[2]
    resumed = _steps(n, *after, start=5 * g)
    assert resumed == full[5:5 + len(resumed)] and len(resumed) == len(full) - 5


def test_another_global_batch_sees_every_sample_once():
    """2 ranks -> 1 rank with the same accumulation (the global batch halves): over the epoch the
    samples seen are those of the uninterrupted run, each exactly once."""
    n = 101
    full = [i for step in _steps(n, 1, 2, 1) for i in step]
    first = [i for step in _steps(n, 1, 2, 1, steps=13) for i in step]
    rest = [i for step in _steps(n, 1, 1, 1, start=26) for i in step]
    seen = first + rest
    assert len(seen) == len(set(seen)) == n  # 1-sample steps also take the sample the 2-rank run dropped
    assert set(full) <= set(seen) and len(full) == 100


def _run(**change):
    base = {"seed": 42, "shuffle": True, "dataset": "ab12", "samples": 500, "max_seq_len": 8000, "truncation": "gdt",
            "splits_per_patient_therapy": None, "world_size": 2, "gradient_accumulation_steps": 1, "batch_size": 1,
            "global_batch": 2, "lr": 1e-5, "save_every_n_steps": 100}
    return {**base, **change}


@pytest.mark.parametrize("key, new, message", [
    ("seed", 7, "resume: config key 'seed' was 42 when step_4 was written but is 7 now; set seed=42 to resume it"),
    ("shuffle", False, "config key 'shuffle' was True"),
    ("dataset", "ffff", "the training data (files, sizes, modification times) was 'ab12'"),
    ("samples", 499, "the number of training samples after selection was 500"),
    ("max_seq_len", 4000, "set dataset.max_seq_len=8000"),
    ("truncation", "drop", "set dataset.truncation=gdt"),
    ("splits_per_patient_therapy", 10, "set dataset.splits_per_patient_therapy=None"),
])
def test_refused_differences(key, new, message):
    assert key in REFUSED
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        compare(_run(), _run(**{key: new}), "step_4")


def test_allowed_differences_warn_and_name_both_values():
    assert compare(_run(), _run(), "step_4") == []
    warnings = compare(_run(), _run(world_size=1, gradient_accumulation_steps=2, lr=2e-5, save_every_n_steps=50), "s")
    assert warnings == ["resume: ranks 2 -> 1", "resume: gradient_accumulation_steps 1 -> 2",
                        "resume: optimizer.lr 1e-05 -> 2e-05", "resume: save_every_n_steps 100 -> 50"]
    halved = compare(_run(), _run(world_size=1, global_batch=1), "s")
    assert halved[-1].startswith("resume: global batch 2 -> 1 samples per step") and set(WARNED) >= {"world_size"}


@pytest.mark.parametrize("saved, fix", [("off", "set balanced_steps=false to resume it"),
                                        ("balance_group=8, balance_window=64",
                                         "set balanced_steps=true balance_group=8 balance_window=64 to resume it")])
def test_the_step_order_refusal_gives_a_fix_that_works_as_typed(saved, fix):
    now = "off" if saved != "off" else "balance_group=8, balance_window=64"
    with pytest.raises(ValueError) as e:
        compare(_run(balanced_order=saved), _run(balanced_order=now), "step_4")
    assert fix in str(e.value)


FILES = {"a.jsonl": {"bytes": 100, "samples": 4, "content": "aa"}, "b.jsonl": {"bytes": 50, "samples": 2, "content": "bb"},
         "c.jsonl": {"bytes": 70, "samples": 3, "content": "cc"}}


def test_changed_data_is_refused_naming_each_file_and_what_changed():
    now = {"a.jsonl": {"bytes": 100, "samples": 4, "content": "a2"},  # a same-size edit
           "b.jsonl": {"bytes": 60, "samples": 3, "content": "b2"},  # an append
           "d.jsonl": {"bytes": 10, "samples": 1, "content": "dd"}}  # c removed, d added
    assert data_changes(FILES, FILES) == []
    assert data_changes(FILES, now) == ["c.jsonl: removed", "d.jsonl: added",
                                        "a.jsonl: content changed (same size and samples)",
                                        "b.jsonl: size 50 -> 60 bytes, samples 2 -> 3"]
    with pytest.raises(ValueError) as e:
        compare(_run(data_files=FILES), _run(data_files=now, dataset="other"), "run/step_4")
    assert str(e.value) == (
        "resume: the training data changed since run/step_4 was written (c.jsonl: removed; d.jsonl: added; a.jsonl: "
        "content changed (same size and samples); b.jsonl: size 50 -> 60 bytes, samples 2 -> 3); restore the data "
        "it was trained on to resume it, or start a new run in a new output_dir")
    # the same content under other timestamps (a copy, a touch): the old stamp hash differs, the resume goes on
    assert compare(_run(data_files=FILES), _run(data_files=FILES, dataset="touched"), "s") == []

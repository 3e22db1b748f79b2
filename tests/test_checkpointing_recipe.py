"""Interim checkpoints through the recipe on 2 CPU processes: the files, exact resume (mid-epoch
and across an epoch boundary), incomplete checkpoints, other world sizes and global batches,
failed saves. (SIGTERM / Ctrl-C / SIGHUP: tests/test_launcher.py; SIGKILL: bench/fault_injection.py, run by CI's
bench/smoke.py.)"""

import logging
import shutil

import pytest
import torch
from recipe_utils import final_weights, logged, run_recipe, train_in_process

pytestmark = pytest.mark.xdist_group("shared_base_runs")  # one worker computes the shared runs

NO_VAL = ("dataset_val=null", "run_val_every_n_steps=null")
# 2 epochs of 3 steps: step 4 is in the second epoch, resuming from step 2 crosses the boundary.
TWO_EPOCHS = ("epochs=2", "max_steps_per_epoch=3", "save_every_n_steps=2", "keep_last_n_checkpoints=3", *NO_VAL)


def steps(out):
    return sorted(int(p.name.split("_")[1]) for p in out.glob("step_*"))


def assert_same_weights(a, b):
    wa, wb = final_weights(a, 1), final_weights(b, 1)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


@pytest.fixture(scope="session")  # once per worker: xdist may run other modules in between
def two_epochs(demo_dir, tmp_path_factory):
    """The uninterrupted run that the resume tests compare with."""
    base = tmp_path_factory.mktemp("two_epochs")
    run_recipe(demo_dir, base, *TWO_EPOCHS)
    return base


def test_resume_is_exact(demo_dir, tmp_path, two_epochs):
    """From step_4, inside the second epoch (from step_2, across the epoch boundary: the next test).
    Sync saves here; async saves resume exactly in tests/test_checkpoint_manager.py and in the
    fault-injection run (bench/fault_injection.py)."""
    base = two_epochs
    assert steps(base) == [2, 4, 6]  # keep_last_n_checkpoints=3 (every (interval, keep): test_checkpoint_manager.py)
    for s in steps(base):  # the files of 2 ranks
        names = {p.name for p in (base / f"step_{s}").iterdir()}
        assert {".metadata", "COMPLETE", "rank_0.pt", "rank_1.pt", "__0_0.distcp", "__1_0.distcp"} <= names
    assert (base / "epoch_1").is_dir()
    expected = logged(base)
    assert sorted(expected) == [1, 2, 3, 4, 5, 6]
    for start in (4,):
        out = tmp_path / f"from_{start}"
        out.mkdir()
        shutil.copytree(base / f"step_{start}", out / f"step_{start}")
        proc = run_recipe(demo_dir, out, *TWO_EPOCHS, "resume_from_checkpoint=true")
        assert f"resumed from {out / f'step_{start}'}" in proc.stdout
        resumed = logged(out)
        assert sorted(resumed) == list(range(start + 1, 7))
        assert all(resumed[s] == expected[s] for s in resumed), (resumed, expected)  # bit-identical
        assert_same_weights(base, out)


def test_incomplete_newest_is_skipped_and_the_previous_resumes_exactly(demo_dir, tmp_path, two_epochs):
    """step_4 unfinished: resumed from step_2, across the epoch boundary, bit-identical. (No usable
    checkpoint at all: the bad-input corpus, case resume-nothing-saved.)"""
    base = two_epochs
    out = tmp_path / "resumed"
    out.mkdir()
    for s in (2, 4):
        shutil.copytree(base / f"step_{s}", out / f"step_{s}")
    (out / "step_4" / "COMPLETE").unlink()  # as if killed before the marker
    proc = run_recipe(demo_dir, out, *TWO_EPOCHS, "resume_from_checkpoint=true")
    assert "skipping step_4 (no COMPLETE marker" in proc.stdout + proc.stderr
    assert f"resumed from {out / 'step_2'}" in proc.stdout
    assert logged(out) == {s: v for s, v in logged(base).items() if s > 2}
    assert_same_weights(base, out)


RESHARD = ("max_steps_per_epoch=6", "save_every_n_steps=3", "keep_last_n_checkpoints=2", *NO_VAL)


@pytest.fixture(scope="session")  # once per worker: xdist may run other modules in between
def reshard_base(demo_dir, tmp_path_factory):
    """2 ranks, no accumulation: the uninterrupted run of the world-size tests."""
    base = tmp_path_factory.mktemp("reshard_base")
    run_recipe(demo_dir, base, *RESHARD, "gradient_accumulation_steps=1", nproc=2)
    return base


BALANCED = ("balanced_steps=true", "balance_group=2")


# 2 ranks -> 1 in the random order, 1 rank -> 2 in the length-balanced one (its order and the
# resharding are those of the random order plus the grouping: one run covers both directions' paths)
@pytest.mark.parametrize("before, after, order", [((2, 1), (1, 2), ()), ((1, 2), (2, 1), BALANCED)])
def test_resume_on_another_world_size_with_the_same_global_batch(demo_dir, tmp_path, before, after, order,
                                                                 reshard_base, caplog):
    """(ranks, gradient_accumulation_steps) 2 x 1 -> 1 x 2 and back, and with length-balanced steps:
    the state is resharded and the resumed losses and final weights are those of the uninterrupted
    run. (One rank runs in this process.)"""
    base, out = tmp_path / "base", tmp_path / "resumed"
    if before == (2, 1):
        base = reshard_base
    else:
        train_in_process(demo_dir, base, *RESHARD, *order, f"gradient_accumulation_steps={before[1]}")
    out.mkdir()
    shutil.copytree(base / "step_3", out / "step_3")
    resume = (*RESHARD, *order, f"gradient_accumulation_steps={after[1]}", "resume_from_checkpoint=true")
    if after[0] == 1:
        with caplog.at_level(logging.INFO, logger="gdt_tune"):
            train_in_process(demo_dir, out, *resume)
        text = caplog.text
    else:
        proc = run_recipe(demo_dir, out, *resume, nproc=after[0])
        text = proc.stdout + proc.stderr
    assert f"(step 3, epoch 0, 6 samples of the epoch consumed, world size {before[0]} -> {after[0]}; state " \
           "resharded, RNG reseeded)" in text
    assert f"resume: ranks {before[0]} -> {after[0]}" in text and "global batch" not in text
    expected, resumed = logged(base), logged(out)
    assert sorted(resumed) == [4, 5, 6]
    for step in resumed:
        assert resumed[step] == pytest.approx(expected[step], rel=1e-5)
    wa, wb = final_weights(base, 0), final_weights(out, 0)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-6)
    balance = logged(out, "rank_balance")
    assert sorted(balance) == [4, 5, 6] and all(0 < b <= 1 for b in balance.values())
    if order and after[0] == 2:  # a step's 2 samples are one group of similar length: both ranks busy
        assert min(balance.values()) > 0.8


def test_resume_with_half_the_global_batch_sees_every_sample_of_the_epoch_once(demo_dir, tokenizer, tmp_path):
    """2 ranks -> 1 rank, same accumulation (the global batch halves), over a whole epoch: the
    resumed run takes every sample of the epoch exactly once (its token count is the dataset's),
    including the half global batch that the 2-rank run drops at the end."""
    from gdt_tune.datasets import cgdb_instruct_dataset
    from gdt_tune.training.sampling import GlobalOrderBatchSampler

    data = tmp_path / "train.jsonl"  # 60 samples: 7 steps of 8, and 4 left over
    data.write_text("".join((demo_dir / "data" / "train" / "part-00000.jsonl").read_text().splitlines(True)[:60]))
    whole = ("epochs=1", "max_steps_per_epoch=null", "batch_size=4", "save_every_n_steps=3", "keep_last_n_checkpoints=2",
             f"dataset.data_files={data}", *NO_VAL)
    base, out = tmp_path / "base", tmp_path / "resumed"
    run_recipe(demo_dir, base, *whole)
    out.mkdir()
    shutil.copytree(base / "step_3", out / "step_3")
    train_in_process(demo_dir, out, *whole, "resume_from_checkpoint=true")  # 1 rank
    ds = cgdb_instruct_dataset(tokenizer, data_files=data, max_seq_len=2048)
    lengths = [len(ds[i]["tokens"]) for i in range(len(ds))]
    n = len(lengths)
    assert n % 8 == 4  # 2 ranks x 4: the uninterrupted run drops the last 4 samples of the order
    dropped = GlobalOrderBatchSampler(n, 4, 0, 2, seed=42, shuffle=True).order()[-4:]
    seen_base, seen_resumed = logged(base, "tokens_seen"), logged(out, "tokens_seen")
    assert max(seen_base) == n // 8 and max(seen_resumed) == 3 + (n - 3 * 8) // 4
    assert seen_base[max(seen_base)] == sum(lengths) - sum(lengths[i] for i in dropped)
    assert seen_resumed[max(seen_resumed)] == sum(lengths)


def test_resume_with_another_global_batch_warns_and_refuses_a_changed_seed(demo_dir, tmp_path, reshard_base, caplog):
    base, out = reshard_base, tmp_path / "resumed"
    out.mkdir()
    shutil.copytree(base / "step_3", out / "step_3")
    with caplog.at_level(logging.WARNING, logger="gdt_tune"):
        train_in_process(demo_dir, out, *RESHARD, "resume_from_checkpoint=true")  # 1 rank
    assert "resume: global batch 2 -> 1 samples per step" in caplog.text
    assert sorted(logged(out)) == [4, 5, 6]
    (out / "step_6").rename(tmp_path / "step_6")  # from step_3 again, with another seed
    shutil.rmtree(out / "epoch_0")
    with pytest.raises(ValueError, match=r"^resume: config key 'seed' was 42 when .* set seed=42 to resume it"):
        train_in_process(demo_dir, out, *RESHARD, "resume_from_checkpoint=true", "seed=1")
    assert sorted(p.name for p in out.glob("step_*")) == ["step_3"]  # refused before anything was written


def test_failed_save_stops_with_the_directory_and_keeps_earlier_checkpoints(demo_dir, tmp_path):
    """Through the recipe, in process (one line at the exit: tests/test_launcher.py)."""
    from gdt_tune.training.checkpointing import SaveFailed

    (tmp_path / "step_2").write_text("not a directory")  # the save of step 2 cannot create its folder
    with pytest.raises(SaveFailed, match=f"^checkpoint: saving {tmp_path / 'step_2'} failed"):
        train_in_process(demo_dir, tmp_path, "max_steps_per_epoch=4", "save_every_n_steps=1", *NO_VAL)
    assert (tmp_path / "step_1" / "COMPLETE").is_file() and not (tmp_path / "epoch_0").exists()


COSINE = ("lr_scheduler._component_=torchtune.training.lr_schedulers.get_cosine_schedule_with_warmup",
          "lr_scheduler.num_warmup_steps=2", "max_steps_per_epoch=6", "save_every_n_steps=3", *NO_VAL)


def test_a_scheduled_run_resumes_exactly_and_a_stretched_schedule_is_refused(demo_dir, tmp_path, caplog):
    """Cosine with warmup, 1 rank in process: resumed from step_3, the learning rates, losses and
    final weights are the uninterrupted run's, bit for bit; a resume that would stretch the schedule
    (max_steps_per_epoch 6 -> 8) is refused; a changed optimizer.lr scales the scheduled rate."""
    base, out = tmp_path / "base", tmp_path / "resumed"
    train_in_process(demo_dir, base, *COSINE)
    out.mkdir()
    shutil.copytree(base / "step_3", out / "step_3")
    train_in_process(demo_dir, out, *COSINE, "resume_from_checkpoint=true")
    for name in ("lr", "loss"):
        expected, resumed = logged(base, name), logged(out, name)
        assert sorted(resumed) == [4, 5, 6] and all(resumed[s] == expected[s] for s in resumed), name
    assert logged(base, "lr")[3] != 3e-3  # step 4 runs at a scheduled rate, not the base rate
    wa, wb = final_weights(base, 0), final_weights(out, 0)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)

    again = tmp_path / "stretched"
    again.mkdir()
    shutil.copytree(base / "step_3", again / "step_3")
    longer = [a if not a.startswith("max_steps") else "max_steps_per_epoch=8" for a in COSINE]
    with pytest.raises(ValueError, match=r"^resume: the LR schedule .* was '.*6 steps' when .* but is '.*8 steps' "
                                         r"now; keep lr_scheduler, epochs, max_steps_per_epoch"):
        train_in_process(demo_dir, again, *longer, "resume_from_checkpoint=true")
    with caplog.at_level(logging.WARNING, logger="gdt_tune"):
        train_in_process(demo_dir, again, *COSINE, "resume_from_checkpoint=true", "optimizer.lr=0.0015")
    assert "resume: optimizer.lr 0.003 -> 0.0015" in caplog.text
    halved = logged(again, "lr")
    assert all(halved[s] == pytest.approx(logged(base, "lr")[s] / 2, rel=1e-9) for s in (4, 5, 6))

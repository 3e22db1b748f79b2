"""The checkpoint manager in process (a 1-rank gloo group): interval, keep-K, exact restore of
weights, optimizer, progress and RNG, sync and async; SIGTERM, Ctrl-C and SIGHUP; failed and timed-out
saves; another run's checkpoints. (2 ranks: tests/test_checkpoint_groups.py.)"""

import os
import signal

import pytest
import torch
import torch.distributed as dist
from recipe_utils import _free_port

import gdt_tune.training.checkpointing as ckpt_mod
from gdt_tune.training.checkpointing import CheckpointManager, Progress, read_run
from gdt_tune.training.resume import ResumePlan, find_resume
from gdt_tune.training.step_dirs import Marker, is_complete, read_marker
from gdt_tune.training.stop_signals import StopSignals


@pytest.fixture
def world_of_one(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _trainer(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    return model, torch.optim.AdamW(model.parameters(), lr=0.1)


def _step(model, optimizer, progress):
    model(torch.randn(2, 4)).pow(2).sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    progress.advance(tokens=10, samples=2)


def _manager(tmp_path, model, optimizer, progress, **kw):
    return CheckpointManager(tmp_path, model=model, optimizer=optimizer, lr_scheduler=None, progress=progress,
                             signals=StopSignals().listen(), rank=0, contract={"seed": progress.seed, "lr": 0.1}, **kw)


def _close(ckpt):
    ckpt.close()
    ckpt.signals.close()


@pytest.mark.parametrize("async_save", [False, True])
def test_saves_on_the_interval_keeps_k_and_restores_exactly(tmp_path, world_of_one, async_save):
    model, optimizer = _trainer()
    progress = Progress(seed=7, world_size=1)
    ckpt = _manager(tmp_path, model, optimizer, progress, save_every_n_steps=2, keep_last_n_checkpoints=2,
                    async_checkpointing=async_save)
    saved = {}
    for _ in range(6):
        _step(model, optimizer, progress)
        ckpt.save(progress.global_step)
        if progress.global_step == 4:
            saved = {k: v.clone() for k, v in model.state_dict().items()}
            rng_after_4 = torch.rand(3)  # consumes the RNG after the save
    _close(ckpt)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("step_")) == ["step_4", "step_6"]
    assert all(is_complete(tmp_path / s) for s in ("step_4", "step_6"))
    assert read_marker(tmp_path / "step_6") == Marker("", 6)
    # the run record: the contract and the whole Progress of the step
    assert read_run(tmp_path / "step_4") == (1, {"seed": 7, "lr": 0.1, "global_step": 4, "epoch": 0, "step_in_epoch": 4,
                                                 "tokens_seen": 40, "world_size": 1, "samples_in_epoch": 8,
                                                 "validation_pending": False, "sample_tokens_seen": 40})

    model2, optimizer2 = _trainer(seed=1)
    progress2 = Progress(seed=0, world_size=1)
    ckpt2 = _manager(tmp_path, model2, optimizer2, progress2)
    ckpt2.load(ResumePlan.find(tmp_path, str(tmp_path / "step_4"), rank=0))
    _close(ckpt2)
    assert all(torch.equal(saved[k], v) for k, v in model2.state_dict().items())
    assert (progress2.global_step, progress2.samples_in_epoch, progress2.tokens_seen, progress2.seed) == (4, 8, 40, 7)
    assert optimizer2.state_dict()["state"][0]["step"] == 4
    assert torch.equal(torch.rand(3), rng_after_4)  # the RNG state of the save is back


@pytest.mark.parametrize("signum, name", [(signal.SIGTERM, "SIGTERM"), (signal.SIGINT, "SIGINT"),
                                          (signal.SIGHUP, "SIGHUP")])
def test_sigterm_or_ctrl_c_saves_the_current_step_and_requests_a_stop(tmp_path, world_of_one, signum, name):
    model, optimizer = _trainer()
    progress = Progress(seed=0, world_size=1)
    ckpt = _manager(tmp_path, model, optimizer, progress, save_every_n_steps=100, run_id="run-a")
    _step(model, optimizer, progress)
    assert not ckpt.save(1) and not ckpt.signals.requested
    os.kill(os.getpid(), signum)  # no KeyboardInterrupt: the handler only notes it
    _step(model, optimizer, progress)
    assert ckpt.save(2) and ckpt.signals.requested and ckpt.signals.name == name
    _close(ckpt)
    assert find_resume(tmp_path, True, rank=0, run_id="run-a") == tmp_path / "step_2"
    assert read_marker(tmp_path / "step_2") == Marker("run-a", 2)
    assert signal.getsignal(signum) is not ckpt.signals._on_signal  # handlers restored


def test_any_save_failure_is_one_line_and_keeps_earlier_checkpoints(tmp_path, world_of_one, monkeypatch):
    """torch's CheckpointException (a BaseException, with every rank's traceback) becomes the one
    documented line."""
    from torch.distributed.checkpoint import CheckpointException

    import gdt_tune.training.checkpointing as ckpt_mod

    model, optimizer = _trainer()
    progress = Progress(seed=0, world_size=1)
    ckpt = _manager(tmp_path, model, optimizer, progress, save_every_n_steps=1)
    _step(model, optimizer, progress)
    ckpt.save(1)

    def disk_full(*args, **kwargs):
        cause = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0\nframe #0 ...")
        raise CheckpointException("CheckpointException ranks:{0: ...}", {0: (cause, None)})

    monkeypatch.setattr(ckpt_mod.dcp, "save", disk_full)
    _step(model, optimizer, progress)
    with pytest.raises(ckpt_mod.SaveFailed) as e:
        ckpt.save(2)
    _close(ckpt)
    assert str(e.value) == (f"checkpoint: saving {tmp_path / 'step_2'} failed (RuntimeError: [enforce fail at "
                            "inline_container.cc:672] . unexpected pos 64 vs 0); earlier checkpoints are intact; "
                            "free disk space or fix permissions, then resume")
    assert find_resume(tmp_path, True, rank=0) == tmp_path / "step_1"


def test_a_timed_out_save_collective_is_one_line_naming_it(tmp_path, world_of_one, monkeypatch):
    import gdt_tune.training.checkpointing as ckpt_mod

    model, optimizer = _trainer()
    progress = Progress(seed=0, world_size=1)
    ckpt = _manager(tmp_path, model, optimizer, progress, save_every_n_steps=1)

    def peer_hung(*args, **kwargs):  # what gloo raises in DCP's gather when a rank never joins
        raise dist.DistBackendError("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 600000ms for "
                                    "recv operation to complete\nException raised from ...")

    monkeypatch.setattr(ckpt_mod.dcp, "save", peer_hung)
    _step(model, optimizer, progress)
    with pytest.raises(ckpt_mod.SaveFailed) as e:
        ckpt.save(1)
    _close(ckpt)
    assert str(e.value) == (
        f"checkpoint: saving {tmp_path / 'step_1'} timed out in a DCP collective on the checkpoint save group "
        "(DistBackendError: [gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 600000ms for recv operation "
        "to complete); another rank stopped or hung: read its log, then resume (raise checkpoint_timeout_minutes "
        "for a slow file system)")


def test_another_runs_complete_step_is_neither_resumed_nor_deleted(tmp_path, world_of_one):
    """Run B reaches step 2, where run A's complete step_2 lies: refused at start and at the save,
    and A's folder is left as it was."""
    model, optimizer = _trainer()
    progress = Progress(seed=0, world_size=1)
    theirs = _manager(tmp_path, model, optimizer, progress, save_every_n_steps=2, run_id="run-a")
    _step(model, optimizer, progress)
    _step(model, optimizer, progress)
    assert theirs.save(2)
    _close(theirs)
    before = {p.name: p.read_bytes() for p in (tmp_path / "step_2").iterdir()}
    ours = _manager(tmp_path, model, optimizer, Progress(seed=0, world_size=1), save_every_n_steps=2, run_id="run-b")
    with pytest.raises(ValueError, match=r"^output_dir: .*step_2 is a complete checkpoint of another run \(run-a\) "
                                         r"and this run would save its step there; move it out of"):
        ours.refuse_foreign_steps(1, 4)
    ours.refuse_foreign_steps(3, 4)  # a run that starts after step 2 never writes there
    with pytest.raises(ckpt_mod.SaveFailed, match=r"^checkpoint: .*step_2 is a complete checkpoint of another run"):
        ours.save(2)
    _close(ours)
    assert {p.name: p.read_bytes() for p in (tmp_path / "step_2").iterdir()} == before
    assert find_resume(tmp_path, True, rank=0, run_id="run-a") == tmp_path / "step_2"


def test_progress_counts_and_round_trips():
    p = Progress(seed=3, world_size=2)
    for _ in range(3):
        p.advance(tokens=100.7, samples=4)
    assert (p.global_step, p.step_in_epoch, p.samples_in_epoch, p.tokens_seen) == (3, 3, 12, 300)
    p.next_epoch()
    assert (p.epoch, p.step_in_epoch, p.samples_in_epoch, p.global_step) == (1, 0, 0, 3)
    q = Progress(seed=0, world_size=1)
    q.load_state_dict(p.state_dict())
    assert q.state_dict() == p.state_dict()

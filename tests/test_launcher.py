"""What a user sees from `gdt-tune train`: one error line and the log path instead of torchrun's
traceback; Ctrl-C and SIGTERM save the current step and end cleanly; ranks do not outlive a
killed launcher."""

import os
import signal
import subprocess
import sys
import time

import pytest
from recipe_utils import REPO, TINY, logged

from gdt_tune.cli.launcher import StderrFilter

TORCHRUN_FAILURE = """\
E1126 03:14:35.1 1 torch/distributed/elastic/multiprocessing/api.py:874] failed (exitcode: 1) local_rank: 0
Traceback (most recent call last):
  File "/venv/bin/torchrun", line 8, in <module>
    sys.exit(main())
  File "/venv/lib/python3.11/site-packages/torch/distributed/run.py", line 892, in main
    run(args)
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
gdt_tune.recipes.full_finetune_fsdp_ckpt FAILED
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  exitcode  : 1 (pid: 1)
============================================================
"""
RANK_CRASH = """\
Traceback (most recent call last):
  File "/x/gdt_tune/recipes/full_finetune_fsdp_ckpt.py", line 10, in train
    1 / 0
ZeroDivisionError: division by zero
"""


def test_filter_hides_torchrun_but_not_a_rank_crash():
    f = StderrFilter()
    shown = [out for line in ("loading\n", "error: data.jsonl:3: invalid JSON\n",
                              "error: data.jsonl:3: invalid JSON\n", *RANK_CRASH.splitlines(True),
                              *TORCHRUN_FAILURE.splitlines(True)) for out in f.feed(line)] + f.flush()
    assert shown == ["loading\n", *RANK_CRASH.splitlines(True)]
    assert f.errors == ["error: data.jsonl:3: invalid JSON"]  # collected once, printed once at the end


def _train(out, demo_dir, *overrides, nproc=1):
    """`gdt-tune train` of the tiny config; one rank unless asked (what these tests watch is the
    launcher, torchrun and a rank; two ranks agreeing on a signal: tests/test_signals.py,
    tests/test_checkpoint_manager.py)."""
    cmd = [sys.executable, "-m", "gdt_tune.cli.main", "train", "--nproc_per_node", str(nproc), "--config", TINY,
           f"demo_dir={demo_dir}", f"output_dir={out}", "dataset_val=null", "~lr_scheduler", "run_val_every_n_steps=null", *overrides]
    env = dict(os.environ, TIKTOKEN_CACHE_DIR="", GDT_TUNE_LOG_DIR=str(out.parent / "launcher-logs"),
               PYTHONUNBUFFERED="1")
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _wait_for_steps(out, proc, n=3, timeout=120):
    deadline = time.time() + timeout
    while len(logged(out)) < n:
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-3000:]
        time.sleep(0.05)


def test_data_error_is_one_line_with_the_log_path(demo_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "answer": \n')
    proc = _train(tmp_path / "out", demo_dir, f"dataset.data_files={bad}")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: {bad}:1: invalid JSON (Expecting value at column 1)"], err[-3000:]
    assert "Traceback" not in err and "ChildFailedError" not in err
    log = err.splitlines()[-1].removeprefix("full log: ")
    assert "ChildFailedError" in open(log).read()  # torchrun's report is kept in the log


def test_ctrl_c_saves_the_current_step_and_ends_cleanly(demo_dir, tmp_path):
    """The terminal signals the whole foreground group: the launcher, torchrun and the ranks. (SIGTERM
    and SIGHUP through the launcher: the next test; the ranks' save on each signal: tests/test_signals.py
    and test_kill_9_of_gdt_tune_saves_the_current_step_like_sigterm below.)"""
    out = tmp_path / "out"
    proc = _train(out, demo_dir, "max_steps_per_epoch=400", "save_every_n_steps=null")
    _wait_for_steps(out, proc)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "stopped by Ctrl-C after saving the current step" in err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err and "death signal" not in err
    saved = [p.name for p in out.glob("step_*")]
    assert len(saved) == 1 and (out / saved[0] / "COMPLETE").is_file()
    assert int(saved[0].split("_")[1]) == max(logged(out)) >= 3


# What the launcher runs in place of torchrun: it saves on any stop signal, as the ranks do.
FAKE_TORCHRUN = """
import signal, sys, time
def stop(signum, frame):
    print(f"checkpoint: {signal.Signals(signum).name} received; saved step 3, exiting", flush=True)
    sys.exit(130 if signum == signal.SIGINT else 0)
for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
    signal.signal(s, stop)
print("ready", flush=True)
time.sleep(60)
"""
LAUNCHER = """
import os, sys
from gdt_tune.cli.launcher import run_training
sys.exit(run_training([sys.executable, "-c", sys.argv[1]], dict(os.environ), *sys.argv[2:]))
"""


# ... and one that has nothing to save yet (indexing): SIGTERM's default action ends it
FAKE_TORCHRUN_STARTING = 'import time\nprint("ready", flush=True)\ntime.sleep(60)\n'
# ... and one whose ranks finish the final save while torchrun itself exits 1 on the SIGTERM
FAKE_TORCHRUN_FINAL_SAVE = """
import signal, sys, time
print("INFO gdt_tune: final checkpoint: /runs/x/epoch_0 (serves with the training prompt)", flush=True)
signal.signal(signal.SIGTERM, lambda *a: sys.exit(1))
print("ready", flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("how, code, said, fake, command", [
    ("sigterm", 0, "stopped by SIGTERM after saving the current step; resume with", FAKE_TORCHRUN, "train"),
    ("sighup", 0, "stopped by SIGHUP after saving the current step", FAKE_TORCHRUN, "train"),
    ("ctrl-c", 130, "stopped by Ctrl-C after saving the current step", FAKE_TORCHRUN, "train"),
    ("sigterm", 143, "stopped by SIGTERM before training started; nothing was saved", FAKE_TORCHRUN_STARTING, "train"),
    ("sigterm", 0, "stopped by SIGTERM after the final checkpoint was written (/runs/x/epoch_0); the run has finished",
     FAKE_TORCHRUN_FINAL_SAVE, "train"),
    # evaluate has nothing to save: its own words, and the shell's exit code of the signal
    ("sigterm", 143, "stopped by SIGTERM; evaluate stopped, and no file it writes is left half-written",
     FAKE_TORCHRUN_STARTING, "evaluate"),
    ("ctrl-c", 130, "stopped by Ctrl-C; evaluate stopped, and no file it writes is left half-written",
     FAKE_TORCHRUN_STARTING, "evaluate")])
def test_the_launcher_forwards_a_signal_and_reports_the_save(tmp_path, how, code, said, fake, command):
    env = dict(os.environ, GDT_TUNE_LOG_DIR=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-c", LAUNCHER, fake, command], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    while proc.stdout.readline() != "ready\n":
        assert proc.poll() is None, proc.stderr.read()
    if how == "sigterm":
        os.kill(proc.pid, signal.SIGTERM)  # Slurm may signal the launcher only: it forwards it
    else:  # the terminal signals the whole foreground group (a closed terminal: SIGHUP)
        os.killpg(proc.pid, signal.SIGINT if how == "ctrl-c" else signal.SIGHUP)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code and said in err and "error:" not in err and "Traceback" not in err, err
    assert len([line for line in err.splitlines() if line.strip()]) == 1, err


LATE_SIGTERM = """
import os, signal, sys, time
from gdt_tune.cli.launcher import run_training
rc = run_training([sys.executable, "-c", "print('done', flush=True)"], dict(os.environ))
os.kill(os.getpid(), signal.SIGTERM)  # Slurm's second SIGTERM while gdt-tune writes its last lines
time.sleep(0.5)
sys.exit(rc)
"""


def test_a_late_signal_after_the_job_ended_keeps_its_exit_code(tmp_path):
    done = subprocess.run([sys.executable, "-c", LATE_SIGTERM], cwd=REPO, capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, GDT_TUNE_LOG_DIR=str(tmp_path)))
    assert done.returncode == 0 and "done" in done.stdout, done.stderr


def _kill_and_wait_for_children(out, proc, children: int, timeout: float = 90) -> None:
    """After 3 steps, kill -9 ``proc``; its ``children`` must then save one step_N and exit."""
    _wait_for_steps(out, proc)
    pids = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(pids) == children
    proc.kill()
    proc.wait()
    deadline = time.time() + timeout
    while any(os.path.exists(f"/proc/{pid}") and "Z" not in open(f"/proc/{pid}/stat").read().split()[2]
              for pid in pids):
        assert time.time() < deadline, f"{pids} still running after their launcher died"
        time.sleep(0.2)
    saved = list(out.glob("step_*"))
    assert len(saved) == 1 and (saved[0] / "COMPLETE").is_file()
    assert int(saved[0].name.split("_")[1]) == max(logged(out)) >= 3


WATCHED = """
import os, signal, sys, time
from gdt_tune.runtime.coordination import watch_launcher
signal.signal(signal.SIGTERM, lambda *a: (open(sys.argv[1], "w").write("SIGTERM"), os._exit(0)))
watch_launcher(poll_seconds=0.05)
open(sys.argv[1] + ".ready", "w").close()
time.sleep(60)
"""
PARENT = """
import os, subprocess, sys, time
subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]])  # the 'rank'
while not os.path.exists(sys.argv[2] + ".ready"):  # it watches this process: now this 'torchrun' dies
    time.sleep(0.05)
os._exit(9)
"""


def test_a_rank_whose_torchrun_dies_stops_like_on_sigterm(tmp_path):
    """kill -9 of torchrun (or of `tune run`, which is torchrun in its own process): the rank sees its
    parent gone and sends itself SIGTERM, which saves the current step and stops (the save:
    test_kill_9_of_gdt_tune_saves_the_current_step_like_sigterm, the same path through the
    launcher's pid)."""
    said = tmp_path / "said"
    env = dict(os.environ, TORCHELASTIC_RUN_ID="test")
    subprocess.run([sys.executable, "-c", PARENT, WATCHED, str(said)], env=env, cwd=REPO, timeout=60)
    deadline = time.time() + 60
    while not said.exists():
        assert time.time() < deadline, "the rank did not notice that its parent died"
        time.sleep(0.05)
    assert said.read_text() == "SIGTERM"


def test_kill_9_of_gdt_tune_saves_the_current_step_like_sigterm(demo_dir, tmp_path):
    """torchrun writes into the log files, not into a pipe to the launcher: its ranks never hit a
    broken pipe, see the launcher gone (GDT_LAUNCHER_PID), save and exit."""
    out = tmp_path / "out"
    proc = _train(out, demo_dir, "max_steps_per_epoch=400", "save_every_n_steps=null")
    _kill_and_wait_for_children(out, proc, children=1)  # torchrun, which waits for its ranks
    log = next((tmp_path / "launcher-logs").glob("train-*.log"))
    said = log.read_text() + log.with_suffix(".out").read_text()
    assert "BrokenPipeError" not in said and "is gone; stopping" in said and "SIGTERM received; saved step" in said


def test_progress_bars_pass_through_as_they_update():
    """tqdm redraws with \\r and no newline: those updates are shown at once, not held back."""
    from gdt_tune.cli.launcher import segments

    read, write = os.pipe()
    pieces = segments(read)
    os.write(write, b"step 1\rstep 2\rstep 3")
    assert next(pieces) == ("step 1\rstep 2\r", False)  # before any newline arrives
    os.write(write, b"\nerror: x\ntail")
    os.close(write)
    assert list(pieces) == [("step 3\n", True), ("error: x\n", True), ("tail", True)]
    f = StderrFilter()
    assert f.feed_partial("50%|#####\\r") == ["50%|#####\\r"]


RANK_1_KILLED = """
import os, signal, time
if os.environ["RANK"] == "1":
    os.kill(os.getpid(), signal.SIGKILL)  # what the out-of-memory killer does
time.sleep(60)
"""


def test_a_rank_killed_by_a_signal_is_named_with_the_signal(tmp_path, capsys, monkeypatch):
    """A rank dies of SIGKILL (no error line of its own): the launcher names the rank and the
    signal from torchrun's Root Cause, not only an exit code; for evaluate it says evaluate."""
    from gdt_tune.cli.launcher import run_training

    monkeypatch.setenv("GDT_TUNE_LOG_DIR", str(tmp_path))
    script = tmp_path / "ranks.py"
    script.write_text(RANK_1_KILLED)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--monitor_interval", "0.1",
                str(script)]
    assert run_training(torchrun, dict(os.environ), command="evaluate") == 1
    err = capsys.readouterr().err
    assert err.splitlines()[-2] == ("error: evaluate failed: rank 1 was killed by SIGKILL (often the out-of-memory "
                                    "killer: check the node's memory in dmesg or the scheduler's job report); the "
                                    "other ranks were stopped")
    f = StderrFilter()
    f.failed_rank, f.failed_exit = 0, 1
    assert f.failure(1, "train") == "error: training failed: rank 0 exited with code 1 (its traceback is in the full log)"


FAKE_INDEXING = """
import os, signal, sys, time
def stop(signum, frame):  # torchrun's warning lands on the bar's line; then the ranks' one line
    os.write(2, b"indexing samples:  50%|#####     | 5/10 [00:01<00:01, 5.0it/s]"
                b"W1203 12:00:00.000000 1 torch/distributed/elastic/agent/server/api.py:1] Received 2 death signal, "
                b"shutting down workers\\n"
                b"indexing samples:  60%|######    |\\rerror: interrupted (Ctrl-C) before training started; nothing "
                b"was saved\\n")
    sys.exit(130)
signal.signal(signal.SIGINT, stop)
os.write(2, b"indexing samples:  40%|####      |\\r")
print("ready", flush=True)
time.sleep(60)
"""


def test_ctrl_c_while_indexing_shows_the_ranks_line_on_a_line_of_its_own(tmp_path):
    env = dict(os.environ, GDT_TUNE_LOG_DIR=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-c", LAUNCHER, FAKE_INDEXING], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    while proc.stdout.readline() != "ready\n":
        assert proc.poll() is None, proc.stderr.read()
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "death signal" not in err, err
    lines = err.split("\n")
    assert lines[-3] == "error: interrupted (Ctrl-C) before training started; nothing was saved", err
    assert lines[-2].startswith("full log: ") and lines[-1] == "", err

"""A rank that stops answering mid-run (SIGSTOP, as a frozen process or node) ends the job within
``collective_timeout_minutes`` with one line naming it, and nothing is left running. Two CPU ranks
under torchrun."""

import os
import signal
import subprocess
import time

from recipe_utils import REPO, launch_cmd, logged

TIMEOUT_S = 15  # collective_timeout_minutes=0.25


def _descendants(root: int) -> dict[int, bytes]:
    """{pid: environment} of the live processes below ``root`` (torchrun starts each rank in a session
    of its own: by parent, not by session)."""
    parents, states = {}, {}
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[pid], states[pid] = int(fields[1]), fields[0]
    below, todo = set(), [root]
    while todo:
        parent = todo.pop()
        for pid, ppid in parents.items():
            if ppid == parent and pid not in below:
                below.add(pid)
                todo.append(pid)
    out = {}
    for pid in below:
        try:
            if states[pid] != "Z":
                out[pid] = open(f"/proc/{pid}/environ", "rb").read()
        except OSError:
            continue
    return out


def _rank_pid(launcher_pid: int, rank: int) -> int | None:
    return next((pid for pid, env in _descendants(launcher_pid).items()
                 if f"\0RANK={rank}\0".encode() in b"\0" + env), None)


def test_a_frozen_rank_ends_the_job_within_the_timeout_naming_it(demo_dir, tmp_path):
    out = tmp_path / "run"
    cmd = launch_cmd(demo_dir, out, "collective_timeout_minutes=0.25", "dataset_val=null", "run_val_every_n_steps=null",
                     "val_metrics_samples=0", "save_every_n_steps=null", "max_steps_per_epoch=200")
    proc = subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ, TIKTOKEN_CACHE_DIR=""), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 120
        while max(logged(out), default=0) < 2:
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-3000:]
            time.sleep(0.1)
        rank1 = _rank_pid(proc.pid, 1)
        ranks = set(_descendants(proc.pid))  # torchrun's workers (and anything they started)
        assert rank1 is not None and rank1 in ranks and len(ranks) >= 2
        os.kill(rank1, signal.SIGSTOP)
        stopped = time.time()
        _, stderr = proc.communicate(timeout=TIMEOUT_S + 60)
        ended = time.time() - stopped
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0 and ended < TIMEOUT_S + 30, (ended, stderr[-3000:])
    errors = sorted({line for line in stderr.splitlines() if line.startswith("error: ")})
    assert len(errors) == 1, stderr[-3000:]
    assert errors[0].startswith(f"error: training: rank 1 (pid {rank1} on ") and "stopped answering" in errors[0]
    assert "collective_timeout_minutes=0.25" in errors[0] and "resume_from_checkpoint=true" in errors[0]
    time.sleep(1)
    alive = [pid for pid in ranks if os.path.exists(f"/proc/{pid}")
             and open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"]
    assert alive == []  # no rank outlives the job

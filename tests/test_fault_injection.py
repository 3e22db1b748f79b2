"""The short fault-injection run: one SIGKILL of each kind that writes (during a sync save, an async
save, pruning), each resumed to final weights identical to an uninterrupted run. Kills during an
optimizer step: the 20-point run (bench/fault_injection.py, bench/results/fault_injection.md)."""

import subprocess
import sys

from recipe_utils import REPO


def test_three_kills_resume_to_identical_weights(tmp_path):
    proc = subprocess.run([sys.executable, "bench/fault_injection.py", "--points", "3", "--work", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "3/3 identical to the uninterrupted run; 3 kills landed; " in proc.stdout
    for kind in ("| sync save step_", "| async save step_", "| prune step_"):
        assert kind in proc.stdout

"""The short fault-injection run: one SIGKILL of each kind (during an optimizer step, a sync save,
an async save, pruning), each resumed to final weights identical to an uninterrupted run."""

import subprocess
import sys

from recipe_utils import REPO


def test_four_kills_resume_to_identical_weights(tmp_path):
    proc = subprocess.run([sys.executable, "bench/fault_injection.py", "--points", "4", "--work", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "4/4 identical to the uninterrupted run; 4 kills landed; " in proc.stdout
    for kind in ("| step ", "| sync save step_", "| async save step_", "| prune step_"):
        assert kind in proc.stdout

"""The benchmark scripts run end to end in their smallest settings and print their tables (no
timing is asserted: numbers live in docs/performance.md)."""

import subprocess
import sys

import pytest
from recipe_utils import REPO

SCRIPTS = {
    "data_pipeline.py": (["--sizes", "300", "--items", "4"], ["ours / stock:", "| 300 |", "samples/s"]),
    "recipe_step.py": (["--steps", "14", "--repeat", "1"], ["ours / stock time per step:"]),
    "checkpoint.py": (["--tiny", "--steps", "4"], ["async blocked / sync blocked:", "resumed / fresh:",
                                                   "interim checkpoint step_4"]),
    # on CPU: the tiny run with async saves, the step-by-step resume comparison and one throughput
    # variant through gpu_throughput.run_variants (stock: recipe_step.py; evaluate in bf16 and fp32 on
    # CPU: tests/test_evaluate.py)
    "gpu_check.py": (["--tiny-steps", "6", "--skip", "evaluate", "--steps", "4", "--variants", "ours:op"],
                     ["| resume from step_3 | pass |", "| ours:op |", " passed, 0 failed"]),
    "index_stamp.py": (["--mib", "8"], ["full hash / stamp:", "| stat stamp (the cache's check) |"]),
    "prune.py": (["--gib", "0.01", "--repeat", "1"], ["| inline |", "| background |"]),
}


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_benchmark_runs(script, tmp_path):
    args, expected = SCRIPTS[script]
    proc = subprocess.run([sys.executable, f"bench/{script}", "--work", str(tmp_path), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "| failed |" not in proc.stdout and "| FAIL |" not in proc.stdout
    for part in expected:
        assert part in proc.stdout, proc.stdout[-2000:]

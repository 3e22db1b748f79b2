"""CI's benchmark stage: every benchmark script end to end in its smallest settings (their tables
printed, no timing asserted: numbers live in docs/performance.md), the way the docs run them: with
at least two repeats where a script has ``--repeat``, and invoked twice on the same ``--work``
folder (a user rerunning the documented command reuses the default one); and the 3-point fault-injection
run (a SIGKILL during a sync save, an async save and pruning, each resumed to final weights
identical to an uninterrupted run). ``.ci/run`` runs it after ``pytest -q``: these launch many
2-rank trainings, which the unit and integration suite (README, about 5 minutes on 2 cores) keeps
to the few that must.

    python bench/smoke.py                   # all, two at a time, about 7 minutes on 2 cores
    python bench/smoke.py checkpoint.py     # one
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: script -> (its smallest arguments, substrings its output must hold)
SCRIPTS = {
    "data_pipeline.py": (["--sizes", "300", "--items", "4"], ["ours / stock:", "| 300 |", "samples/s"]),
    "recipe_step.py": (["--steps", "14", "--repeat", "2"], ["ours / stock time per step:"]),
    "checkpoint.py": (["--tiny", "--steps", "4"], ["async blocked / sync blocked:", "resumed / fresh:",
                                                   "interim checkpoint step_4", "bytes read from the checkpoint per node"]),
    # on CPU: the tiny run with async saves, the step-by-step resume comparison and one throughput
    # variant through gpu_throughput.run_variants (stock: recipe_step.py; evaluate in bf16 and fp32 on
    # CPU: tests/test_evaluate.py)
    "gpu_check.py": (["--tiny-steps", "6", "--skip", "evaluate", "--steps", "4", "--variants", "ours:op"],  # + spread
                     ["| resume from step_3 | pass |", "| ours:op |", "| spread ours:pack | pass |",
                      "| tree ours:tree | pass |", "| eval engine | pass |", " passed, 0 failed"]),
    "row_layouts.py": (["--max-steps", "2"], ["| one sample a row | 2 |", "| packed | 2 |", "| shared prefixes | 2 |"]),
    "index_stamp.py": (["--mib", "8"], ["full hash / stamp:", "| stat stamp (the cache's check) |"]),
    "loss_head.py": (["--vocab", "8192", "--tokens", "512", "--repeat", "2"], ["loss-only / stock time:"]),
    "balanced_steps.py": (["--steps", "10", "--repeat", "2"], ["balanced / random time per step:", "| balanced |"]),
    "eval_speed.py": (["--budget", "1500", "--samples", "2", "--draws", "2", "--max-new", "4", "--dim", "64",
                       "--layers", "1"], ["event scoring new / old: tokens", "forecasting new / old: tokens",
                                          "| one prefill per prompt (new) |"]),
    "prune.py": (["--gib", "0.01", "--repeat", "2"], ["| inline |", "| background |"]),
    "fault_injection.py": (["--points", "3"], ["3/3 identical to the uninterrupted run; 3 kills landed; ",
                                               "| sync save step_", "| async save step_", "| prune step_"]),
}


#: run once only: it clears its own runs at start, and its 3 kills take the longest
ONCE = {"fault_injection.py"}


def check(script: str, work: Path) -> str | None:
    """None when ``script`` ran and printed what it must, twice on the same ``work`` (once for
    ``ONCE``); else why not."""
    args, expected = SCRIPTS[script]
    for invocation in (1,) if script in ONCE else (1, 2):
        proc = subprocess.run([sys.executable, f"bench/{script}", "--work", str(work), *args], cwd=REPO,
                              capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            return f"invocation {invocation}: exit code {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        missing = [part for part in expected if part not in proc.stdout]
        if missing or "| failed |" in proc.stdout or "| FAIL |" in proc.stdout:
            return f"invocation {invocation}: output lacks {missing} or reports a failure:\n{proc.stdout[-2000:]}"
    return None


def main(argv: list[str]) -> int:
    names = argv or sorted(SCRIPTS)
    unknown = [n for n in names if n not in SCRIPTS]
    if unknown:
        print(f"error: unknown benchmark {unknown[0]}; known: {', '.join(sorted(SCRIPTS))}", file=sys.stderr)
        return 2
    def run(name: str) -> str | None:
        started = time.time()
        with tempfile.TemporaryDirectory(prefix=f"smoke-{Path(name).stem}-") as work:
            problem = check(name, Path(work))
        print(f"{'PASS' if problem is None else 'FAIL'} bench/{name} ({time.time() - started:.0f} s)"
              + (f"\n{problem}" if problem else ""), flush=True)
        return problem

    # two at a time (the machine's 2 cores); the longest first
    names.sort(key=lambda n: n != "fault_injection.py")
    with ThreadPoolExecutor(2) as pool:
        failed = sum(problem is not None for problem in pool.map(run, names))
    print(f"bench smoke: {len(names) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

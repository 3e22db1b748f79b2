"""Every case of the bad-input corpus (tests/bad_inputs.py) stops the recipe with exit code 1 and
one line ``error: ...`` naming the file:line or config key, no traceback, and leaves the
checkpoints in the output folder as they were. The cases run two at a time, once per session."""

import os
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest
from bad_inputs import CASES
from recipe_utils import RECIPE, REPO, TINY, TUNE


def _snapshot(folder):
    """The checkpoints in ``folder`` (logs may be opened before the error)."""
    return sorted((str(p.relative_to(folder)), p.stat().st_mtime_ns, p.stat().st_size) for p in folder.rglob("*")
                  if p.relative_to(folder).parts[0].startswith(("step_", "epoch_")))


def _run_case(case, root, demo_dir, cache):
    name, setup, expected = case
    tmp = root / name
    tmp.mkdir()
    out = tmp / "out"
    (out / "step_1").mkdir(parents=True)  # an earlier run's checkpoint, which must stay as it is
    (out / "step_1" / "rank_0.pt").write_bytes(b"earlier")
    before = _snapshot(out)
    args = setup(tmp, demo_dir)
    config = TINY
    if args and args[0] == "--config-file":
        config, args = args[1], args[2:]
    cmd = [TUNE, "run", RECIPE, "--config", config, f"demo_dir={demo_dir}", f"output_dir={out}", *args]
    env = dict(os.environ, TIKTOKEN_CACHE_DIR="", GDT_TUNE_CACHE_DIR=str(cache))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    return {"proc": proc, "tmp": tmp, "expected": [e.format(tmp=tmp, demo=demo_dir) for e in expected],
            "unchanged": _snapshot(out) == before}


@pytest.fixture(scope="session")
def corpus_results(tmp_path_factory, demo_dir):
    root = tmp_path_factory.mktemp("bad_inputs")
    cache = tmp_path_factory.mktemp("bad_inputs_index")
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda c: _run_case(c, root, demo_dir, cache), CASES))
    return {case[0]: r for case, r in zip(CASES, results)}


def test_corpus_is_large_and_varied():
    from bad_inputs import CONFIG_CASES, DATA_CASES

    assert len(CASES) >= 30 and len(DATA_CASES) >= 15 and len(CONFIG_CASES) >= 15
    assert len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_bad_input_stops_with_one_clear_line(corpus_results, name):
    r = corpus_results[name]
    proc = r["proc"]
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-3000:])
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    for part in r["expected"]:
        assert part in errors[0], (part, errors[0])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "SYN0" not in proc.stdout + proc.stderr  # no patient id of the demo cohort
    assert r["unchanged"], "a checkpoint was touched"

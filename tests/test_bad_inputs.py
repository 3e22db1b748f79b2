"""The bad-input corpus (tests/bad_inputs.py): every case stops the recipe's setup with a
ValueError whose one line names the file:line or config key and the fix, holds no patient id, and
leaves the checkpoints in the output folder as they were. All cases run in this process (a world
of one); a handful also run end to end through ``tune run`` to check what the user sees: exit code
1, one ``error:`` line, no traceback."""

import os
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest
from bad_inputs import CASES
from recipe_utils import RECIPE, REPO, TINY, TUNE, load_config, setup_in_process

#: Cases that also run through ``tune run``: an error from the config check (before the process
#: group), from the data, and from the model weights.
END_TO_END = ["invalid-json", "typo-batch-size", "model-other-shape"]


def _snapshot(folder):
    """The checkpoints in ``folder`` (logs may be opened before the error)."""
    return sorted((str(p.relative_to(folder)), p.stat().st_mtime_ns, p.stat().st_size) for p in folder.rglob("*")
                  if p.relative_to(folder).parts[0].startswith(("step_", "epoch_")))


def _prepare(case, root, demo_dir):
    """(case folder, output folder, config file, overrides) with an earlier run's step_1 in place."""
    name, setup, _ = case
    tmp = root / name
    tmp.mkdir()
    out = tmp / "out"
    (out / "step_1").mkdir(parents=True)  # an earlier run's checkpoint, which must stay as it is
    (out / "step_1" / "rank_0.pt").write_bytes(b"earlier")
    args = setup(tmp, demo_dir)
    config = TINY
    if args and args[0] == "--config-file":
        config, args = args[1], args[2:]
    return tmp, out, config, [f"demo_dir={demo_dir}", f"output_dir={out}", *args]


def _expected(case, tmp, demo_dir):
    return [e.format(tmp=tmp, demo=demo_dir) for e in case[2]]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_stops_setup_with_one_clear_line(case, tmp_path, demo_dir):
    tmp, out, config, overrides = _prepare(case, tmp_path, demo_dir)
    before = _snapshot(out)
    with pytest.raises(ValueError) as error:
        setup_in_process(load_config(*overrides, config=config))
    message = str(error.value)
    assert "\n" not in message, message
    for part in _expected(case, tmp, demo_dir):
        assert part in message, (part, message)
    assert "SYN0" not in message  # no patient id of the demo cohort
    assert _snapshot(out) == before, "a checkpoint was touched"


def test_corpus_is_large_and_varied():
    from bad_inputs import CONFIG_CASES, DATA_CASES

    assert len(CASES) >= 30 and len(DATA_CASES) >= 15 and len(CONFIG_CASES) >= 15
    assert len({c[0] for c in CASES}) == len(CASES)
    assert set(END_TO_END) <= {c[0] for c in CASES}


def _run_case(case, root, demo_dir, cache):
    tmp, out, config, overrides = _prepare(case, root, demo_dir)
    before = _snapshot(out)
    cmd = [TUNE, "run", RECIPE, "--config", config, *overrides]
    env = dict(os.environ, TIKTOKEN_CACHE_DIR="", GDT_TUNE_CACHE_DIR=str(cache))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    return proc, _expected(case, tmp, demo_dir), _snapshot(out) == before


@pytest.fixture(scope="session")  # once per worker: xdist may run other modules in between
def end_to_end(tmp_path_factory, demo_dir):
    root, cache = tmp_path_factory.mktemp("bad_inputs"), tmp_path_factory.mktemp("bad_inputs_index")
    cases = [c for c in CASES if c[0] in END_TO_END]
    with ThreadPoolExecutor(2) as pool:
        return dict(zip([c[0] for c in cases], pool.map(lambda c: _run_case(c, root, demo_dir, cache), cases)))


@pytest.mark.xdist_group("bad_inputs_end_to_end")  # one worker runs the shared fixture
@pytest.mark.parametrize("name", END_TO_END)
def test_tune_run_shows_one_error_line_and_no_traceback(end_to_end, name):
    proc, expected, unchanged = end_to_end[name]
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-3000:])
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    for part in expected:
        assert part in errors[0], (part, errors[0])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "SYN0" not in proc.stdout + proc.stderr
    assert unchanged, "a checkpoint was touched"

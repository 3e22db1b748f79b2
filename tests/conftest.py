import os

# tiktoken caches even local tokenizer files by path: a rebuilt tokenizer at the same path would
# be read stale. An empty cache dir turns the cache off.
os.environ["TIKTOKEN_CACHE_DIR"] = ""
os.environ.setdefault("WANDB_MODE", "offline")

import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    # two workers share the cores: one thread each, or OpenMP threads spin against each other
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _index_cache(tmp_path, monkeypatch):
    """Each test gets its own dataset index cache."""
    monkeypatch.setenv("GDT_TUNE_CACHE_DIR", str(tmp_path / "index-cache"))


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    """The prepare-demo assets (cohort, tokenizer, tiny HF model), built once per session."""
    from gdt_tune.cli.demo_assets import prepare_demo

    return prepare_demo(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="session")
def tokenizer(demo_dir):
    from torchtune.models.llama3 import llama3_tokenizer

    return llama3_tokenizer(str(demo_dir / "model" / "tokenizer.model"),
                            special_tokens_path=str(demo_dir / "model" / "special_tokens.json"))


@pytest.fixture(scope="session")
def meta_assets():
    """The folder holding Meta's Llama 3 ``tokenizer.model`` and reference tokenizer (tests/meta_assets.py);
    fetched once by ``pytest_configure``."""
    from meta_assets import ensure

    return ensure()


def _fetch_meta_assets() -> None:
    """Meta's tokenizer from the llama-models wheel, once per run, before any worker starts; a
    failure stops the run with one line (never a skip)."""
    from meta_assets import WHEEL, cache_root, ensure

    try:
        ensure()
    except Exception as e:
        pytest.exit(f"error: Meta's Llama 3 tokenizer.model could not be fetched from the {WHEEL} wheel into "
                    f"{cache_root()}: {e}; check that PyPI is reachable, or put the wheel's files there",
                    returncode=4)


def pytest_configure(config):
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        _fetch_meta_assets()
    _refuse_ignored_xdist_groups(config)


def _refuse_ignored_xdist_groups(config):
    """Under ``-n 2 --dist loadgroup`` one worker runs each ``xdist_group`` and computes its shared
    2-rank runs once. pytest 9 with pytest-xdist <= 3.8 silently ignores the groups (the shared runs
    then run on both workers: minutes more, and suite times that differ from machine to machine):
    stop with one line instead."""
    import xdist

    major = int(pytest.__version__.split(".")[0])
    xdist_version = tuple(int(x) for x in xdist.__version__.split(".")[:2])
    if config.getoption("dist", "no") == "loadgroup" and major >= 9 and xdist_version <= (3, 8):
        pytest.exit(f"pytest {pytest.__version__} with pytest-xdist {xdist.__version__} ignores xdist_group; install "
                    "the versions of constraints.txt (pip install -c constraints.txt -e '.[dev]')", returncode=3)


@pytest.fixture(autouse=True)
def _signal_handlers():
    """The launcher ignores signals once its job is over (until the process exits); an in-process
    call must not leave that in the test process."""
    import signal

    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)

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
    from gdt_tune.demo_assets import prepare_demo

    return prepare_demo(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="session")
def tokenizer(demo_dir):
    from torchtune.models.llama3 import llama3_tokenizer

    return llama3_tokenizer(str(demo_dir / "model" / "tokenizer.model"),
                            special_tokens_path=str(demo_dir / "model" / "special_tokens.json"))

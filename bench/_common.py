"""Shared helpers of the benchmarks: work folder, tiny tokenizer, tables, child processes."""

from __future__ import annotations

import json
import os
import platform
import resource
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def machine() -> str:
    cpu = "?"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import torch

    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{os.cpu_count()} CPUs ({cpu}){gpu}, Python {platform.python_version()}, torch {torch.__version__}"


def command_line() -> str:
    return "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]])


def demo_tokenizer(work: Path):
    """The demo's tiny BPE tokenizer (1014 ranks + Llama 3 specials), built once under ``work``."""
    from torchtune.models.llama3 import llama3_tokenizer

    from gdt_tune.cli.demo_assets import prepare_demo

    os.environ["TIKTOKEN_CACHE_DIR"] = ""
    root = prepare_demo(work / "demo")
    return llama3_tokenizer(str(root / "model" / "tokenizer.model"),
                            special_tokens_path=str(root / "model" / "special_tokens.json"))


def table(headers: list[str], rows: list[list]) -> str:
    """A markdown table."""
    def cell(v):
        if isinstance(v, float):
            return f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"
        return f"{v:,}" if isinstance(v, int) else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def peak_rss_mb(children: bool = False) -> float:
    """Peak resident memory of this process (or of its largest finished child process), MB."""
    return resource.getrusage(resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child(script: Path, *args: str, env: dict | None = None) -> dict:
    """Run ``script --child ...`` in a fresh interpreter; it prints one JSON line last."""
    proc = subprocess.run([sys.executable, str(script), "--child", *args], capture_output=True, text=True,
                          env=dict(os.environ, **(env or {})), cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


RECIPE = "gdt_tune/recipes/full_finetune_fsdp_ckpt.py"
TINY_CONFIG = str(REPO / "configs" / "tiny_gdt_cpu.yaml")


def torchrun(nproc: int) -> list[str]:
    """The launcher of a recipe file; the file's folder is on sys.path, the repository must be on
    PYTHONPATH."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]


def launch(recipe: str, config: str, overrides: list[str], log_dir: Path, nproc: int = 2,
           timeout: float | None = None) -> dict:
    """Run a recipe file with torchrun from the repository root (as ``tune run`` does, without
    importing torchtune in the launcher) with ``bench/timing_logger`` as metric logger. Returns the
    launch time and the logged rows (each with its wall-clock ``time``)."""
    cmd = [*torchrun(nproc), recipe, "--config", config, *overrides,
           "metric_logger._component_=timing_logger.TimingLogger", f"metric_logger.log_dir={log_dir}"]
    env = dict(os.environ, TIKTOKEN_CACHE_DIR="",
               PYTHONPATH=os.pathsep.join([str(REPO / "bench"), str(REPO), os.environ.get("PYTHONPATH", "")]))
    started = __import__("time").time()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    ended = __import__("time").time()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    rows = [json.loads(line) for line in open(Path(log_dir) / "timing.jsonl")]
    return {"launched": started, "ended": ended, "rows": rows, "stdout": proc.stdout, "cmd": cmd}


def step_times(rows: list[dict], key: str = "loss") -> dict[int, float]:
    """Wall-clock time at which each step's metrics were logged."""
    return {r["step"]: r["time"] for r in rows if key in r}


def step_gaps(rows: list[dict], after: int) -> list[float]:
    """Wall-clock seconds between consecutive logged steps, for the steps after step ``after``."""
    times = step_times(rows)
    return [times[s] - times[s - 1] for s in sorted(times) if s > after and s - 1 in times]


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else float("nan")

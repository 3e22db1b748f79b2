"""No patient text leaves through the run's outputs: a 2-rank demo run with the disk logger and a
run stopped by a bad sample write logs, checkpoints, the index cache and stdout/stderr; none may
hold a line of any instruction or answer. The wandb side: the shipped 8B config's run, wandb
offline, is scanned the same way in tests/test_real_snapshot.py."""

import json
import re
from pathlib import Path

from recipe_utils import run_recipe

MIN_LEN = 24  # shorter lines are templates ("Task 1 is ..."), not a patient's text
PRINTABLE_RUN = re.compile(rb"[\x20-\x7e\t\r\n\x80-\xff]{%d,}" % MIN_LEN)


def needles(data_dir: Path) -> dict[str, set[str]]:
    """Every line of at least MIN_LEN characters of every instruction and answer, by its prefix."""
    out: dict[str, set[str]] = {}
    for path in data_dir.rglob("*.jsonl"):
        for line in path.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            for text in (record["instruction"], record["answer"]):
                for part in text.splitlines():
                    part = part.strip()
                    if len(part) >= MIN_LEN:
                        out.setdefault(part[:MIN_LEN], set()).add(part)
    return out


def leaks(blob: bytes, found: dict[str, set[str]]) -> list[str]:
    hits = []
    for run in PRINTABLE_RUN.findall(blob):
        text = run.decode("utf-8", errors="replace")
        for i in range(len(text) - MIN_LEN + 1):
            for needle in found.get(text[i:i + MIN_LEN], ()):
                if text.startswith(needle, i):
                    hits.append(needle)
    return hits


def test_leak_scanner_finds_a_planted_line(demo_dir):
    found = needles(demo_dir / "data")
    line = next(iter(next(iter(found.values()))))
    assert leaks(b"\x00\x01 loss 0.3 " + line.encode() + b"\x00", found) == [line]
    assert leaks(b"\x00 loss: 0.31 lr: 0.003 tokens_per_second_per_device: 100.0\n", found) == []


def test_no_patient_text_in_anything_a_run_writes(demo_dir, tmp_path, monkeypatch):
    cache = tmp_path / "index-cache"
    monkeypatch.setenv("GDT_TUNE_CACHE_DIR", str(cache))
    monkeypatch.setenv("WANDB_MODE", "offline")
    outputs = []
    disk = run_recipe(demo_dir, tmp_path / "disk", "max_steps_per_epoch=10", "save_every_n_steps=5",
                      "run_val_every_n_steps=5", "val_metrics_samples=8", "async_checkpointing=true")
    assert list((tmp_path / "disk").glob("step_*/.metadata")) and list((tmp_path / "disk" / "logs").glob("*.txt"))
    # a bad sample whose text must not be echoed
    first = (demo_dir / "data" / "train" / "part-00000.jsonl").read_text().splitlines()[0]
    bad = tmp_path / "bad" / "train.jsonl"
    bad.parent.mkdir()
    bad.write_text(json.dumps(dict(json.loads(first), answer=12)) + "\n")
    failed = run_recipe(demo_dir, tmp_path / "failed", f"dataset.data_files={bad}", nproc=1, check=False)
    assert failed.returncode == 1 and f"{bad}:1: field 'answer' is a int" in failed.stderr
    for proc in (disk, failed):
        outputs.append(("stdout/stderr", (proc.stdout + proc.stderr).encode()))
    files = [p for p in tmp_path.rglob("*") if p.is_file() and p != bad]
    assert len(files) > 20
    outputs += [(str(p), p.read_bytes()) for p in files]
    found = needles(demo_dir / "data")
    assert sum(map(len, found.values())) > 1000
    leaked = {name: hits[:2] for name, blob in outputs if (hits := leaks(blob, found))}
    assert leaked == {}
    # no patient id anywhere either, the dataset index cache included (numpy keeps strings as UTF-32)
    ids = {json.loads(line)["meta"]["patientid"] for split in ("train", "validation")
           for part in (demo_dir / "data" / split).glob("*.jsonl") for line in part.read_text().splitlines()}
    assert len(ids) > 20 and any(p.suffix == ".npz" for p in (tmp_path / "index-cache").rglob("*"))
    with_ids = [name for name, blob in outputs
                if any(i.encode() in blob or i.encode("utf-32-le") in blob for i in ids)]
    assert with_ids == []

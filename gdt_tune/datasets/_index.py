"""Index of JSONL sample files: one pass reads, validates and tokenizes every line and keeps
only byte offsets, line numbers, length-cap status and patient / line-of-therapy codes. The
index is cached per file, so a restart (or another rank) does not redo the pass, and no sample
text is kept in memory."""

from __future__ import annotations

import datetime as dt
import glob
import hashlib
import json
import os
import time
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from gdt_tune.datasets._layout import Layout, apply_cap

INDEX_VERSION = 1
_PROBE = "Probe: hemoglobin - 718-7 is 12.5,\n\tdrug X is administered. ÄÖü 123456 <|eot_id|>\n\n"


def resolve_data_files(data_files) -> list[Path]:
    """A file, a glob, a directory of ``*.jsonl`` shards, or a list of these -> sorted files."""
    specs = [data_files] if isinstance(data_files, (str, os.PathLike)) else list(data_files or [])
    if not specs:
        raise ValueError("dataset.data_files is empty: give a .jsonl file, a glob or a directory")
    files: list[Path] = []
    for spec in specs:
        spec = str(spec)
        if os.path.isdir(spec):
            found = sorted(Path(spec).glob("*.jsonl"))
            if not found:
                raise ValueError(f"dataset.data_files: directory {spec} holds no *.jsonl files")
        elif os.path.isfile(spec):
            found = [Path(spec)]
        else:
            found = sorted(Path(p) for p in glob.glob(spec) if os.path.isfile(p))
            if not found:
                raise ValueError(f"dataset.data_files: {spec} matches no file; check the path or glob")
        files += found
    return files


def read_record(raw: bytes, where: str) -> dict:
    """Decode one JSONL line and check instruction/answer; errors name ``where`` (file:line)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{where}: not valid UTF-8 (byte {e.start}); re-encode the file as UTF-8") from None
    if not text.strip():
        raise ValueError(f"{where}: empty line; remove blank lines from the file")
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object with 'instruction' and 'answer'")
    for key in ("instruction", "answer"):
        value = record.get(key)
        if not isinstance(value, str) or not value.strip():
            seen = "missing" if value is None else f"a {type(value).__name__}" if not isinstance(value, str) else "empty"
            raise ValueError(f"{where}: field '{key}' is {seen}; expected a non-empty string")
    return record


def _meta(record: dict, field_name: str, where: str, why: str):
    meta = record.get("meta")
    value = meta.get(field_name) if isinstance(meta, dict) else None
    if value is None or value == "":
        raise ValueError(f"{where}: field 'meta.{field_name}' is missing; it is needed by {why}")
    return value


def patient_of(record: dict, where: str, why: str) -> str:
    value = _meta(record, "patientid", where, why)
    if not isinstance(value, (str, int)):
        raise ValueError(f"{where}: field 'meta.patientid' must be a string")
    return str(value)


def _to_date(value, where: str, field_name: str) -> dt.date:
    try:
        if isinstance(value, (int, float)) or (isinstance(value, str) and value.lstrip("-").isdigit()):
            return dt.datetime.fromtimestamp(int(value) / 1000, tz=dt.timezone.utc).date()
        return dt.date.fromisoformat(str(value)[:10])
    except (ValueError, OverflowError, OSError):
        raise ValueError(f"{where}: field '{field_name}' holds an unreadable date") from None


def lot_of(record: dict, where: str) -> str:
    """The line of therapy of a sample, as an ISO date: the first ``lot_date`` in
    ``meta.target_meta``; for event-only samples, the latest ``lot`` event on or before the split
    date in ``meta.history_data``."""
    why = "splits_per_patient_therapy"
    target_meta = _meta(record, "target_meta", where, why)
    for entry in target_meta if isinstance(target_meta, list) else []:
        if isinstance(entry, dict) and entry.get("lot_date"):
            return _to_date(entry["lot_date"], where, "meta.target_meta.lot_date").isoformat()
    split = _to_date(_meta(record, "split_date_included_in_input", where, why), where,
                     "meta.split_date_included_in_input")
    history = _meta(record, "history_data", where, why + " (event-only samples carry no lot_date)")
    try:
        table = json.loads(history) if isinstance(history, str) else history
        cols = table["columns"]
        i_date, i_cat = cols.index("date"), cols.index("event_category")
        lots = [_to_date(row[i_date], where, "meta.history_data date")
                for row in table["data"] if row[i_cat] == "lot"]
    except (ValueError, KeyError, TypeError, IndexError) as e:
        if isinstance(e, ValueError) and str(e).startswith(where):
            raise
        raise ValueError(f"{where}: field 'meta.history_data' is not a pandas orient='split' table "
                         "with 'date' and 'event_category' columns") from None
    before = [d for d in lots if d <= split]
    if not before:
        raise ValueError(f"{where}: no lot_date in meta.target_meta and no 'lot' event on or before "
                         "the split date in meta.history_data; needed by splits_per_patient_therapy")
    return max(before).isoformat()


@dataclass
class FileIndex:
    """Per-line facts about one JSONL file (numpy arrays of equal length, codes into vocabularies)."""

    offsets: np.ndarray  # int64 byte offset of the line
    lengths: np.ndarray  # int32 byte length of the line
    lines: np.ndarray  # int32 1-based line number
    status: np.ndarray  # int8 _layout.Status
    num_tokens: np.ndarray  # int32 tokens after the cap (0 when dropped)
    patient: np.ndarray  # int32 code into patients, -1 when meta.patientid is absent
    lot: np.ndarray  # int32 code into lots, -1 when not computed
    patients: np.ndarray  # str
    lots: np.ndarray  # str

    def save(self, path: Path) -> None:
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp.npz")
        np.savez(tmp, **{f.name: getattr(self, f.name) for f in fields(self)})
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> FileIndex:
        with np.load(path, allow_pickle=False) as z:
            return cls(**{f.name: z[f.name] for f in fields(cls)})


def scan_file(path: Path, layout: Layout, max_seq_len: int, truncation: str, with_lot: bool) -> FileIndex:
    """Read, validate and tokenize every line of ``path``."""
    cols = {k: [] for k in ("offsets", "lengths", "lines", "status", "num_tokens", "patient", "lot")}
    patients: dict[str, int] = {}
    lots: dict[str, int] = {}
    offset = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            record = read_record(raw, where)
            tokens, _, status = apply_cap(layout, record["instruction"], record["answer"], max_seq_len, truncation)
            meta = record.get("meta") if isinstance(record.get("meta"), dict) else {}
            pid = meta.get("patientid")
            cols["offsets"].append(offset)
            cols["lengths"].append(len(raw))
            cols["lines"].append(lineno)
            cols["status"].append(int(status))
            cols["num_tokens"].append(len(tokens))
            cols["patient"].append(-1 if pid in (None, "") else patients.setdefault(str(pid), len(patients)))
            cols["lot"].append(lots.setdefault(lot_of(record, where), len(lots)) if with_lot else -1)
            offset += len(raw)
    dtypes = {"offsets": np.int64, "status": np.int8}
    return FileIndex(**{k: np.asarray(v, dtype=dtypes.get(k, np.int32)) for k, v in cols.items()},
                     patients=np.asarray(list(patients), dtype=str),
                     lots=np.asarray(list(lots), dtype=str))


def tokenizer_fingerprint(layout: Layout) -> str:
    """Identifies the tokenizer + system prompt by what they produce."""
    h = hashlib.sha256()
    h.update(repr((layout.prefix, layout.user_header, layout.assistant_header, layout.eot_id)).encode())
    h.update(repr(layout.prompt_tokens(_PROBE * 20)).encode())
    return h.hexdigest()[:16]


def index_files(files: list[Path], layout: Layout, max_seq_len: int, truncation: str, with_lot: bool,
                cache_dir: Path, build: bool = True, progress=None) -> list[FileIndex]:
    """Index of each file, from ``cache_dir`` when fresh. With ``build=False`` (ranks other than
    the node's first), wait for the builder to write the cache instead of scanning."""
    settings = f"v{INDEX_VERSION}|{tokenizer_fingerprint(layout)}|{max_seq_len}|{truncation}|{with_lot}"
    out = []
    for path in files:
        if progress is not None:
            progress.update(1)
        st = path.stat()
        key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{settings}".encode()).hexdigest()
        cached = cache_dir / f"{path.stem[:40]}-{key[:24]}.npz"
        if not cached.exists() and build:
            index = scan_file(path, layout, max_seq_len, truncation, with_lot)
            try:
                cache_dir.mkdir(parents=True, exist_ok=True)
                index.save(cached)
            except OSError as e:
                raise ValueError(f"dataset.cache_dir: cannot write the index cache in {cache_dir} ({e.strerror}); "
                                 "set cache_dir or $GDT_TUNE_CACHE_DIR to a writable folder") from None
        while not cached.exists():
            time.sleep(1.0)
        out.append(FileIndex.load(cached))
    return out

"""Index of JSONL sample files: one pass reads, validates and tokenizes every line and keeps
only byte offsets, line numbers, length-cap status and patient / line-of-therapy codes. The
index is cached per file, so a restart (or another rank) does not redo the pass, and no sample
text is kept in memory. Patient ids and line-of-therapy dates are stored only as keyed hashes
(HMAC-SHA256 with a random key made once per cache folder, ``hash.key``): equal ids give equal
hashes, and the cache holds no identifier."""

from __future__ import annotations

import datetime as dt
import glob
import hashlib
import hmac
import json
import multiprocessing as mp
import os
import time
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
from tqdm import tqdm

from gdt_tune.datasets._layout import Layout, apply_cap

INDEX_VERSION = 3  # 3: patient ids and LoT dates stored as keyed hashes
#: Longest accepted JSONL line; a GDT sample (8k tokens + meta) is well under 1 MiB.
MAX_LINE_BYTES = 16 * 2**20
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
        for path in found:
            if path.stat().st_size == 0:
                raise ValueError(f"{path}: the file is empty; remove it or point dataset.data_files elsewhere")
        files += found
    return files


def read_record(raw: bytes, where: str) -> dict:
    """Decode one JSONL line and check instruction/answer; errors name ``where`` (file:line)."""
    if len(raw) > MAX_LINE_BYTES:
        raise ValueError(f"{where}: line of {len(raw) / 2**20:.0f} MiB, over the {MAX_LINE_BYTES // 2**20} MiB limit; "
                         "is the file JSONL (one sample per line)?")
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


def patient_of(record: dict, where: str) -> str | None:
    """``meta.patientid`` as a string, None when absent."""
    meta = record.get("meta")
    pid = meta.get("patientid") if isinstance(meta, dict) else None
    if pid is None or pid == "":
        return None
    if isinstance(pid, bool) or not isinstance(pid, (str, int)):
        raise ValueError(f"{where}: field 'meta.patientid' must be a string")
    return str(pid)


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
    digest: np.ndarray  # int64 hash of instruction + answer (duplicate check)
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


def sample_digest(record: dict) -> int:
    """64-bit hash of a sample's instruction and answer."""
    h = hashlib.blake2b(record["instruction"].encode(), digest_size=8)
    h.update(b"\0" + record["answer"].encode())
    return int.from_bytes(h.digest(), "little", signed=True)


def chunks_of(path: Path, chunk_bytes: int) -> list[tuple[int, int, int]]:
    """(start byte, end byte, first line number) of pieces of ``path`` of about ``chunk_bytes``,
    cut at line ends, so that several processes can scan one big file."""
    out, start, line = [], 0, 1
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk_bytes)
            if not block:
                break
            block += f.readline()  # finish the line
            out.append((start, start + len(block), line))
            start += len(block)
            line += block.count(b"\n") + (not block.endswith(b"\n"))
    return out


def read_chunk(path: Path, start: int, end: int, first_line: int):
    """Yield ``(offset, line number, raw bytes, file:line, record)`` for the lines of ``path`` in
    bytes ``[start, end)``, each checked by :func:`read_record`."""
    with open(path, "rb") as f:
        f.seek(start)
        offset = start
        for lineno, raw in enumerate(iter(f.readline, b""), start=first_line):
            if offset >= end:
                break
            where = f"{path}:{lineno}"
            yield offset, lineno, raw, where, read_record(raw, where)
            offset += len(raw)


def map_chunks(files: list[Path], fn, args: tuple, workers: int, desc: str, show_progress: bool = True) -> list:
    """``[(path, fn(path, start, end, first_line, *args)), ...]`` over the 32 MB chunks of
    ``files`` in order, with ``workers`` processes when there is more than one chunk."""
    jobs = [(fn, path, *chunk, *args) for path in files for chunk in chunks_of(path, CHUNK_BYTES)]
    results = []
    with tqdm(total=sum(j[3] - j[2] for j in jobs), desc=desc, unit="B", unit_scale=True,
              disable=not show_progress) as bar:
        if workers > 1 and len(jobs) > 1:
            ctx = mp.get_context("fork")  # workers only read and tokenize: no threads or collectives
            with ctx.Pool(min(workers, len(jobs))) as pool:
                outputs = pool.imap(_run_job, jobs)
                for job, out in zip(jobs, outputs):
                    results.append((job[1], out))
                    bar.update(job[3] - job[2])
        else:
            for job in jobs:
                results.append((job[1], _run_job(job)))
                bar.update(job[3] - job[2])
    return results


def _run_job(job):
    return job[0](*job[1:])


def id_key(cache_dir: Path) -> bytes:
    """The cache folder's secret hashing key, made on first use (any process may make it; the
    first one written wins)."""
    path = cache_dir / "hash.key"
    if not path.is_file():
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = cache_dir / f"hash.key.{os.getpid()}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(os.urandom(32))
            try:
                os.link(tmp, path)  # atomic: fails if another process made it first
            except FileExistsError:
                pass
            finally:
                tmp.unlink()
        except OSError as e:
            raise ValueError(f"dataset.cache_dir: cannot write the index cache in {cache_dir} ({e.strerror}); "
                             "set cache_dir or $GDT_TUNE_CACHE_DIR to a writable folder") from None
    return path.read_bytes()


def key_fingerprint(key: bytes) -> str:
    """Names a key without revealing it (datasets hashed with different keys cannot be compared)."""
    return hashlib.sha256(b"gdt_tune id key|" + key).hexdigest()[:12]


def keyed_hash(key: bytes, text: str) -> str:
    """HMAC-SHA256 of an identifier, 128 bits in hex."""
    return hmac.new(key, text.encode(), hashlib.sha256).hexdigest()[:32]


def scan_chunk(path: Path, start: int, end: int, first_line: int, layout: Layout, max_seq_len: int,
               truncation: str, with_lot: bool, key: bytes) -> FileIndex:
    """Read, validate and tokenize the lines of ``path`` in bytes ``[start, end)``."""
    cols = {k: [] for k in ("offsets", "lengths", "lines", "status", "num_tokens", "digest", "patient", "lot")}
    patients: dict[str, int] = {}
    lots: dict[str, int] = {}
    for offset, lineno, raw, where, record in read_chunk(path, start, end, first_line):
        tokens, _, status = apply_cap(layout, record["instruction"], record["answer"], max_seq_len, truncation)
        pid = patient_of(record, where)
        cols["offsets"].append(offset)
        cols["lengths"].append(len(raw))
        cols["lines"].append(lineno)
        cols["status"].append(int(status))
        cols["num_tokens"].append(len(tokens))
        cols["digest"].append(sample_digest(record))
        if pid is not None:
            pid = keyed_hash(key, pid)
        cols["patient"].append(-1 if pid is None else patients.setdefault(pid, len(patients)))
        cols["lot"].append(lots.setdefault(keyed_hash(key, lot_of(record, where)), len(lots)) if with_lot else -1)
    dtypes = {"offsets": np.int64, "status": np.int8, "digest": np.int64}
    return FileIndex(**{k: np.asarray(v, dtype=dtypes.get(k, np.int32)) for k, v in cols.items()},
                     patients=np.asarray(list(patients), dtype=str),
                     lots=np.asarray(list(lots), dtype=str))


def merge(parts: list[FileIndex]) -> FileIndex:
    """One index from the indexes of consecutive chunks (codes remapped to shared vocabularies)."""
    out = {f.name: np.concatenate([getattr(p, f.name) for p in parts])
           for f in fields(FileIndex) if f.name not in ("patient", "lot", "patients", "lots")}
    for codes, vocab in (("patient", "patients"), ("lot", "lots")):
        names = np.unique(np.concatenate([getattr(p, vocab) for p in parts]))
        remapped = []
        for p in parts:
            mapping = np.searchsorted(names, getattr(p, vocab)).astype(np.int32)
            c = getattr(p, codes)
            remapped.append(np.where(c < 0, -1, mapping[np.maximum(c, 0)] if len(mapping) else -1))
        out[codes], out[vocab] = np.concatenate(remapped).astype(np.int32), names
    return FileIndex(**out)


def tokenizer_fingerprint(layout: Layout) -> str:
    """Identifies the tokenizer + system prompt by what they produce."""
    h = hashlib.sha256()
    h.update(repr((layout.prefix, layout.user_header, layout.assistant_header, layout.eot_id)).encode())
    h.update(repr(layout.prompt_tokens(_PROBE * 20)).encode())
    return h.hexdigest()[:16]


#: Size of the pieces that indexing processes scan in parallel.
CHUNK_BYTES = 32 * 2**20


def default_index_workers() -> int:
    """All CPUs this process may use (only one process per node indexes)."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def _build(todo: list[Path], scan_args: tuple, workers: int, show_progress: bool) -> list[FileIndex]:
    """Scan files ``todo`` in chunks, with ``workers`` processes when there is more than one chunk."""
    results = map_chunks(todo, scan_chunk, scan_args, workers, "indexing samples", show_progress)
    return [merge([index for p, index in results if p == path]) for path in todo]


def index_files(files: list[Path], layout: Layout, max_seq_len: int, truncation: str, with_lot: bool,
                cache_dir: Path, build: bool = True, workers: int | None = None,
                show_progress: bool = False) -> list[FileIndex]:
    """Index of each file, from ``cache_dir`` when fresh; missing ones are scanned by ``workers``
    processes (default: all CPUs). With ``build=False`` (ranks other than the node's first), wait
    for the builder to write the cache instead of scanning."""
    key = id_key(cache_dir)
    settings = (f"v{INDEX_VERSION}|{tokenizer_fingerprint(layout)}|{max_seq_len}|{truncation}|{with_lot}|"
                f"{key_fingerprint(key)}")
    cached = []
    for path in files:
        st = path.stat()
        name = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{settings}".encode()).hexdigest()
        cached.append(cache_dir / f"{path.stem[:40]}-{name[:24]}.npz")
    todo = [(path, c) for path, c in zip(files, cached) if not c.exists()]
    if todo and build:
        built = _build([p for p, _ in todo], (layout, max_seq_len, truncation, with_lot, key),
                       workers or default_index_workers(), show_progress)
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            for (_, c), index in zip(todo, built):
                index.save(c)
        except OSError as e:
            raise ValueError(f"dataset.cache_dir: cannot write the index cache in {cache_dir} ({e.strerror}); "
                             "set cache_dir or $GDT_TUNE_CACHE_DIR to a writable folder") from None
    out = []
    for c in cached:
        while not c.exists():
            time.sleep(1.0)
        out.append(FileIndex.load(c))
    return out

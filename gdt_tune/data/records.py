"""Reading TwinWeaver JSONL sample files: finding them, splitting them into pieces that several
processes can scan, reading lines with their ``file:line``, and validating each record
(docs/data-format.md). Errors name the file and line, never the text::

    for path in resolve_data_files("/data/gdt/train"):
        for offset, lineno, raw, where, record in read_lines(path):
            ...
"""

from __future__ import annotations

import datetime as dt
import glob
import json
import multiprocessing as mp
import os
import signal
from pathlib import Path

from tqdm import tqdm

#: Longest accepted JSONL line; a GDT sample (8k tokens + meta) is well under 1 MiB.
MAX_LINE_BYTES = 16 * 2**20


#: Leading bytes of compressed files, which must be decompressed first.
COMPRESSED = {b"\x1f\x8b": "gzip", b"\x28\xb5\x2f\xfd": "zstd", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz",
              b"PK\x03\x04": "zip"}


def resolve_data_files(data_files, key: str = "dataset.data_files") -> list[Path]:
    """A file, a glob, a directory of ``*.jsonl`` shards, or a list of these -> sorted files.
    Errors name ``key`` (the config key or command-line option that gave them)."""
    specs = [data_files] if isinstance(data_files, (str, os.PathLike)) else list(data_files or [])
    if not specs:
        raise ValueError(f"{key} is empty: give a .jsonl file, a glob or a directory")
    files: list[Path] = []
    reached: dict[tuple[int, int], tuple[str, Path]] = {}
    for spec in specs:
        spec = str(spec)
        if os.path.isdir(spec):
            found = sorted(Path(spec).glob("*.jsonl"))
            for p in found:
                if not p.is_file():
                    what = "a folder" if p.is_dir() else "a broken link" if p.is_symlink() else "not a regular file"
                    raise ValueError(f"{key}: {p} is {what}; remove it or rename it so that it does not end in .jsonl")
            nested = sorted(Path(spec).glob("*/**/*.jsonl"))
            if not found:
                packed = sorted(p.name for p in Path(spec).glob("*.jsonl.*"))
                hint = (f" (found {packed[0]}: decompress it; gdt_tune reads plain JSONL)" if packed else
                        f" at its top (found {nested[0]}: point {key} at that folder)" if nested else "")
                raise ValueError(f"{key}: directory {spec} holds no *.jsonl files{hint}")
            if nested:
                raise ValueError(f"{key}: directory {spec} also has .jsonl files in subfolders ({nested[0]}), which "
                                 f"would not be read; move them up, list their folders too, or give the glob "
                                 f"{os.path.join(spec, '*.jsonl')} to read only the top")
        elif os.path.isfile(spec):
            found = [Path(spec)]
        else:
            found = sorted(Path(p) for p in glob.glob(spec) if os.path.isfile(p))
            if not found:
                raise ValueError(f"{key}: {spec} matches no file; check the path or glob")
        for path in found:
            if path.stat().st_size == 0:
                raise ValueError(f"{path}: the file is empty; remove it or point {key} elsewhere")
            with open(path, "rb") as f:
                head = f.read(6)
            packed = next((name for magic, name in COMPRESSED.items() if head.startswith(magic)), None)
            if packed:
                raise ValueError(f"{path}: the file is {packed}-compressed; decompress it (gdt_tune reads plain "
                                 "JSONL, one sample per line)")
        for path in found:  # a file reached twice (listed twice, through a folder and by name, a link)
            st = path.stat()
            first = reached.setdefault((st.st_dev, st.st_ino), (spec, path))
            if first[1] is not path:
                how = "listed twice" if first[0] == spec else f"reached twice (through {first[0]} and {spec})"
                raise ValueError(f"{key}: the file {path} is {how}; give each file once")
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


def task_target(record: dict, number: int) -> dict:
    """``meta.target_meta`` entry of task ``number`` (1-based; the entries follow the tasks' order),
    or {} when the sample has none: third-party data may leave ``meta`` out."""
    meta = record.get("meta")
    entries = meta.get("target_meta") if isinstance(meta, dict) else None
    if isinstance(entries, list) and 0 < number <= len(entries) and isinstance(entries[number - 1], dict):
        return entries[number - 1]
    return {}


def event_time(record: dict, number: int) -> tuple[float | None, bool | None]:
    """(weeks, occurred) of event task ``number``: ``delta_time_numeric`` (weeks from the split to
    ``date_event_occured``, the event or the end of what was observed) and ``occurred`` of its
    ``meta.target_meta`` entry; (None, None) when either is missing or not a number / bool."""
    target = task_target(record, number)
    weeks, occurred = target.get("delta_time_numeric"), target.get("occurred")
    if isinstance(weeks, bool) or not isinstance(weeks, (int, float)) or not isinstance(occurred, bool):
        return None, None
    return float(weeks), occurred


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
            # the workers ignore Ctrl-C (the terminal sends it to them too): this process stops them
            with ctx.Pool(min(workers, len(jobs)), initializer=signal.signal, initargs=(signal.SIGINT, signal.SIG_IGN)) as pool:
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


#: Size of the pieces that indexing processes scan in parallel.
CHUNK_BYTES = 32 * 2**20


def default_index_workers() -> int:
    """All CPUs this process may use (only one process per node indexes), quota included."""
    from gdt_tune.runtime.cpus import available_cpus

    return available_cpus()



def read_lines(path: Path):
    """:func:`read_chunk` over the whole file."""
    return read_chunk(path, 0, path.stat().st_size, 1)

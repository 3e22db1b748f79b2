"""Index of JSONL sample files: one pass reads, validates and tokenizes every line and keeps
only byte offsets, line numbers, length-cap status and patient / line-of-therapy codes. The
index is cached per file, so a restart (or another rank) does not redo the pass, and no sample
text is kept in memory. Patient ids and line-of-therapy dates are stored only as keyed hashes
(HMAC-SHA256 with a random key made once per cache folder, ``hash.key``): equal ids give equal
hashes, and the cache holds no identifier."""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from gdt_tune.data.layout import Layout, apply_cap
from gdt_tune.data.records import default_index_workers, lot_of, map_chunks, patient_of, read_chunk
from gdt_tune.runtime.files import atomic_output, file_stamp

log = logging.getLogger("gdt_tune")

INDEX_VERSION = 5  # 3: patient ids and LoT dates stored as keyed hashes; 5: stat stamp (ctime, inode)


_PROBE = "Probe: hemoglobin - 718-7 is 12.5,\n\tdrug X is administered. ÄÖü 123456 <|eot_id|>\n\n"


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

    def save(self, path: Path, stamp: str) -> None:
        """``stamp``: ``str(file_stamp(file))`` as it was indexed (``runtime.files``: what an edit
        cannot keep, as git's index: size, mtime, and the inode and its ctime). An index that does not fit its
        file is never written (see :meth:`fits`)."""
        if not self.fits(stamp_size(stamp)):
            raise RuntimeError(f"internal error: the index of {path.name} does not fit its file; not cached")
        with atomic_output(path) as tmp, open(tmp, "wb") as out:
            np.savez(out, stamp=np.asarray(stamp), **{f.name: getattr(self, f.name) for f in fields(self)})

    @classmethod
    def load(cls, path: Path) -> tuple[FileIndex, str]:
        """(index, stamp); ``(None, "")`` for an unreadable entry (it is rebuilt)."""
        try:
            with np.load(path, allow_pickle=False) as z:
                return cls(**{f.name: z[f.name] for f in fields(cls)}), str(z["stamp"])
        except (OSError, ValueError, KeyError, EOFError):
            return None, ""

    def fits(self, size: int) -> bool:
        """Each line once, in file order, inside a file of ``size`` bytes: a file indexed twice, or
        an index of another file, does not fit."""
        ends = self.offsets + self.lengths
        return bool(np.all(self.offsets[1:] >= ends[:-1]) and (len(ends) == 0 or ends[-1] <= size))


def stamp_size(stamp: str) -> int:
    """The file size in a stored stamp (``str(file_stamp(path))``)."""
    return int(stamp.split("|", 1)[0])


def sample_digest(record: dict) -> int:
    """64-bit hash of a sample's instruction and answer."""
    h = hashlib.blake2b(record["instruction"].encode(), digest_size=8)
    h.update(b"\0" + record["answer"].encode())
    return int.from_bytes(h.digest(), "little", signed=True)


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


def _build(todo: list[Path], scan_args: tuple, workers: int, show_progress: bool) -> list[FileIndex]:
    """Scan files ``todo`` in chunks, with ``workers`` processes when there is more than one chunk."""
    results = map_chunks(todo, scan_chunk, scan_args, workers, "indexing samples", show_progress)
    return [merge([index for p, index in results if p == path]) for path in todo]


def index_files(files: list[Path], layout: Layout, max_seq_len: int, truncation: str, with_lot: bool,
                cache_dir: Path, build: bool = True, workers: int | None = None,
                show_progress: bool = False) -> list[FileIndex]:
    """Index of each file, from ``cache_dir`` when fresh; missing ones are scanned by ``workers``
    processes (default: all CPUs). With ``build=False`` (ranks that waited for the node's
    builder) a missing index is an error."""
    key = id_key(cache_dir)
    settings = (f"v{INDEX_VERSION}|{tokenizer_fingerprint(layout)}|{max_seq_len}|{truncation}|{with_lot}|"
                f"{key_fingerprint(key)}")
    # one entry per (file, settings), replaced when the file changes; trusted only when its stamp is
    # the file's now and it fits the file
    cached = [cache_dir / f"{path.stem[:40]}-{hashlib.sha256(f'{path.resolve()}|{settings}'.encode()).hexdigest()[:24]}.npz"
              for path in files]
    stamps = {path: str(file_stamp(path)) for path in files}
    indexes: dict[Path, FileIndex] = {}
    for path, c in zip(files, cached):
        index, stamp = FileIndex.load(c) if c.exists() else (None, "")
        if index is not None and stamp == stamps[path] and index.fits(stamp_size(stamp)):
            indexes[path] = index
        elif index is not None and build:
            log.warning("%s: changed since it was indexed; indexing it again", path)
    if not build:  # the node's builder has checked and written every index
        missing = [path for path in files if path not in indexes]
        if missing:
            raise ValueError(f"dataset.cache_dir: no current index of {missing[0]} in {cache_dir} after the node's "
                             "first rank built it; give every rank of a node the same cache_dir (a node-local or "
                             "shared folder), and do not edit the data while a run starts")
        return [indexes[path] for path in files]
    todo = [(path, c) for path, c in zip(files, cached) if path not in indexes]
    if todo:
        built = _build([p for p, _ in todo], (layout, max_seq_len, truncation, with_lot, key),
                       workers or default_index_workers(), show_progress)
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            for (path, c), index in zip(todo, built):
                index.save(c, stamps[path])
                indexes[path] = index
        except OSError as e:
            raise ValueError(f"dataset.cache_dir: cannot write the index cache in {cache_dir} ({e.strerror}); "
                             "set cache_dir or $GDT_TUNE_CACHE_DIR to a writable folder") from None
    return [indexes[path] for path in files]

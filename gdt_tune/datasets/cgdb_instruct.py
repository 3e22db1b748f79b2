"""The ``cgdb_instruct`` dataset: TwinWeaver JSONL patient samples -> Llama 3 training sequences."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch.distributed as dist
from torch.utils.data import Dataset

from gdt_tune.data.layout import (
    DEFAULT_MAX_SEQ_LEN,
    GDT_SYSTEM_PROMPT_SHA256,
    TRUNCATION_POLICIES,
    Layout,
    Status,
    apply_cap,
    system_prompt_or_default,
    system_prompt_sha256,
    validate,
)
from gdt_tune.data.records import read_record, resolve_data_files
from gdt_tune.datasets._index import id_key, index_files, key_fingerprint, keyed_hash, tokenizer_fingerprint
from gdt_tune.datasets.selection import Rows, select
from gdt_tune.runtime.coordination import node_first
from gdt_tune.runtime.files import file_stamp

log = logging.getLogger("gdt_tune")


def default_cache_dir() -> Path:
    """``$GDT_TUNE_CACHE_DIR``, else ``~/.cache/gdt_tune/index``."""
    return Path(os.environ.get("GDT_TUNE_CACHE_DIR") or Path.home() / ".cache" / "gdt_tune" / "index")


@runtime_checkable
class PatientDataset(Protocol):
    """What the recipe reads from a patient dataset beyond ``len`` and ``[i]`` (other torchtune
    datasets work too; they skip the patient-overlap check and the drop count)."""

    files: list[str]  #: the JSONL files read (the resume contract fingerprints them)
    counts: dict[str, int]  #: kept / truncated / dropped_* / not_selected / samples
    id_key_fingerprint: str  #: which cache key hashed the patient ids
    #: what shaped the samples: system_prompt, max_seq_len, truncation, splits_per_patient_therapy
    settings: dict

    def patient_ids(self) -> set[str]: ...

    def where_patient(self, patient_id: str) -> str: ...

    def lengths(self): ...  #: tokens of each sample after the cap (balanced_steps)


def refuse_shared_patients(first, second, keys: tuple[str, str] = ("dataset", "dataset_val"),
                           warn: bool = True) -> None:
    """ValueError when two :class:`PatientDataset` splits share a patient, naming where (``file:line``
    of each), never the id; other datasets are not checked. ``keys``: what to call them; ``warn``: log
    how many samples lack ``meta.patientid`` (rank 0)."""
    if not (isinstance(first, PatientDataset) and isinstance(second, PatientDataset)):
        return
    if first.id_key_fingerprint != second.id_key_fingerprint:
        raise ValueError(f"{keys[0]}.cache_dir and {keys[1]}.cache_dir hold different id-hashing keys, so their "
                         "patient overlap cannot be checked; give both the same cache_dir")
    for key, ds in zip(keys, (first, second)):
        if (missing := ds.counts.get("no_patient_id", 0)) and warn:
            log.warning("%s: %d of %d samples have no meta.patientid, so whether their patients also appear in "
                        "the other split cannot be checked; give every sample meta.patientid", key, missing, len(ds))
    shared = first.patient_ids() & second.patient_ids()
    if shared:
        one = min(shared)  # named by where it is, not by its id
        raise ValueError(f"{keys[0]} and {keys[1]} share {len(shared)} patients (e.g. the patient of "
                         f"{first.where_patient(one)} and {second.where_patient(one)}); split them by patient")


def dropped_by_cap(dataset) -> int:
    """Samples the length cap dropped from a :class:`PatientDataset` (0 for another dataset)."""
    counts = dataset.counts if isinstance(dataset, PatientDataset) else {}
    return sum(counts.get(s.name.lower(), 0) for s in Status if s.dropped)


class CGDBInstructDataset(Dataset):
    """Map-style dataset over indexed JSONL lines; ``ds[i]`` reads, tokenizes and validates one
    sample and returns ``{"tokens": [...], "labels": [...]}``. Build it with
    :func:`cgdb_instruct_dataset`. Implements :class:`PatientDataset`."""

    def __init__(self, files: list[Path], rows: Rows, *, layout: Layout, max_seq_len: int, truncation: str,
                 counts: dict[str, int], id_key_fingerprint: str, settings: dict, data_files: dict,
                 cache_dir: Path | None = None):
        self.files = [str(f) for f in files]
        self.data_files = data_files  # what the resume contract compares (see file_identities)
        self._stamps = [file_stamp(f) for f in self.files]
        self._rows = rows
        self._layout, self._max_seq_len, self._truncation = layout, max_seq_len, truncation
        self.counts = counts
        self.id_key_fingerprint = id_key_fingerprint
        self.settings = settings
        self.cache_dir = cache_dir  # the index cache: what is computed from the samples' tokens is kept there too

    def __len__(self) -> int:
        return len(self._rows)

    def where(self, index: int) -> str:
        """``file:line`` of sample ``index`` (for error messages; never the text)."""
        return f"{self.files[self._rows.file[index]]}:{self._rows.line[index]}"

    def where_patient(self, patient_id: str) -> str:
        """``file:line`` of the first sample of a patient (by the hash from :meth:`patient_ids`)."""
        return self.where(int(np.flatnonzero(self._rows.patient == patient_id)[0]))

    def selection_digest(self) -> str:
        """Hash of the samples kept, in order (their instruction and answer): what the selection
        (``patient_ids``, ``splits_per_patient_therapy``, the files' ``meta``) chose."""
        return hashlib.blake2b(self._rows.digest.tobytes(), digest_size=8).hexdigest()

    def lengths(self) -> np.ndarray:
        """Tokens of each sample after the length cap, from the index (no sample is read)."""
        return self._rows.tokens

    def patient_groups(self) -> np.ndarray:
        """A group number per sample: the samples of one patient share it; a sample without
        ``meta.patientid`` is a group of its own."""
        _, groups = np.unique(self._rows.patient, return_inverse=True)
        alone = np.flatnonzero(self._rows.patient == "")
        groups = groups.astype(np.int64)
        groups[alone] = groups.max(initial=-1) + 1 + np.arange(len(alone))
        return groups

    def tokens_digest(self) -> str:
        """Names the samples' token ids: the samples kept, the tokenizer and prompt, the cap (a
        cache of something computed from the tokens is current while this is)."""
        h = hashlib.blake2b(self._rows.digest.tobytes(), digest_size=8)
        h.update(f"{tokenizer_fingerprint(self._layout)}|{self._max_seq_len}|{self._truncation}".encode())
        return h.hexdigest()

    def patient_ids(self) -> set[str]:
        """The distinct ``meta.patientid`` values of the samples as keyed hashes (see
        ``_index.keyed_hash``; rows without one are skipped)."""
        return set(np.unique(self._rows.patient).tolist()) - {""}

    def record(self, index: int) -> dict:
        """Sample ``index`` as read from its file (validated; not capped)."""
        where, file = self.where(index), self._rows.file[index]
        with open(self.files[file], "rb") as f:
            if not file_stamp(f.fileno()).same_content(self._stamps[file]):
                raise ValueError(f"{where}: the file changed after it was indexed; restart to re-index it")
            f.seek(int(self._rows.offset[index]))
            raw = f.read(int(self._rows.length[index]))
        return read_record(raw, where)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        where, record = self.where(index), self.record(index)
        tokens, labels, status = apply_cap(self._layout, record["instruction"], record["answer"],
                                           self._max_seq_len, self._truncation)
        try:
            validate(tokens, labels, self._layout, self._max_seq_len, status)
        except ValueError as e:
            raise ValueError(f"{where}: invalid token layout: {e}") from None
        return {"tokens": tokens, "labels": labels}


def file_identities(files: list[Path], rows: Rows) -> dict[str, dict]:
    """``{name: {"bytes", "samples", "content"}}`` of each data file, before any selection:
    ``content`` hashes the indexed samples' digests, so it is the file's text, whatever its
    timestamps (a copy or a ``touch`` is the same data, a same-size edit is not). Names are the
    file names, or paths below the files' common folder when two share a name."""
    names = [f.name for f in files]
    if len(set(names)) < len(names):
        root = os.path.commonpath([str(f.parent) for f in files])
        names = [os.path.relpath(f, root) for f in files]
    out = {}
    for i, (name, path) in enumerate(zip(names, files)):
        digests = rows.digest[rows.file == i]
        out[name] = {"bytes": os.stat(path).st_size, "samples": len(digests),
                     "content": hashlib.blake2b(digests.tobytes(), digest_size=8).hexdigest()}
    return out


def _read_patient_ids(patient_ids) -> set[str]:
    if isinstance(patient_ids, (str, os.PathLike)):
        path = Path(patient_ids)
        if not path.is_file():
            raise ValueError(f"dataset.patient_ids: {path} is not a file; give a file of ids (one per line) or a list")
        return {line.strip() for line in path.read_text().splitlines() if line.strip()}
    return {str(p) for p in patient_ids}


def cgdb_instruct_dataset(
    tokenizer,
    *,
    data_files,
    system_prompt: str | None = None,
    max_seq_len: int = DEFAULT_MAX_SEQ_LEN,
    truncation: str = "gdt",
    splits_per_patient_therapy: int | None = None,
    seed: int = 0,
    patient_ids=None,
    cache_dir: str | None = None,
    index_workers: int | None = None,
) -> CGDBInstructDataset:
    """GDT patient samples (TwinWeaver JSONL, ``docs/data-format.md``) as Llama 3 training
    sequences with the prompt masked.

    Each line of the JSONL files is one sample:

    ===================  ==========  ==================================================
    field                type        use
    ===================  ==========  ==================================================
    ``instruction``      str         user turn (patient history and task list)
    ``answer``           str         assistant turn (the targets), the only trained text
    ``meta.patientid``   str         ``patient_ids``, ``splits_per_patient_therapy``,
                                     train/validation overlap check
    ``meta.target_meta`` list[dict]  ``lot_date`` for ``splits_per_patient_therapy``
    ``meta.history_data`` str        ``lot`` events, for event-only samples only
    ===================  ==========  ==================================================

    Other fields are ignored. Every sample becomes exactly::

        <|begin_of_text|><|start_header_id|>system<|end_header_id|>\\n\\n{system}<|eot_id|>
        <|start_header_id|>user<|end_header_id|>\\n\\n{instruction}<|eot_id|>
        <|start_header_id|>assistant<|end_header_id|>\\n\\n{answer}<|eot_id|>

    (contents stripped, one BOS, nothing after the last ``<|eot_id|>``). Labels are -100 before
    the assistant's ``<|start_header_id|>`` and equal the tokens from there on. Every sample is
    validated against this layout when it is read.

    Args:
        tokenizer: a torchtune Llama 3 tokenizer.
        data_files: a ``.jsonl`` file, a glob, a directory of ``*.jsonl`` shards, or a list.
        system_prompt: the system turn; None uses gdt_tune's own wording. The original GDT
            prompt is recognised by its SHA-256 and reported once.
        max_seq_len: token cap (default ``DEFAULT_MAX_SEQ_LEN``, GDT's).
        truncation: over-length policy. ``"gdt"``: keep the first ``max_seq_len`` tokens, drop a
            sample whose assistant header does not fit; ``"drop"``: drop it; ``"history"``:
            remove the oldest visits (never the first) until it fits, drop if it cannot.
        splits_per_patient_therapy: keep at most N samples per (patient, line of therapy),
            chosen with ``seed``; None keeps all.
        seed: seed of that choice.
        patient_ids: keep only these patients: a list of ids or a file with one id per line.
        cache_dir: where the per-file index is cached (default ``$GDT_TUNE_CACHE_DIR`` or
            ``~/.cache/gdt_tune/index``). Only the first rank of each node builds it; the
            others wait for it on a collective.
        index_workers: processes that build the index, each scanning 32 MB pieces of the files
            (default: every CPU of the node; the other ranks wait for it).

    Returns:
        CGDBInstructDataset: ``ds[i] == {"tokens": [...], "labels": [...]}``; ``len(ds)`` is
        exact and the same on every rank; ``ds.counts`` holds kept / truncated / dropped counts.

    Raises:
        ValueError: bad arguments, or a bad sample: invalid UTF-8 or JSON, a line over 16 MiB,
            missing / non-string / empty ``instruction`` or ``answer``, the same instruction and
            answer twice, or a ``meta`` field missing when a feature needs it. The message names
            the file and line, never the text.

    Example (config)::

        dataset:
          _component_: gdt_tune.datasets.cgdb_instruct_dataset
          data_files: /data/gdt/train
          truncation: gdt
          splits_per_patient_therapy: null
    """
    if index_workers is not None and (not isinstance(index_workers, int) or index_workers < 1):
        raise ValueError(f"dataset.index_workers: {index_workers!r}; expected null or an integer >= 1")
    if truncation not in TRUNCATION_POLICIES:
        raise ValueError(f"dataset.truncation: {truncation!r} is not one of {', '.join(TRUNCATION_POLICIES)}")
    if not isinstance(max_seq_len, int) or max_seq_len < 16:
        raise ValueError(f"dataset.max_seq_len: {max_seq_len!r}; expected an integer >= 16 (GDT: {DEFAULT_MAX_SEQ_LEN})")
    if splits_per_patient_therapy is not None and (
        not isinstance(splits_per_patient_therapy, int) or splits_per_patient_therapy < 1):
        raise ValueError(f"dataset.splits_per_patient_therapy: {splits_per_patient_therapy!r}; expected null or an integer >= 1")
    prompt = system_prompt_or_default(system_prompt)
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("dataset.system_prompt: expected a non-empty string, or null for the default")
    quiet = dist.is_initialized() and dist.get_rank() != 0
    if system_prompt_sha256(prompt) == GDT_SYSTEM_PROMPT_SHA256 and not quiet:
        log.info("cgdb_instruct: using the original GDT system prompt (SHA-256 matches)")

    files = resolve_data_files(data_files)
    layout = Layout.build(tokenizer, prompt)
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    indexes = node_first(lambda build: index_files(
        files, layout, max_seq_len, truncation, splits_per_patient_therapy is not None, cache, build=build,
        workers=index_workers, show_progress=not quiet))
    key = id_key(cache)  # patient ids in the index are keyed hashes
    rows = Rows.from_indexes(indexes)
    wanted = None if patient_ids is None else {keyed_hash(key, p) for p in _read_patient_ids(patient_ids)}
    kept, counts = select(rows, lambda i: f"{files[rows.file[i]]}:{rows.line[i]}", patients=wanted,
                          per_patient_therapy=splits_per_patient_therapy, seed=seed)
    if not quiet:
        log.info("cgdb_instruct: %d samples from %d files (%s)", len(kept), len(files),
                 ", ".join(f"{k} {v}" for k, v in sorted(counts.items()) if k != "samples"))
    return CGDBInstructDataset(files, rows.take(kept), layout=layout, max_seq_len=max_seq_len, truncation=truncation,
                               counts=counts, id_key_fingerprint=key_fingerprint(key),
                               data_files=file_identities(files, rows),
                               settings={"system_prompt": prompt, "max_seq_len": max_seq_len, "truncation": truncation,
                                         "splits_per_patient_therapy": splits_per_patient_therapy}, cache_dir=cache)

"""Which indexed samples a dataset keeps: pure functions of the index, identical on every rank.

    rows = Rows.from_indexes(indexes)
    kept, counts = select(rows, where, patients=None, per_patient_therapy=None, seed=0)

Order of the steps: refuse duplicate samples; keep the listed patients; drop samples the length
cap drops; keep at most N samples per (patient, line of therapy), chosen by ``seed``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, fields

import numpy as np

from gdt_tune.data.layout import Status


@dataclass(frozen=True)
class Rows:
    """One entry per indexed sample (numpy arrays of equal length). ``patient`` and ``lot`` hold
    keyed hashes (``""``: absent or not computed)."""

    file: np.ndarray  # int32: which file
    offset: np.ndarray  # int64: byte offset of the line
    length: np.ndarray  # int32: byte length of the line
    line: np.ndarray  # int32: 1-based line number
    status: np.ndarray  # int8: layout.Status after the length cap
    tokens: np.ndarray  # int32: tokens after the length cap (0 when dropped)
    digest: np.ndarray  # int64: hash of instruction + answer
    patient: np.ndarray  # str
    lot: np.ndarray  # str

    def __len__(self) -> int:
        return len(self.offset)

    def take(self, index: np.ndarray) -> Rows:
        return Rows(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    @classmethod
    def from_indexes(cls, indexes) -> Rows:
        """Concatenate per-file ``_index.FileIndex`` objects (their codes decoded to hashes)."""
        def decode(codes: str, vocab: str) -> np.ndarray:
            parts = [np.append(getattr(ix, vocab).astype(str), "")[getattr(ix, codes)] for ix in indexes]
            return np.concatenate(parts) if parts else np.zeros(0, dtype=str)  # code -1 -> ""
        cat = {name: np.concatenate([getattr(ix, name) for ix in indexes])
               for name in ("offsets", "lengths", "lines", "status", "num_tokens", "digest")}
        return cls(file=np.concatenate([np.full(len(ix.offsets), i, dtype=np.int32) for i, ix in enumerate(indexes)]),
                   offset=cat["offsets"], length=cat["lengths"], line=cat["lines"], status=cat["status"],
                   tokens=cat["num_tokens"],
                   digest=cat["digest"], patient=decode("patient", "patients"), lot=decode("lot", "lots"))


def refuse_duplicates(digest: np.ndarray, where: Callable[[int], str]) -> None:
    """ValueError naming the second of two samples with the same instruction and answer."""
    order = np.argsort(digest, kind="stable")
    same = np.flatnonzero(digest[order][1:] == digest[order][:-1])
    if len(same):
        first, again = order[same[0]], order[same[0] + 1]
        raise ValueError(f"{where(again)}: same instruction and answer as {where(first)}; "
                         f"remove duplicate samples ({len(same)} found)")


def per_group(group: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Boolean mask keeping at most ``n`` rows per group id, chosen by a seeded random priority
    that depends only on the row order (identical on every rank, any world size)."""
    priority = np.random.default_rng(seed).random(len(group))
    order = np.lexsort((priority, group))
    sorted_group = group[order]
    starts = np.r_[0, np.flatnonzero(sorted_group[1:] != sorted_group[:-1]) + 1]
    rank_in_group = np.arange(len(group)) - np.repeat(starts, np.diff(np.r_[starts, len(group)]))
    keep = np.zeros(len(group), dtype=bool)
    keep[order[rank_in_group < n]] = True
    return keep


def select(rows: Rows, where: Callable[[int], str], *, patients: set[str] | None,
           per_patient_therapy: int | None, seed: int) -> tuple[np.ndarray, dict[str, int]]:
    """(indices of the kept rows, counts): ``kept`` / ``truncated`` / ``dropped_*`` by the length
    cap (among the listed patients), ``not_selected`` by ``per_patient_therapy``, ``samples``.
    ``patients`` are keyed hashes; ``where(i)`` names row i (file:line) in errors."""
    refuse_duplicates(rows.digest, where)
    if patients is not None or per_patient_therapy is not None:
        missing = np.flatnonzero(rows.patient == "")
        if len(missing):
            feature = "patient_ids" if patients is not None else "splits_per_patient_therapy"
            raise ValueError(f"{where(missing[0])}: field 'meta.patientid' is missing; it is needed by {feature}")
    keep = np.ones(len(rows), dtype=bool)
    if patients is not None:
        keep &= np.isin(rows.patient, list(patients))
    counts = Counter({s.name.lower(): int(n)
                      for s, n in zip(Status, np.bincount(rows.status[keep], minlength=len(Status)))})
    keep &= rows.status < Status.DROPPED_HEADER_CUT
    if per_patient_therapy is not None:
        _, group = np.unique(np.char.add(np.char.add(rows.patient, "|"), rows.lot), return_inverse=True)
        group = np.where(keep, group, -1)  # excluded rows compete in a group of their own
        selected = per_group(group, per_patient_therapy, seed) & keep
        counts["not_selected"] = int(keep.sum() - selected.sum())
        keep = selected
    kept = np.flatnonzero(keep)
    counts["samples"] = len(kept)
    if no_id := int((rows.patient[kept] == "").sum()):  # their patient overlap cannot be checked
        counts["no_patient_id"] = no_id
    return kept, dict(counts)

"""The dataset's selection step as a pure function of the index rows."""

import numpy as np
import pytest

from gdt_tune.data.layout import Status
from gdt_tune.datasets.selection import Rows, per_group, select


def rows(patients, lots=None, status=None, digest=None):
    n = len(patients)
    return Rows(file=np.zeros(n, np.int32), offset=np.arange(n, dtype=np.int64) * 100,
                length=np.full(n, 100, np.int32), line=np.arange(1, n + 1, dtype=np.int32),
                status=np.asarray(status or [0] * n, np.int8), tokens=np.full(n, 50, np.int32),
                digest=np.asarray(digest or range(n), np.int64),
                patient=np.asarray(patients), lot=np.asarray(lots or [""] * n))


def where(i):
    return f"d.jsonl:{i + 1}"


def test_keeps_everything_and_counts_the_cap():
    r = rows(["a", "b", "c", "d"], status=[Status.KEPT, Status.TRUNCATED, Status.DROPPED_HEADER_CUT, Status.KEPT])
    kept, counts = select(r, where, patients=None, per_patient_therapy=None, seed=0)
    assert kept.tolist() == [0, 1, 3]
    assert counts == {"kept": 2, "truncated": 1, "history_trimmed": 0, "dropped_header_cut": 1,
                      "dropped_too_long": 0, "samples": 3}


def test_duplicates_are_refused_naming_both_lines():
    with pytest.raises(ValueError, match=r"^d\.jsonl:3: same instruction and answer as d\.jsonl:1; remove duplicate "
                                         r"samples \(1 found\)$"):
        select(rows(["a", "b", "a"], digest=[7, 8, 7]), where, patients=None, per_patient_therapy=None, seed=0)


def test_patient_filter_and_its_missing_ids():
    kept, counts = select(rows(["a", "b", "a", "c"]), where, patients={"a", "c"}, per_patient_therapy=None, seed=0)
    assert kept.tolist() == [0, 2, 3] and counts["samples"] == 3 and counts["kept"] == 3
    with pytest.raises(ValueError, match=r"^d\.jsonl:2: field 'meta.patientid' is missing; it is needed by patient_ids$"):
        select(rows(["a", "", "c"]), where, patients={"a"}, per_patient_therapy=None, seed=0)


def test_at_most_n_per_patient_and_line_of_therapy_chosen_by_seed():
    patients = ["a"] * 5 + ["b"] * 3 + ["a"] * 2
    lots = ["L1"] * 5 + ["L1"] * 3 + ["L2"] * 2
    r = rows(patients, lots, status=[0] * 9 + [Status.DROPPED_TOO_LONG])
    kept, counts = select(r, where, patients=None, per_patient_therapy=2, seed=3)
    groups = [(patients[i], lots[i]) for i in kept]
    assert sorted(groups) == [("a", "L1"), ("a", "L1"), ("a", "L2"), ("b", "L1"), ("b", "L1")]
    assert counts["not_selected"] == 4 and counts["dropped_too_long"] == 1 and counts["samples"] == 5
    again, _ = select(r, where, patients=None, per_patient_therapy=2, seed=3)
    other, _ = select(r, where, patients=None, per_patient_therapy=2, seed=4)
    assert again.tolist() == kept.tolist() and other.tolist() != kept.tolist()


def test_per_group_mask_does_not_depend_on_group_numbering():
    group = np.array([0, 0, 0, 1, 1, 2])
    renamed = np.array([5, 5, 5, 0, 0, 9])
    assert per_group(group, 1, seed=1).tolist() == per_group(renamed, 1, seed=1).tolist()
    assert per_group(group, 2, seed=1).sum() == 5

import hashlib
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from gdt_tune.data.answers import parse_answer
from gdt_tune.data.synthetic import generate_cohort, write_cohort
from gdt_tune.data.text import EVENT, FORECASTING, FORECASTING_QA

TYPE_OF_META = {"forecasting:": FORECASTING, "forecasting QA:": FORECASTING_QA, "time to event prediction:": EVENT}


@pytest.fixture(scope="module")
def cohort():
    return list(generate_cohort(40, seed=7, splits_per_lot=3))


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.jsonl")):
        h.update(p.relative_to(root).as_posix().encode() + p.read_bytes())
    return h.hexdigest()


def test_cli_writes_split_folders_deterministically(tmp_path):
    for out in ("a", "b"):
        subprocess.run([sys.executable, "-m", "gdt_tune.data.synthetic", "--patients", "12", "--out",
                        str(tmp_path / out), "--seed", "3", "--splits-per-lot", "2"], check=True)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    for split in ("train", "validation", "test"):
        files = list((tmp_path / "a" / split).glob("*.jsonl"))
        assert files, split
        rows = [json.loads(line) for f in files for line in f.open()]
        assert rows and all(r["meta"]["split"] == split for r in rows)
    write_cohort(tmp_path / "c", 12, seed=4, splits_per_lot=2)
    assert _digest(tmp_path / "c") != _digest(tmp_path / "a")


def test_split_by_patient_and_draws_per_lot(cohort):
    split_of, per_patient = {}, Counter()
    for split, s in cohort:
        pid = s["meta"]["patientid"]
        assert split_of.setdefault(pid, split) == split == s["meta"]["split"], "patient in two splits"
        assert len({t["lot_date"] for t in s["meta"]["target_meta"] if "lot_date" in t}) <= 1
        per_patient[pid] += 1
    assert set(split_of.values()) == {"train", "validation", "test"}
    # 1-3 lines of therapy: validation/test draw 1 split date per LoT, train 3 (splits_per_lot)
    for pid, n in per_patient.items():
        assert (n % 3 == 0 and n <= 9) if split_of[pid] == "train" else 1 <= n <= 3


def test_task_mix_and_answer_strings(cohort):
    n_event_only = 0
    for _, s in cohort:
        types = [t["task_type"] for t in s["meta"]["target_meta"]]
        assert types and types.count("forecasting:") <= 1 and types.count("forecasting QA:") <= 1
        assert types.count("time to event prediction:") <= 4
        n_event_only += set(types) == {"time to event prediction:"}
        for i, t in enumerate(s["meta"]["target_meta"], start=1):
            assert f"Task {i} is {TYPE_OF_META[t['task_type']]}:\n" in s["instruction"]
            assert f"Task {i} is {TYPE_OF_META[t['task_type']]}:\n" in s["answer"]
            if t["task_type"] == "time to event prediction:":
                outcome = ("was censored and did not occur." if t["censoring"] else
                           "was not censored and occurred." if t["occurred"] else
                           "was not censored and did not occur.")
                assert f"Here is the prediction: the event ({t['target_name']}) {outcome}" in s["answer"]
    assert 0.2 < n_event_only / len(cohort) < 0.9


def test_parse_answer_gives_back_the_drawn_targets(cohort):
    """Property: for every generated sample the parser returns exactly the generator's targets."""
    for _, s in cohort:
        tasks = parse_answer(s["answer"])
        metas = s["meta"]["target_meta"]
        assert [t.number for t in tasks] == list(range(1, len(metas) + 1))
        for task, meta in zip(tasks, metas):
            assert task.type == TYPE_OF_META[meta["task_type"]]
            if task.type == EVENT:
                assert (task.event, task.censored, task.occurred) == (
                    meta["target_name"], meta["censoring"], meta["occurred"])
            else:
                assert task.visits == _visits_of(meta, s["meta"]["split_date_included_in_input"])


def _visits_of(meta: dict, split: str) -> list:
    """A forecasting task's target visits rebuilt from its target_meta alone (the converter's
    ``target_data_processed`` table): (weeks since the previous visit, {variable: value})."""
    import datetime as dt

    table = json.loads(meta["target_data_processed"])
    assert table["columns"] == ["date", "event_name", "event_value"]
    by_date: dict = {}
    for date, name, value in table["data"]:
        by_date.setdefault(date, {})[name] = value
    assert list(by_date) == meta["dates_to_forecast"]
    visits, prev = [], dt.date.fromisoformat(split)
    for date, values in by_date.items():
        d = dt.date.fromisoformat(date)
        visits.append((round((d - prev).days / 7, 2), values))
        prev = d
    return visits


def test_event_fields_are_the_converters(cohort):
    """Every event task carries the converter's fields, consistent with its answer and prompt."""
    import datetime as dt

    from gdt_tune.data.text import EVENT_CATEGORIES, event_horizons

    seen = Counter()
    for _, s in cohort:
        horizons = event_horizons(s["instruction"])
        split = dt.date.fromisoformat(s["meta"]["split_date_included_in_input"])
        for number, t in enumerate(s["meta"]["target_meta"], start=1):
            if t["task_type"] != "time to event prediction:":
                continue
            name, weeks = horizons[number]
            assert name == t["target_name"] and t["target_category"] == EVENT_CATEGORIES[name]
            assert t["target_string"] in s["answer"]
            when = dt.date.fromisoformat(t["date_event_occured"])
            assert t["delta_time_numeric"] == round((when - split).days / 7, 2)
            if t["occurred"]:
                assert 0 < t["delta_time_numeric"] <= weeks and not t["censoring"]
            if t["censoring"]:
                assert t["delta_time_numeric"] < weeks and not t["occurred"]
            seen[(t["censoring"], t["occurred"])] += 1
    assert len(seen) == 3, seen  # all three outcomes occur


def test_landmark_weeks(tmp_path, capsys):
    """``--event-weeks``: a landmark test set as GDT's (every event task at one of the weeks)."""
    from gdt_tune.data.synthetic import main
    from gdt_tune.data.text import event_horizons

    main(["--patients", "8", "--out", str(tmp_path), "--seed", "5", "--event-weeks", "8,26,52,104"])
    weeks = [w for f in tmp_path.rglob("*.jsonl") for line in f.open()
             for _, w in event_horizons(json.loads(line)["instruction"]).values()]
    assert weeks and set(weeks) <= {8, 26, 52, 104} and len(set(weeks)) > 1
    with pytest.raises(SystemExit) as exit_info:
        main(["--patients", "8", "--out", str(tmp_path), "--event-weeks", "8,x"])
    assert exit_info.value.code == 2 and "expected whole weeks separated by commas" in capsys.readouterr().err

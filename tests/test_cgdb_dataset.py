"""cgdb_instruct_dataset: inputs, errors, per-(patient, LoT) sampling, patient filters, caching."""

import json
import logging
import os
import re
from pathlib import Path

import numpy as np
import pytest

import gdt_tune.data.records as records
import gdt_tune.datasets._index as index_mod
from gdt_tune.data.layout import DEFAULT_SYSTEM_PROMPT, Layout, apply_cap
from gdt_tune.datasets import cgdb_instruct_dataset

ANSWER = "Task 1 is time to event prediction:\nHere is the prediction: the event (death) was censored and did not occur.\n"


def row(i, patient=None, lot=None, history_lot_ms=None, split="2020-03-01"):
    meta = {}
    if patient is not None:
        meta = {"patientid": patient, "split_date_included_in_input": split, "target_meta": []}
        if lot is not None:
            meta["target_meta"] = [{"task_type": "forecasting", "lot_date": lot}]
        else:
            meta["target_meta"] = [{"task_type": "events", "target_name": "death"}]
        rows = [[patient, ms, "lot", "line of therapy", "1"] for ms in (history_lot_ms or [])]
        meta["history_data"] = json.dumps({"columns": ["patientid", "date", "event_category", "event_name",
                                                       "event_value"], "index": list(range(len(rows))), "data": rows})
        meta["extra_field"] = {"anything": [1, 2, 3]}
    return {"instruction": f"Patient history number {i}.\n\tECOG is {i % 4}.", "answer": ANSWER, "meta": meta}


def write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_items_match_layout_and_all_input_forms(tmp_path, tokenizer):
    a = write(tmp_path / "d" / "a.jsonl", [{"instruction": "hi", "answer": "yo"}, row(1)])
    b = write(tmp_path / "d" / "b.jsonl", [row(2)])
    layout = Layout.build(tokenizer, DEFAULT_SYSTEM_PROMPT)
    expected = [apply_cap(layout, r["instruction"], r["answer"], 8000, "gdt")[:2]
                for r in ({"instruction": "hi", "answer": "yo"}, row(1), row(2))]
    for spec in (tmp_path / "d", str(tmp_path / "d" / "*.jsonl"), [str(a), str(b)]):
        ds = cgdb_instruct_dataset(tokenizer, data_files=spec)
        assert len(ds) == 3
        assert [(ds[i]["tokens"], ds[i]["labels"]) for i in range(3)] == expected
    ds = cgdb_instruct_dataset(tokenizer, data_files=str(b))
    assert len(ds) == 1 and ds.counts["kept"] == 1


def test_demo_cohort_loads_unchanged(demo_dir, tokenizer):
    ds = cgdb_instruct_dataset(tokenizer, data_files=demo_dir / "data" / "train", max_seq_len=2048,
                               splits_per_patient_therapy=2, seed=1)
    assert len(ds) > 50
    for i in range(len(ds)):
        item = ds[i]
        assert len(item["tokens"]) == len(item["labels"]) <= 2048


@pytest.mark.parametrize("content, expected", [
    (b'{"instruction": "a", "answer": "b"}\n{"instruction": "a", \n', ":2: invalid JSON"),
    (b'{"instruction": "a", "answer": "b"}\n\xff\xfe\n', ":2: not valid UTF-8"),
    (b'{"answer": "b"}\n', ":1: field 'instruction' is missing"),
    (b'{"instruction": "a", "answer": 3}\n', ":1: field 'answer' is a int"),
    (b'{"instruction": "  ", "answer": "b"}\n', ":1: field 'instruction' is empty"),
    (b'{"instruction": "a", "answer": "b"}\n\n{"instruction": "a", "answer": "b"}\n', ":2: empty line"),
    (b'["instruction", "answer"]\n', ":1: expected a JSON object"),
])
def test_malformed_lines_name_file_line_and_field(tmp_path, tokenizer, content, expected):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=str(path) + expected.replace("(", r"\(")):
        cgdb_instruct_dataset(tokenizer, data_files=path)


def test_missing_files_and_bad_arguments(tmp_path, tokenizer):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no \\*.jsonl"):
        cgdb_instruct_dataset(tokenizer, data_files=tmp_path / "empty")
    with pytest.raises(ValueError, match="matches no file"):
        cgdb_instruct_dataset(tokenizer, data_files=str(tmp_path / "nope" / "*.jsonl"))
    path = write(tmp_path / "ok.jsonl", [row(1)])
    with pytest.raises(ValueError, match="dataset.truncation"):
        cgdb_instruct_dataset(tokenizer, data_files=path, truncation="tail")
    with pytest.raises(ValueError, match="dataset.splits_per_patient_therapy"):
        cgdb_instruct_dataset(tokenizer, data_files=path, splits_per_patient_therapy=0)


def test_meta_needed_only_by_features_that_use_it(tmp_path, tokenizer):
    path = write(tmp_path / "plain.jsonl", [{"instruction": "a", "answer": "b"}, {"instruction": "a", "answer": "c"}])
    assert len(cgdb_instruct_dataset(tokenizer, data_files=path)) == 2
    with pytest.raises(ValueError, match=f"{path}:1: field 'meta.target_meta' is missing"):
        cgdb_instruct_dataset(tokenizer, data_files=path, splits_per_patient_therapy=1)
    with pytest.raises(ValueError, match=f"{path}:1: field 'meta.patientid' is missing; it is needed by patient_ids"):
        cgdb_instruct_dataset(tokenizer, data_files=path, patient_ids=["x"])
    events_only = write(tmp_path / "ev.jsonl", [row(1, "p1", history_lot_ms=[])])
    with pytest.raises(ValueError, match=f"{events_only}:1: no lot_date .* no 'lot' event"):
        cgdb_instruct_dataset(tokenizer, data_files=events_only, splits_per_patient_therapy=1)


def _ms(day):  # epoch milliseconds of 2020-01-<day>
    import datetime as dt

    return int(dt.datetime(2020, 1, day, tzinfo=dt.timezone.utc).timestamp() * 1000)


def test_splits_per_patient_therapy(tmp_path, tokenizer):
    rows = ([row(i, "p1", lot="2020-01-05") for i in range(5)]
            # event-only rows: LoT from the latest lot event on or before the split date (epoch ms)
            + [row(10 + i, "p1", history_lot_ms=[_ms(5), _ms(20)], split="2020-01-10") for i in range(3)]
            + [row(20 + i, "p1", lot="2020-01-20") for i in range(4)]
            + [row(30, "p2", lot="2020-01-05")])
    one = write(tmp_path / "one" / "all.jsonl", rows)
    write(tmp_path / "two" / "a.jsonl", rows[:6])
    write(tmp_path / "two" / "b.jsonl", rows[6:])

    def texts(ds):
        return sorted(tuple(ds[i]["tokens"]) for i in range(len(ds)))

    ds = cgdb_instruct_dataset(tokenizer, data_files=one, splits_per_patient_therapy=2, seed=3)
    # groups: (p1, 01-05) has 5 + 3 event-only rows, (p1, 01-20) has 4, (p2, 01-05) has 1
    assert len(ds) == 2 + 2 + 1 and ds.counts["not_selected"] == 8
    again = cgdb_instruct_dataset(tokenizer, data_files=one, splits_per_patient_therapy=2, seed=3)
    assert texts(again) == texts(ds)
    sharded = cgdb_instruct_dataset(tokenizer, data_files=tmp_path / "two", splits_per_patient_therapy=2, seed=3)
    assert texts(sharded) == texts(ds)
    seeds = {tuple(texts(cgdb_instruct_dataset(tokenizer, data_files=one, splits_per_patient_therapy=2, seed=s)))
             for s in range(6)}
    assert len(seeds) > 1


def _hashed(*ids):
    from gdt_tune.datasets._index import id_key, keyed_hash

    key = id_key(Path(os.environ["GDT_TUNE_CACHE_DIR"]))
    return {keyed_hash(key, i) for i in ids}


def test_patient_ids_list_or_file(tmp_path, tokenizer):
    path = write(tmp_path / "d.jsonl", [row(1, "p1", lot="2020-01-01"), row(2, "p2", lot="2020-01-01"),
                                        row(3, "p3", lot="2020-01-01")])
    ds = cgdb_instruct_dataset(tokenizer, data_files=path, patient_ids=["p1", "p3"])
    assert len(ds) == 2 and ds.patient_ids() == _hashed("p1", "p3")
    ids = tmp_path / "ids.txt"
    ids.write_text("p2\n\n")
    assert cgdb_instruct_dataset(tokenizer, data_files=path, patient_ids=str(ids)).patient_ids() == _hashed("p2")


def test_index_cache_holds_keyed_hashes_not_ids(tmp_path, tokenizer):
    """The cache stores HMACs of patient ids and LoT dates under a per-folder random key (mode
    600); the same folder gives the same hashes (so train and validation compare), another folder
    other ones."""
    path = write(tmp_path / "d.jsonl", [row(1, "patient-A17", lot="2020-01-05"), row(2, "patient-B23", lot="2020-01-20")])
    ds = cgdb_instruct_dataset(tokenizer, data_files=path, splits_per_patient_therapy=1)
    cache = Path(os.environ["GDT_TUNE_CACHE_DIR"])
    files = [p for p in cache.iterdir() if p.is_file()]
    assert any(p.suffix == ".npz" for p in files) and (cache / "hash.key").stat().st_mode & 0o777 == 0o600
    for p in files:
        data = p.read_bytes()
        for secret in ("patient-A17", "patient-B23", "2020-01-05", "2020-01-20"):
            assert secret.encode() not in data and secret.encode("utf-32-le") not in data, (p.name, secret)
    assert ds.patient_ids() == _hashed("patient-A17", "patient-B23")
    same = cgdb_instruct_dataset(tokenizer, data_files=path)
    other = cgdb_instruct_dataset(tokenizer, data_files=path, cache_dir=str(tmp_path / "other-cache"))
    assert same.id_key_fingerprint == ds.id_key_fingerprint != other.id_key_fingerprint
    assert same.patient_ids() == ds.patient_ids() and not (other.patient_ids() & ds.patient_ids())


def test_index_is_cached_and_refreshed_when_a_file_changes(tmp_path, tokenizer, monkeypatch):
    path = write(tmp_path / "d.jsonl", [row(1), row(2)])
    first = cgdb_instruct_dataset(tokenizer, data_files=path)

    def no_scan(*args, **kwargs):
        raise AssertionError("scanned again")

    with monkeypatch.context() as m:
        m.setattr(index_mod, "scan_chunk", no_scan)
        again = cgdb_instruct_dataset(tokenizer, data_files=path)
        assert [again[i] for i in range(2)] == [first[i] for i in range(2)]
        write(path, [row(1), row(2), row(3)])
        with pytest.raises(AssertionError, match="scanned again"):
            cgdb_instruct_dataset(tokenizer, data_files=path)
    assert len(cgdb_instruct_dataset(tokenizer, data_files=path)) == 3
    # another max_seq_len is another index
    assert cgdb_instruct_dataset(tokenizer, data_files=path, max_seq_len=60, truncation="drop").counts["dropped_too_long"] == 3


def test_file_changed_after_indexing_is_an_error(tmp_path, tokenizer):
    path = write(tmp_path / "d.jsonl", [row(1), row(2)])
    ds = cgdb_instruct_dataset(tokenizer, data_files=path)
    assert ds[1]["tokens"]
    write(path, [row(1), row(13)])  # another size: mtime alone can be too coarse
    with pytest.raises(ValueError, match=f"{path}:1: the file changed after it was indexed; restart"):
        ds[0]


def test_logs_counts_and_gdt_prompt_but_no_text(tmp_path, tokenizer, caplog, monkeypatch):
    import gdt_tune.datasets.cgdb_instruct as mod
    from gdt_tune.data.layout import system_prompt_sha256

    prompt = "Pretend this is the original GDT prompt."
    monkeypatch.setattr(mod, "GDT_SYSTEM_PROMPT_SHA256", system_prompt_sha256(prompt))
    path = write(tmp_path / "d.jsonl", [row(1), row(2)])
    with caplog.at_level(logging.INFO, logger="gdt_tune"):
        ds = cgdb_instruct_dataset(tokenizer, data_files=path, system_prompt=prompt, max_seq_len=70, truncation="gdt")
    assert "original GDT system prompt" in caplog.text
    assert f"cgdb_instruct: {len(ds)} samples from 1 files" in caplog.text
    assert f"truncated {ds.counts['truncated']}" in caplog.text
    assert "Patient history" not in caplog.text and "Here is the prediction" not in caplog.text


def test_unwritable_cache_dir_is_a_clear_error(tmp_path, tokenizer):
    path = write(tmp_path / "d.jsonl", [row(1)])
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the cache folder should be")
    with pytest.raises(ValueError, match="dataset.cache_dir: cannot write the index cache in .*blocker"):
        cgdb_instruct_dataset(tokenizer, data_files=path, cache_dir=str(blocker / "cache"))


def test_parallel_chunked_index_equals_one_pass(tmp_path, tokenizer, monkeypatch):
    rows = [row(i, f"p{i % 7}", lot=f"2020-0{1 + i % 3}-01") for i in range(60)]
    path = write(tmp_path / "d.jsonl", rows)
    one = cgdb_instruct_dataset(tokenizer, data_files=path, splits_per_patient_therapy=2, cache_dir=tmp_path / "c1")
    monkeypatch.setattr(records, "CHUNK_BYTES", 700)  # about 3 lines a chunk
    assert len(records.chunks_of(path, 700)) > 10
    many = cgdb_instruct_dataset(tokenizer, data_files=path, splits_per_patient_therapy=2, index_workers=2,
                                 cache_dir=tmp_path / "c2")
    assert len(many) == len(one) == 7 * 3 * 2
    assert [many[i] for i in range(len(many))] == [one[i] for i in range(len(one))]
    assert [many.where(i) for i in range(len(many))] == [one.where(i) for i in range(len(one))]
    # an error in a later chunk names the line in the file, from a worker process
    text = path.read_text().splitlines(keepends=True)
    text[47] = '{"instruction": "x", "answer": 3}\n'
    path.write_text("".join(text))
    with pytest.raises(ValueError, match=r"d\.jsonl:48: field 'answer' is a int"):
        cgdb_instruct_dataset(tokenizer, data_files=path, index_workers=2, cache_dir=tmp_path / "c3")


def _edit_keeping_size_and_mtime(path, old, new):
    stat = path.stat()
    text = path.read_text()
    head, found, tail = text.rpartition(old)  # the last occurrence
    assert len(old) == len(new) and found
    path.write_text(head + new + tail)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns


def test_index_notices_a_same_size_edit_with_the_modification_time_kept(tmp_path, tokenizer):
    """cp -p / rsync -t keep size and mtime: the content digest still sees the edit, so the
    patient overlap check does not run on a stale index."""
    path = write(tmp_path / "d.jsonl", [row(i, f"p{i}") for i in range(1, 6)])
    before = cgdb_instruct_dataset(tokenizer, data_files=path)
    _edit_keeping_size_and_mtime(path, '"patientid": "p3"', '"patientid": "q3"')
    after = cgdb_instruct_dataset(tokenizer, data_files=path)
    assert len(before.patient_ids() - after.patient_ids()) == 1 and len(after.patient_ids()) == 5


def test_an_edit_anywhere_in_a_file_of_any_size_is_seen_without_reading_it(tmp_path, tokenizer, monkeypatch, caplog):
    """Size and modification time kept, the edit in the middle of the file: the inode's change time
    differs, so the index is rebuilt (no sampled blocks: the stamp is one stat call)."""
    path = write(tmp_path / "d.jsonl", [row(i, f"p{i}") for i in range(1, 8)])
    before = cgdb_instruct_dataset(tokenizer, data_files=path)
    _edit_keeping_size_and_mtime(path, '"patientid": "p4"', '"patientid": "q4"')
    with caplog.at_level(logging.WARNING, logger="gdt_tune"):
        after = cgdb_instruct_dataset(tokenizer, data_files=path)
    assert f"{path}: changed since it was indexed" in caplog.text
    assert len(before.patient_ids() - after.patient_ids()) == 1


def test_a_file_reached_twice_is_refused_and_writes_no_index(tmp_path, tokenizer):
    folder = tmp_path / "train"
    path = write(folder / "d.jsonl", [row(1), row(2)])
    cache = Path(os.environ["GDT_TUNE_CACHE_DIR"])
    other = folder / ".." / "train" / "d.jsonl"  # the same file, spelled another way
    for spec, words in (([path, path], f"the file {path} is listed twice"),
                        ([folder, other], f"the file {other} is reached twice (through {folder} and {other})")):
        with pytest.raises(ValueError, match=re.escape(f"dataset.data_files: {words}; give each file once")):
            cgdb_instruct_dataset(tokenizer, data_files=spec)
    assert not list(cache.glob("*.npz"))
    assert len(cgdb_instruct_dataset(tokenizer, data_files=path)) == 2


def test_a_cache_entry_that_does_not_fit_its_file_is_rebuilt(tmp_path, tokenizer, caplog):
    """An index with every row twice (what main 3303921 cached for data_files=[F, F]) under the
    file's current stamp is not trusted."""
    from gdt_tune.datasets._index import FileIndex

    path = write(tmp_path / "d.jsonl", [row(1), row(2), row(3)])
    cgdb_instruct_dataset(tokenizer, data_files=path)
    [entry] = Path(os.environ["GDT_TUNE_CACHE_DIR"]).glob("*.npz")
    index, stamp = FileIndex.load(entry)
    doubled = FileIndex(**{k: (np.concatenate([v, v]) if k not in ("patients", "lots") else v)
                           for k, v in vars(index).items()})
    np.savez(entry, stamp=np.asarray(stamp), **vars(doubled))
    with caplog.at_level(logging.WARNING, logger="gdt_tune"):
        ds = cgdb_instruct_dataset(tokenizer, data_files=path)
    assert len(ds) == 3 and f"{path}: changed since it was indexed" in caplog.text
    entry.write_bytes(b"not an npz")  # a damaged entry: rebuilt too
    assert len(cgdb_instruct_dataset(tokenizer, data_files=path)) == 3


def test_data_folder_entries_that_are_not_files_or_not_read_are_one_line(tmp_path, tokenizer):
    folder = tmp_path / "train"
    write(folder / "a.jsonl", [row(1)])
    (folder / "x.jsonl").mkdir()
    with pytest.raises(ValueError, match=re.escape(f"dataset.data_files: {folder / 'x.jsonl'} is a folder; remove it")):
        cgdb_instruct_dataset(tokenizer, data_files=folder)
    (folder / "x.jsonl").rmdir()
    (folder / "gone.jsonl").symlink_to(tmp_path / "nowhere.jsonl")
    with pytest.raises(ValueError, match=re.escape(f"{folder / 'gone.jsonl'} is a broken link; remove it")):
        cgdb_instruct_dataset(tokenizer, data_files=folder)
    (folder / "gone.jsonl").unlink()
    write(folder / "more" / "b.jsonl", [row(2)])
    with pytest.raises(ValueError, match=re.escape(f"directory {folder} also has .jsonl files in subfolders "
                                                   f"({folder / 'more' / 'b.jsonl'}), which would not be read")):
        cgdb_instruct_dataset(tokenizer, data_files=folder)
    assert len(cgdb_instruct_dataset(tokenizer, data_files=str(folder / "*.jsonl"))) == 1


def test_resume_contract_sees_a_same_size_same_mtime_edit_and_lets_a_touch_pass(tmp_path, tokenizer):
    """The contract identifies the data by the index's content digests, not by timestamps: an edit
    that keeps size and mtime is refused naming the file; a touch (or a copy) of the same text resumes."""
    from gdt_tune.training.resume import compare, run_contract

    def contract(files):
        ds = cgdb_instruct_dataset(tokenizer, data_files=files)
        return run_contract(seed=1, shuffle=True, dataset=ds, settings=ds.settings, world_size=1, accumulation=1,
                            batch_size=1, lr=1e-5, save_every=2, schedule=None)

    a = write(tmp_path / "d" / "a.jsonl", [row(i, f"p{i}") for i in range(1, 6)])
    b = write(tmp_path / "d" / "b.jsonl", [row(i, f"p{i}") for i in range(6, 9)])
    saved = contract(tmp_path / "d")
    assert set(saved["data_files"]) == {"a.jsonl", "b.jsonl"} and saved["data_files"]["b.jsonl"]["samples"] == 3
    os.utime(a, ns=(1, 1))  # a touch: other timestamps, the same text
    assert compare(saved, contract(tmp_path / "d"), "step_2") == []
    _edit_keeping_size_and_mtime(b, "history number 7.", "history number 9.")
    with pytest.raises(ValueError, match=r"^resume: the training data changed since step_2 was written \(b\.jsonl: "
                                         r"content changed \(same size and samples\)\); restore the data"):
        compare(saved, contract(tmp_path / "d"), "step_2")

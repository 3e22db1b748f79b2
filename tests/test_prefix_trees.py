"""Which samples share a trie (``share_prefixes``): a patient's samples together, in trie order, cut
where a trie would not fit a row, each part's size an upper bound of what the row lays out; and
``gdt-tune data-report`` prints the sharing that training logs. (Exactness of the trie rows:
tests/test_batches.py; a run end to end: tests/test_packing.py.)"""

import numpy as np
from recipe_utils import logged, train_in_process

from gdt_tune.training.batches import IGNORE, collate
from gdt_tune.training.prefix_trees import compute, sharing_line


class Patients:
    """A dataset as the pass reads it: samples of three patients whose instructions share a history."""

    def __init__(self):
        rng = np.random.default_rng(0)
        self.samples, self.patients = [], []
        for patient in range(3):
            history = rng.integers(0, 900, 300).tolist()
            for split in range(4):
                instruction = history[: 120 + 50 * split] + rng.integers(0, 900, 20).tolist()
                answer = rng.integers(0, 900, 30).tolist()
                tokens = instruction + answer
                self.samples.append({"tokens": tokens, "labels": [IGNORE] * len(instruction) + answer})
                self.patients.append(patient)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return self.samples[i]

    def patient_groups(self):
        return np.asarray(self.patients)

    def lengths(self):
        return np.asarray([len(s["tokens"]) for s in self.samples])


def test_a_patients_samples_form_tries_that_fit_a_row():
    ds = Patients()
    trees = compute(ds, workers=1, show_progress=False)
    order = np.random.default_rng(1).permutation(len(ds))
    docs = trees.documents(order, capacity=400)  # a patient's trie (about 470 tokens) is cut
    # every sample once; a trie holds one patient's samples, in the order of the patients' first samples
    assert sorted(i for d, _ in docs for i in d) == list(range(len(ds)))
    assert all(len({ds.patients[i] for i in d}) == 1 for d, _ in docs)
    firsts = list(dict.fromkeys(ds.patients[i] for i in order))
    assert [ds.patients[d[0]] for d, _ in docs] == sorted([ds.patients[d[0]] for d, _ in docs], key=firsts.index)
    # each within the row, and what a row lays out is at most the planned size
    assert all(size <= 400 for _, size in docs) and len(docs) >= 6
    for samples, size in docs:
        laid_out = collate([[[ds[i] for i in samples]]], pad_id=1000)
        assert laid_out.real_tokens <= size
        assert laid_out.real_tokens == size  # no labelled node had to be copied here
    tree, separate = trees.sharing(10**9)
    assert separate == sum(ds.lengths()) and separate / tree > 2.0  # one trie per patient


def test_data_report_prints_the_sharing_that_training_logs(demo_dir, tmp_path, capsys):
    """One epoch of a slice of the demo cohort (its first patients), in rows of 4096 tokens."""
    from gdt_tune.cli.main import main

    data = tmp_path / "data" / "train"
    data.mkdir(parents=True)
    lines = (demo_dir / "data" / "train" / "part-00000.jsonl").read_text().splitlines(keepends=True)
    (data / "part-00000.jsonl").write_text("".join(lines[:20]))
    assert main(["data-report", "--data", str(data), "--tokenizer", str(demo_dir / "model" / "tokenizer.model"),
                 "--max-seq-len", "4096", "--out", str(tmp_path / "report")]) == 0
    reported = next(line for line in capsys.readouterr().out.splitlines() if "prefix sharing:" in line)
    recipe = train_in_process(demo_dir, tmp_path / "run", f"dataset.data_files={data}", "packing=true",
                              "share_prefixes=true", "model.max_seq_len=4096", "dataset.max_seq_len=4096",
                              "max_steps_per_epoch=null", "dataset_val=null", "run_val_every_n_steps=null",
                              "val_metrics_samples=0", "save_every_n_steps=null")
    p = recipe._progress
    assert sharing_line(p.tokens_seen, p.sample_tokens_seen) in reported
    assert p.sample_tokens_seen == sum(len(recipe._train_ds[i]["tokens"]) for i in range(len(recipe._train_ds)))
    ratio = logged(tmp_path / "run", "prefix_sharing")
    assert ratio[max(ratio)] == p.sample_tokens_seen / p.tokens_seen > 1.1

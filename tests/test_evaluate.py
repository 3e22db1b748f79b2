"""`gdt-tune evaluate` and `gdt-tune data-report`: event scoring picks what a forced model
favours; both commands run end to end on the demo artefacts."""

import json
from pathlib import Path

import pytest
import torch
from recipe_utils import REPO, run_recipe

from gdt_tune.clinical.event_scoring import event_candidates
from gdt_tune.clinical.metrics import softmax
from gdt_tune.data.layout import DEFAULT_SYSTEM_PROMPT, Layout
from gdt_tune.datasets import cgdb_instruct_dataset
from gdt_tune.eval.evaluate import read_samples
from gdt_tune.eval.reference import score_sequences
from gdt_tune.runtime.errors import OneLineError


class Favours(torch.nn.Module):
    """A stub language model: wherever the input so far is a prefix of ``target``, it predicts
    the next token of ``target`` with near certainty; elsewhere it is uniform."""

    def __init__(self, target, vocab):
        super().__init__()
        self.target, self.vocab = target, vocab

    def forward(self, tokens):
        logits = torch.zeros(*tokens.shape, self.vocab)
        for b, row in enumerate(tokens.tolist()):
            for i in range(min(len(row), len(self.target) - 1)):
                if row[: i + 1] != self.target[: i + 1]:
                    break
                logits[b, i, self.target[i + 1]] = 20.0
        return logits


@pytest.mark.parametrize("favoured", range(3))
def test_event_scoring_picks_the_favoured_completion(demo_dir, tokenizer, favoured):
    layout = Layout.build(tokenizer, DEFAULT_SYSTEM_PROMPT)
    record = next(r for _, r in read_samples(demo_dir / "data" / "test", None) if "time to event" in r["answer"])
    tasks = event_candidates(layout, record)
    assert tasks and all(len(t["candidates"]) == 3 for t in tasks)
    first = tasks[0]
    # the truth's tokens are exactly the training layout's up to the end of the outcome
    full = layout.prompt_tokens(record["instruction"]) + layout.answer_tokens(record["answer"])
    truth = first["context"] + first["candidates"][first["truth"]]
    assert full[: len(truth)] == truth
    model = Favours(first["context"] + first["candidates"][favoured], vocab=1024)
    scores = score_sequences(model, [(first["context"], c) for c in first["candidates"]], tokenizer.pad_id,
                             torch.device("cpu"), batch_size=2)
    probs = softmax(scores)
    assert max(range(3), key=probs.__getitem__) == favoured and probs[favoured] > 0.9
    assert scores[favoured] == pytest.approx(0.0, abs=1e-3)


def _cli(*args):
    """``gdt-tune ARGS`` in this process: (returncode, stdout, stderr)."""
    import contextlib
    import io
    from types import SimpleNamespace

    from gdt_tune.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(args))
    return SimpleNamespace(returncode=rc, stdout=out.getvalue(), stderr=err.getvalue())


def test_evaluate_final_and_interim_checkpoints_of_a_demo_run(demo_dir, tmp_path):
    run_recipe(demo_dir, tmp_path / "run", "max_steps_per_epoch=4", "save_every_n_steps=4", "dataset_val=null",
               "run_val_every_n_steps=null")
    common = ["--data", str(demo_dir / "data" / "test"), "--max-samples", "6", "--samples", "1"]
    final = _cli("evaluate", "--checkpoint", str(tmp_path / "run" / "epoch_0"), "--out", str(tmp_path / "final"),
                 "--train-data", str(demo_dir / "data" / "train"), *common)
    assert final.returncode == 0, final.stderr[-3000:]
    assert "events:" in final.stdout and "majority baseline" in final.stdout
    interim = _cli("evaluate", "--checkpoint", str(tmp_path / "run" / "step_4"), "--config",
                   str(REPO / "configs" / "tiny_gdt_cpu.yaml"), "--out", str(tmp_path / "interim"), *common,
                   f"demo_dir={demo_dir}")
    assert interim.returncode == 0, interim.stderr[-3000:]
    a = json.loads((tmp_path / "final" / "metrics.json").read_text())
    b = json.loads((tmp_path / "interim" / "metrics.json").read_text())
    assert a["samples"] == b["samples"] == 6
    assert a["events"]["tasks"] > 0 and a["forecasting"]["tasks"] > 0
    # step_4 is the last step: the same weights as epoch_0, so the same event metrics
    assert a["events"]["confusion"] == b["events"]["confusion"]
    for key in ("accuracy", "brier"):
        assert a["events"][key] == pytest.approx(b["events"][key], abs=1e-4)
    assert a["events"]["baseline_majority"]["accuracy"] is not None
    auroc = a["events"]["auroc"]
    assert auroc["all"]["all"]["tasks"] == sum(c["tasks"] for k, c in auroc["all"].items() if k != "all")
    assert set(auroc["all"]) == {"all", "<=13 weeks", "14-52 weeks", ">52 weeks"}
    assert "events AUROC of P(occurred), uncensored tasks:" in final.stdout
    assert a["forecasting"]["mae_copy_forward"] > 0 and 0 <= a["forecasting"]["unparseable_share"] <= 1
    for name in ("forecast_mae.png", "event_calibration.png"):
        assert (tmp_path / "final" / name).read_bytes()[:4] == b"\x89PNG"
    assert not list((tmp_path / "final").glob(".*tmp*"))  # written atomically: no temporary file left
    # GDT's metrics: metrics.json["gdt"] is exactly what predictions.jsonl gives
    from gdt_tune.clinical.gdt_metrics import event_cindex, forecast_ratios
    from gdt_tune.eval.gdt_eval import read_training

    rows = [json.loads(line) for line in (tmp_path / "final" / "predictions.jsonl").read_text().splitlines()]
    forecasts, events = [r for r in rows if r["type"] == "forecast"], [r for r in rows if r["type"] == "event"]
    assert len(events) == a["events"]["tasks"] and len(forecasts) == a["forecasting"]["targets"]
    assert set(events[0]) == {"where", "task", "type", "indication", "event", "week", "p_occurred", "p_no_occurrence",
                              "time_weeks", "occurred"}
    assert {"where", "task", "type", "indication", "variable", "week", "truth", "prediction", "filled",
            "copy_forward"} <= set(forecasts[0])
    gdt = a["gdt"]
    assert gdt["prompt"] == a["prompt"] == "training"
    ratios = forecast_ratios(forecasts)
    assert gdt["forecasting"]["median_ratio"] == ratios["median_ratio"] and gdt["forecasting"]["per_variable"] == ratios[
        "per_variable"]
    assert gdt["forecasting"]["filled"] == sum(r["filled"] for r in forecasts)
    train = read_training(demo_dir / "data" / "train", 20_000)
    again = event_cindex(events, train.event_rows)
    for key in ("cindex_ipcw", "cindex_ipcw_average", "brier_ipcw", "dropped_beyond_training_time"):
        assert gdt["events"][key] == json.loads(json.dumps(again[key])), key
    assert "cindex_ipcw_average" in gdt["events"]["baseline_rsf"]
    table = (tmp_path / "final" / "summary.md").read_text()
    assert "| metric | this model | copy-forward | majority | RSF | GDT (paper, its own data) | n |" in table
    assert "| events: IPCW C-index, mean over death, progression, next line of therapy |" in final.stdout
    # GDT's evaluation prompt on request, recorded
    gdt_prompt = _cli("evaluate", "--checkpoint", str(tmp_path / "run" / "epoch_0"), "--out", str(tmp_path / "gdt"),
                      "--data", str(demo_dir / "data" / "test"), "--max-samples", "2", "--samples", "0",
                      "--prompt", "gdt")
    assert gdt_prompt.returncode == 0, gdt_prompt.stderr[-3000:]
    assert json.loads((tmp_path / "gdt" / "metrics.json").read_text())["gdt"]["prompt"] == "gdt"
    assert "prompt: gdt" in gdt_prompt.stdout and "no --train-data" in gdt_prompt.stdout
    # samples without an event task: no calibration plot, no empty "scoring events" bar
    lines = (demo_dir / "data" / "test" / "part-00000.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "no_events.jsonl").write_text("".join(x for x in lines if "time to event" not in json.loads(x)["answer"]))
    no_events = _cli("evaluate", "--checkpoint", str(tmp_path / "run" / "epoch_0"), "--out", str(tmp_path / "fc"),
                     "--data", str(tmp_path / "no_events.jsonl"), "--samples", "0")
    assert no_events.returncode == 0 and "scoring events" not in no_events.stderr, no_events.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "fc").iterdir()) == [".lock", "forecast_mae.png", "metrics.json",
                                                                    "predictions.jsonl", "summary.md"]
    assert (tmp_path / "fc" / ".lock").read_text() == ""  # released
    # no sample text in what it wrote or printed
    answer_line = "Here is the prediction: the event ("
    written = "".join((tmp_path / "final" / n).read_text() for n in ("metrics.json", "predictions.jsonl", "summary.md"))
    assert answer_line not in written + final.stdout + final.stderr
    assert "hemoglobin - 718-7 is" not in written and "SYN0" not in written
    # step_N without the training config: a clear error
    bad = _cli("evaluate", "--checkpoint", str(tmp_path / "run" / "step_4"), "--out", str(tmp_path / "x"), *common)
    assert bad.returncode == 1 and "pass the training --config too" in bad.stderr
    # a config of another model shape is refused for step_N and epoch_N, naming the first tensor
    from recipe_utils import load_config, load_trained

    other = load_config(f"demo_dir={demo_dir}", "model.num_layers=3", "model.embed_dim=128")
    for folder in ("step_4", "epoch_0"):
        with pytest.raises(ValueError, match=r"holds another model \((layers\.0\.attn\.k_proj\.weight|layers\.2\.)"):
            load_trained(tmp_path / "run" / folder, other, torch.device("cpu"), torch.float32)
    shallow = load_config(f"demo_dir={demo_dir}", "model.num_layers=1")  # missing layers: not silently truncated
    for folder in ("step_4", "epoch_0"):
        with pytest.raises(ValueError, match=r"holds another model \(layers\.1\.\S+: saved \(\d+"):
            load_trained(tmp_path / "run" / folder, shallow, torch.device("cpu"), torch.float32)


def test_data_report_on_the_demo_data(demo_dir, tokenizer, tmp_path):
    proc = _cli("data-report", "--data", str(demo_dir / "data"), "--tokenizer",
                str(demo_dir / "model" / "tokenizer.model"), "--max-seq-len", "1200", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = (tmp_path / "report.md").read_text()
    lines = {s: sum(1 for p in (demo_dir / "data" / s).glob("*.jsonl") for _ in open(p))
             for s in ("train", "validation", "test")}
    for split, n in lines.items():
        assert f"| {split} | 1 | {n:,} |" in report
    assert "| train / validation | 0 |" in report and "| validation / test | 0 |" in report
    # the policy counts agree with what the dataset builder does at the same cap
    ds = cgdb_instruct_dataset(tokenizer, data_files=demo_dir / "data" / "train", max_seq_len=1200, truncation="drop")
    dropped = ds.counts["dropped_too_long"]
    assert dropped > 0
    row = next(line for line in report.splitlines() if line.startswith("| train |") and line.count("|") == 7)
    assert row.split("|")[4].strip() == f"{dropped:,}"  # the "drop: dropped" column
    for name in ("lengths_train.png", "task_mix.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    assert "SYN0" not in report and "Here is the prediction" not in report
    # the expected rank balance, computed from the same lengths as the training split's samples
    from gdt_tune.training.sampling import expected_rank_balance

    capped = [min(len(ds._layout.prompt_tokens(r["instruction"])) + len(ds._layout.answer_tokens(r["answer"])), 1200)
              for _, r in read_samples(demo_dir / "data" / "train", None)]
    random_order, balanced = expected_rank_balance(capped, 8)
    line = f"rank balance at 8 ranks: random {random_order:.2f}, balanced {balanced:.2f}"
    assert line in report.splitlines() and line in proc.stdout and balanced > random_order


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_scores_equal_a_full_forward(demo_dir, tokenizer, dtype, tol):
    """Scores from the hidden states at the scored positions equal a full forward pass of the same
    model, in fp32 and in bf16 (the head runs in the model's dtype: bf16 used to crash)."""
    from recipe_utils import load_trained

    model, _, _ = load_trained(demo_dir / "model", None, torch.device("cpu"), dtype)
    assert model.output.weight.dtype == dtype
    pairs = [([1014, 5, 6, 7], [8, 9]), ([1014, 300], [301, 302, 303])]
    got = score_sequences(model, pairs, tokenizer.pad_id, torch.device("cpu"), batch_size=2)
    for (c, x), score in zip(pairs, got):
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([c + x])).float(), dim=-1)[0]
        expected = sum(float(logprobs[len(c) - 1 + j, t]) for j, t in enumerate(x)) / len(x)
        assert score == pytest.approx(expected, abs=tol)


def test_evaluate_in_bf16_matches_fp32(demo_dir, tmp_path):
    """The whole command in bf16 on CPU (what CUDA uses by default): event probabilities within
    bf16 tolerance of fp32, and the dtype is recorded."""
    from gdt_tune.eval.evaluate import evaluate

    common = dict(data=demo_dir / "data" / "test", max_samples=3, samples=1, device="cpu")
    a = evaluate(demo_dir / "model", out=tmp_path / "fp32", dtype="fp32", **common)
    b = evaluate(demo_dir / "model", out=tmp_path / "bf16", dtype="bf16", **common)
    assert (a["dtype"], b["dtype"]) == ("float32", "bfloat16")
    assert a["events"]["tasks"] == b["events"]["tasks"] > 0
    assert b["events"]["brier"] == pytest.approx(a["events"]["brier"], abs=0.02)
    with pytest.raises(ValueError, match="--dtype fp16"):
        evaluate(demo_dir / "model", out=tmp_path / "x", dtype="fp16", **common)


def test_forecast_plot_marks_missing_values(monkeypatch, tmp_path):
    """A variable without a parseable model prediction gets an 'n/a' mark, not a zero-height bar."""
    import gdt_tune.eval.plots as plots

    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig))
    rows = {"hemoglobin - 718-7": {"mae_greedy": None, "mae_sampled_mean": 0.5, "mae_copy_forward": 0.7},
            "calcium - 17861-6": {"mae_greedy": 0.2, "mae_sampled_mean": None, "mae_copy_forward": 0.3}}
    plots.forecast_mae_plot({"per_variable": rows}, tmp_path / "x.png")
    ax = figures[0].axes[0]
    assert sorted(t.get_text() for t in ax.texts) == ["n/a", "n/a"]
    assert sorted(round(b.get_height(), 3) for b in ax.patches) == [0.2, 0.3, 0.5, 0.7]  # no zero bars
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["model, greedy", "model, sample mean", "copy-forward"]


def test_a_plot_is_written_whole_or_not_at_all(monkeypatch, tmp_path):
    """A killed or failing save (here: a full disk in the middle of the PNG) leaves the earlier file
    as it was and no temporary file; a good one replaces it."""
    import matplotlib.figure

    import gdt_tune.eval.plots as plots

    rows = {"hemoglobin - 718-7": {"mae_greedy": 0.1, "mae_sampled_mean": 0.5, "mae_copy_forward": 0.7}}
    path = tmp_path / "forecast_mae.png"
    path.write_bytes(b"earlier")
    real_savefig = matplotlib.figure.Figure.savefig

    def half_then_full_disk(self, target, **kwargs):
        Path(target).write_bytes(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", half_then_full_disk)
    with pytest.raises(OneLineError, match=f"^writing {path} failed: the disk is full: "):  # one line naming it
        plots.forecast_mae_plot({"per_variable": rows}, path)
    assert path.read_bytes() == b"earlier" and [p.name for p in tmp_path.iterdir()] == ["forecast_mae.png"]
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", real_savefig)
    plots.forecast_mae_plot({"per_variable": rows}, path)
    assert path.read_bytes()[:4] == b"\x89PNG" and [p.name for p in tmp_path.iterdir()] == ["forecast_mae.png"]


def test_data_report_keys_splits_by_argument_and_counts_every_overlap(demo_dir, tokenizer, tmp_path):
    """Two files both called part-00000.jsonl in different folders are two splits; the overlap is
    counted for every pair."""
    import shutil

    from gdt_tune.eval.data_report import data_report

    for folder, split in (("a", "validation"), ("b", "validation"), ("c", "test")):
        (tmp_path / folder).mkdir()
        shutil.copy(demo_dir / "data" / split / "part-00000.jsonl", tmp_path / folder / "part-00000.jsonl")
    args = [str(tmp_path / f / "part-00000.jsonl") for f in "abc"]
    report = data_report(args, tokenizer, tmp_path / "report", max_seq_len=1200, workers=1)
    patients = report["splits"][args[0]]["patients"]
    assert list(report["splits"]) == args and patients > 0
    assert report["overlap"] == {f"{args[0]}/{args[1]}": patients, f"{args[0]}/{args[2]}": 0,
                                 f"{args[1]}/{args[2]}": 0}
    assert len(list((tmp_path / "report").glob("lengths_*.png"))) == 3


def test_data_report_says_when_a_split_folder_is_empty(demo_dir, tmp_path, capsys):
    import shutil

    from gdt_tune.eval.data_report import splits_of

    root = tmp_path / "data"
    (root / "train").mkdir(parents=True)
    shutil.copytree(demo_dir / "data" / "validation", root / "validation")
    assert list(splits_of([str(root)])) == ["validation"]
    assert capsys.readouterr().err == (f"note: --data {root}: {root / 'train'} holds no *.jsonl files; it is left "
                                       "out of the report\n")


def test_evaluate_on_two_ranks_writes_the_metrics_of_one_process(demo_dir, tmp_path):
    """``--nproc_per_node 2`` (torchrun, 2 CPU ranks) gathers into the same metrics.json as one
    process with the same seed: event scores, the sampled forecasts and their token counts."""
    import subprocess
    import sys

    common = ["--checkpoint", str(demo_dir / "model"), "--data", str(demo_dir / "data" / "test"), "--train-data",
              str(demo_dir / "data" / "train"), "--max-samples", "7", "--samples", "1", "--batch-size", "2",
              "--seed", "3"]
    one = _cli("evaluate", *common, "--out", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "gdt_tune.cli.main", "evaluate", "--nproc_per_node", "2", *common,
                          "--out", str(tmp_path / "two")], capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = ((tmp_path / name / "metrics.json").read_text() for name in ("one", "two"))
    assert a == b
    metrics = json.loads(a)
    assert metrics["samples"] == 7 and metrics["events"]["tasks"] > 10  # 4 batches, the last of 1 sample
    assert metrics["forecasting"]["generation"]["generated_tokens"] > 0
    assert two.stdout.count("samples: 7") == 1 and "generating forecasts" in two.stderr  # rank 0 speaks


def test_training_data_that_shares_test_patients_is_refused_before_the_model_loads(demo_dir, tmp_path, capsys):
    """--train-data at the test split itself: the clip bounds, the censoring distribution and the
    baselines would be fitted on the test patients; one line names where (never the id), nothing is
    written."""
    from gdt_tune.cli.main import main

    test = demo_dir / "data" / "test"
    code = main(["evaluate", "--checkpoint", str(demo_dir / "model"), "--data", str(test), "--train-data", str(test),
                 "--out", str(tmp_path / "eval"), "--device", "cpu"])
    err = capsys.readouterr().err
    first = f"{test}/part-00000.jsonl:1"
    assert code == 1 and err.startswith("error: --data and --train-data share ") and err.count("\n") == 1
    assert f"(e.g. the patient of {first} and of {first})" in err and "SYN" not in err
    assert not (tmp_path / "eval" / "metrics.json").exists()


def test_samples_longer_than_the_models_context_are_left_out_and_counted(demo_dir, tmp_path, capsys):
    """The demo model read with a 1,150-token context: a test sample whose scoring sequence does not fit is
    left out of event scoring (and a prompt that fills the context out of forecasting), counted in
    metrics.json and summary.md, instead of ending the evaluation."""
    import json

    from gdt_tune.cli.main import main

    out = tmp_path / "eval"
    assert main(["evaluate", "--checkpoint", str(demo_dir / "model"), "--data", str(demo_dir / "data" / "test"),
                 "--out", str(out), "--samples", "0", "--max-samples", "4", "--config", "tiny_gdt_cpu",
                 f"demo_dir={demo_dir}", "model.max_seq_len=1150"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    skipped = metrics["events"]["scoring"]["samples_too_long"]
    assert 0 < skipped < metrics["samples"] and metrics["forecasting"]["samples_too_long"] == 0
    assert metrics["events"]["tasks"] > 0
    note = (f"note: left out, longer than the model's context (max_seq_len): {skipped} samples of event scoring, "
            "0 of forecasting")
    assert note in (out / "summary.md").read_text() and note in capsys.readouterr().out

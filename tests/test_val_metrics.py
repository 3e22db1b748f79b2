"""Clinical signal during the run: ``val_loss_forecasting`` / ``val_loss_events`` and, with
``val_metrics_samples``, the event metrics of a fixed validation subset, equal to ``gdt-tune
evaluate`` of the same step's checkpoint on that subset (2 CPU ranks, fp32)."""

import json

import pytest
import torch
from recipe_utils import load_config, logged, run_recipe

from gdt_tune.clinical.validation import KINDS, event_summary, label_kinds, metric_name, metrics_subset
from gdt_tune.data.layout import DEFAULT_SYSTEM_PROMPT, Layout

pytestmark = pytest.mark.xdist_group("val_metrics")


@pytest.fixture(scope="module")
def run(demo_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("valmetrics")
    run_recipe(demo_dir, out, "max_steps_per_epoch=4", "run_val_every_n_steps=2", "save_every_n_steps=2",
               "keep_last_n_checkpoints=2", "val_metrics_samples=8")
    cfg = load_config(f"demo_dir={demo_dir}", f"output_dir={out}", "val_metrics_samples=8")
    return out, cfg


def _val_set(cfg):
    from torchtune import config

    from gdt_tune.trained.prompting import tokenizer_from_config

    tokenizer = tokenizer_from_config(cfg.tokenizer)
    return config.instantiate(cfg.dataset_val, tokenizer), tokenizer


def test_event_metrics_equal_evaluate_of_the_step_checkpoint(run, tmp_path):
    from gdt_tune.eval.evaluate import evaluate

    out, cfg = run
    ds, _ = _val_set(cfg)
    subset = metrics_subset(len(ds), 8, cfg.seed)
    assert len(ds) > 8 and len(subset) == 8 and subset == metrics_subset(len(ds), 8, cfg.seed)
    data = tmp_path / "subset.jsonl"
    data.write_text("".join(json.dumps(ds.record(i)) + "\n" for i in subset))
    # the run lists the same samples by file:line
    assert (out / "val_metrics_samples.txt").read_text().splitlines() == [ds.where(i) for i in subset]
    for step in (2, 4):
        metrics = evaluate(out / f"step_{step}", data, tmp_path / f"eval{step}", cfg=cfg, samples=0)
        ev = metrics["events"]
        expected = {"val_events_accuracy": ev["accuracy"], "val_events_brier": ev["brier"],
                    "val_events_auroc": ev["auroc"]["all"]["all"]["auroc"], "val_events_cindex": ev["cindex_harrell"]}
        assert ev["cindex_harrell"] is not None
        expected.update({f"val_events_auroc_{metric_name(e)}": c["all"]["auroc"] for e, c in ev["auroc"].items()
                         if e != "all" and c["all"]["auroc"] is not None})
        assert ev["tasks"] > 5 and len(expected) >= 4
        for key, value in expected.items():
            assert logged(out, key)[step] == pytest.approx(value, abs=1e-6), key
        assert 0 < logged(out, "val_metrics_seconds")[step] < 60


def test_loss_per_task_type_equals_a_plain_forward(run):
    """The recipe's sharded, per-token sums equal a plain forward of step_2's weights over the
    whole validation set, attributed by the same rule."""
    from recipe_utils import load_trained

    out, cfg = run
    ds, tokenizer = _val_set(cfg)
    model, _, _ = load_trained(out / "step_2", cfg, torch.device("cpu"), torch.float32)
    sums, counts = [0.0, 0.0, 0.0], [0, 0, 0]
    with torch.no_grad():
        for i in range(len(ds)):
            tokens, labels = (torch.tensor(ds[i][k]) for k in ("tokens", "labels"))
            logprobs = torch.log_softmax(model(tokens[None])[0, :-1].double(), dim=-1)
            keep = labels[1:] != -100
            ce = -logprobs[keep].gather(1, labels[1:][keep][:, None])[:, 0]
            kinds = label_kinds(tokenizer, labels[1:][keep].tolist())
            for value, kind in zip(ce.tolist(), kinds):
                sums[0] += value
                counts[0] += 1
                if kind >= 0:
                    sums[1 + kind] += value
                    counts[1 + kind] += 1
    assert counts[1] > 0 and counts[2] > 0
    assert logged(out, "val_loss")[2] == pytest.approx(sums[0] / counts[0], rel=1e-5)
    for i, kind in enumerate(KINDS):
        assert logged(out, f"val_loss_{kind}")[2] == pytest.approx(sums[1 + i] / counts[1 + i], rel=1e-5)


def test_label_kinds_switch_at_each_task_header(tokenizer):
    layout = Layout.build(tokenizer, DEFAULT_SYSTEM_PROMPT)
    answer = ("Task 1 is forecasting:\n2 weeks later, the patient visited and experienced the following: \n"
              "\themoglobin is 12.5.\n\nTask 2 is time to event prediction:\nHere is the prediction: the event "
              "(death) was not censored and did not occur.")
    targets = layout.answer_tokens(answer)
    kinds = label_kinds(tokenizer, targets)
    texts = [tokenizer.decode([t], skip_special_tokens=False) for t in targets]
    header = len(layout.assistant_header)
    assert kinds[:header] == [-1] * header  # the assistant header belongs to no task
    second = next(i for i in range(header, len(texts)) if "".join(texts[header:i + 1]).count("Task") == 2)
    assert set(kinds[header:second]) == {0} and set(kinds[second:]) == {1}  # the final <|eot_id|> included


def test_event_summary_keys_and_a_one_class_auroc_left_out():
    tasks = [{"event": e, "truth": t, "horizon_weeks": 10.0} for e, t in
             [("death", 0), ("death", 1), ("next line of therapy", 0), ("next line of therapy", 0)]]
    probs = [[0.8, 0.1, 0.1], [0.3, 0.6, 0.1], [0.5, 0.4, 0.1], [0.2, 0.7, 0.1]]
    out = event_summary(tasks, probs)
    assert set(out) == {"val_events_accuracy", "val_events_brier", "val_events_auroc", "val_events_auroc_death"}
    timed = [{**t, "time_weeks": w, "occurred": o} for t, w, o in zip(tasks, [3.0, 5.0, 9.0, 7.0],
                                                                       [True, False, False, False])]
    assert event_summary(timed, probs)["val_events_cindex"] == 1.0  # the occurred task has the highest P(occurred)
    assert out["val_events_accuracy"] == 0.75 and out["val_events_auroc_death"] == 1.0
    assert metric_name("next line of therapy") == "next_line_of_therapy"
    assert metrics_subset(5, 10, 0) == [0, 1, 2, 3, 4]


def test_samples_longer_than_the_model_are_left_out_with_a_warning(demo_dir, tmp_path, caplog):
    """A model shorter than some validation samples: training runs, the others are scored and
    listed, one warning names how many were left out and the first one."""
    import logging

    from recipe_utils import train_in_process

    with caplog.at_level(logging.WARNING, logger="gdt_tune"):
        train_in_process(demo_dir, tmp_path / "run", "max_steps_per_epoch=1", "save_every_n_steps=null",
                         "run_val_every_n_steps=1", "model.max_seq_len=1200", "dataset.max_seq_len=1200",
                         "dataset_val.max_seq_len=1200")
    warning = next(r.getMessage() for r in caplog.records if "longer than model.max_seq_len" in r.getMessage())
    assert "of the chosen validation samples are longer than model.max_seq_len (1200) and are not scored, e.g. " in warning
    listed = (tmp_path / "run" / "val_metrics_samples.txt").read_text().splitlines()
    assert listed and warning.split("e.g. ")[1] not in listed
    assert 0 <= logged(tmp_path / "run", "val_events_accuracy")[1] <= 1

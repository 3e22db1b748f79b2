"""``gdt-tune evaluate``: clinical-task metrics of a trained checkpoint on held-out samples, GDT's
own metrics among them (docs/evaluation.md).

    gdt-tune evaluate [--nproc_per_node N] --checkpoint RUN/epoch_0 --data DATA/test --train-data DATA/train \
        --out eval/ [--config CONFIG] [--prompt training|gdt]

- Event tasks: the three completions are scored by mean per-token log-probability after the
  prompt and the true answer text up to that task's outcome, all tasks of a sample in one forward
  (``gdt_tune.clinical.event_scoring``); a softmax over the three gives the probabilities. GDT's
  IPCW C-index and Brier score per (indication, event, week) with the training split's censoring
  distribution, against the majority outcome and a Random Survival Forest (``gdt_eval``); accuracy,
  Brier, confusion, calibration and the AUROC of P(occurred) among uncensored tasks.
- Forecasting tasks: the answer is generated greedily and ``--samples`` times sampled (GDT's 10 by
  default, temperature and top-p: ``gdt_tune.trained.serving.GENERATION``) from one prefill of the prompt
  (``gdt_tune.eval.generation``), parsed with ``parse_answer``; GDT's MAE ratio to copy-forward per
  (indication, variable) on clipped values, the forecast being the mean of the draws; the MAE per
  variable and the share of unparseable outputs.

With ``--nproc_per_node N`` (torchrun) batch b runs on rank b % N, each rank on its own device;
rank 0 gathers and writes the same ``metrics.json`` as one process. Writes ``metrics.json``,
``predictions.jsonl``, ``summary.md``, ``forecast_mae.png`` and ``event_calibration.png``. No sample
text is logged or written.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from gdt_tune.clinical.event_scoring import event_candidates, pack_sample, score_samples
from gdt_tune.clinical.gdt_metrics import cindex_harrell
from gdt_tune.clinical.metrics import (
    event_auroc,
    event_metrics,
    forecast_metrics,
    forecast_points,
    majority_baseline,
    softmax,
)
from gdt_tune.data.answers import parse_answer
from gdt_tune.data.layout import GDT_EVAL_DATE_LINES, Layout
from gdt_tune.data.records import read_lines, resolve_data_files
from gdt_tune.data.text import FORECASTING, last_values
from gdt_tune.eval.gdt_eval import (
    event_rows,
    forecast_rows,
    gdt_metrics,
    indication_of,
    instruction_features,
    read_training,
    refuse_shared_patients,
    rsf_scores,
    summary_table,
)
from gdt_tune.eval.generation import generate_draws
from gdt_tune.runtime.coordination import init_distributed
from gdt_tune.runtime.files import check_output_folder, write_atomically
from gdt_tune.runtime.torch_env import DTYPES, torch_dtype
from gdt_tune.trained.model import checkpoint_holding, open_trained
from gdt_tune.trained.serving import TEMPERATURE, TOP_P
from gdt_tune.training.loss_head import LossOnlyHead
from gdt_tune.training.run_dir import OutputDirLock

log = logging.getLogger("gdt_tune")


def read_samples(data, max_samples: int | None) -> list[tuple[str, dict]]:
    """(file:line, record) of the held-out samples, validated like training data."""
    out = []
    for path in resolve_data_files(data, "--data"):
        for _, _, _, where, record in read_lines(path):
            out.append((where, record))
            if max_samples and len(out) >= max_samples:
                return out
    return out


def parsed_forecast(text: str) -> dict | None:
    """The numeric forecasting task of a generated answer as points, or None when unparseable."""
    try:
        tasks = [t for t in parse_answer(text) if t.type == FORECASTING]
    except ValueError:
        return None
    return forecast_points(tasks[0].visits) if tasks else None


# ---------------------------------------------------------------- command
def _device_and_dtype(device, dtype, local_rank: int) -> tuple[torch.device, torch.dtype]:
    try:
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise ValueError(f"--device {device}: not a device; give cuda, cuda:N or cpu") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device is visible here; give --device cpu or run on a GPU node")
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"--device {device}: expected cuda, cuda:N or cpu")
    if dtype not in (None, *DTYPES):
        raise ValueError(f"--dtype {dtype}: expected bf16 or fp32")
    if device.type == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        device = torch.device("cuda", local_rank)  # --nproc_per_node: one device per rank
    return device, torch_dtype(dtype or ("bf16" if device.type == "cuda" else "fp32"))


class Ranks:
    """This process's share of the work under ``gdt-tune evaluate --nproc_per_node N`` (torchrun):
    batch ``b`` runs on rank ``b % N``; :meth:`gather` brings every rank's results to all, in batch
    order. A world of one without torchrun."""

    def __init__(self, device_type: str):
        self.world, self.rank = 1, 0
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            self.world, self.rank, _ = init_distributed(device_type)

    def mine(self, n_batches: int) -> range:
        return range(self.rank, n_batches, self.world)

    def gather(self, results: dict[int, list]) -> list:
        """``{batch: [result, ...]}`` of every rank as one list in batch order."""
        if self.world > 1:
            parts = [None] * self.world
            dist.all_gather_object(parts, results)
            results = {b: r for part in parts for b, r in part.items()}
        return [r for b in sorted(results) for r in results[b]]

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _batches(n: int, size: int) -> list[range]:
    return [range(start, min(start + size, n)) for start in range(0, n, size)]


def score_events(model, tokenizer, layout: Layout, records, batch_size: int, device, ranks: Ranks):
    """Event tasks of ``records`` and their outcome probabilities (one forward per sample)."""
    samples, packs, kept, too_long = [], [], [], 0
    for where, record in records:
        try:
            tasks = event_candidates(layout, record)
        except ValueError as e:
            raise ValueError(f"{where}: cannot score its event tasks ({e})") from None
        try:
            sample_packs = pack_sample(tasks, model.max_seq_len)
        except ValueError:  # longer than the model's context: left out and counted (docs/evaluation.md)
            too_long += 1
            continue
        samples.append(tasks)
        packs.append(sample_packs)
        kept.append((where, record))
    head, results = LossOnlyHead(model, num_chunks=1), {}
    batches = _batches(len(samples), batch_size)
    total = sum(len(packs[i]) for b in ranks.mine(len(batches)) for i in batches[b])
    with tqdm(total=total, desc="scoring events", unit="sample", disable=ranks.rank != 0 or not total,
              dynamic_ncols=True) as bar:
        for b in ranks.mine(len(batches)):
            results[b] = score_samples(head, [packs[i] for i in batches[b]], tokenizer.pad_id, device, batch_size,
                                       progress=bar.update)
    scores = ranks.gather(results)
    tasks = [{**t, "where": where, "indication": indication_of(record)}
             for (where, record), sample in zip(kept, samples) for t in sample]
    scoring = {"sequences": sum(map(len, packs)), "model_tokens": sum(len(p) for sample in packs for p in sample),
               "samples_too_long": too_long}
    return tasks, [softmax(s) for sample in scores for s in sample], scoring


def generate_forecasts(model, tokenizer, layout: Layout, records, samples: int, batch_size: int, device, dtype,
                       seed: int, ranks: Ranks) -> list[dict]:
    """Forecasting tasks of ``records`` with the greedy and ``samples`` sampled answers parsed."""
    items, prompts, too_long = [], [], 0
    for where, record in records:
        truth = [t for t in parse_answer(record["answer"]) if t.type == FORECASTING]
        if truth:
            prompt = [*layout.prompt_tokens(record["instruction"]), *layout.assistant_header]
            room = model.max_seq_len - len(prompt)  # generation stops at the model's context
            if room < 1:  # the prompt fills the context: left out and counted (docs/evaluation.md)
                too_long += 1
                continue
            prompts.append(prompt)
            items.append({"truth": forecast_points(truth[0].visits), "last": last_values(record["instruction"]),
                          "max_new": min(len(layout.answer_tokens(record["answer"])) + 32, room),
                          "where": where, "task": truth[0].number, "indication": indication_of(record)})
    draws = [(0.0, 1.0)] + [(TEMPERATURE, TOP_P)] * samples
    batches, results = _batches(len(items), batch_size), {}
    for b in tqdm(ranks.mine(len(batches)), desc="generating forecasts", unit="batch",
                  disable=ranks.rank != 0 or not batches, dynamic_ncols=True):
        chunk = batches[b]
        generator = torch.Generator().manual_seed(seed * 1_000_003 + b)  # the batch's draws, on any rank
        room = model.max_seq_len - max(len(prompts[i]) for i in chunk)  # the batch shares one length
        outputs = generate_draws(model, [prompts[i] for i in chunk], draws,
                                 min(room, max(items[i]["max_new"] for i in chunk)),
                                 tokenizer.pad_id, tokenizer.eot_id, generator, device, dtype)
        results[b] = [([parsed_forecast(tokenizer.decode(ids)) for ids in per_prompt], sum(map(len, per_prompt)))
                      for per_prompt in outputs]
    for item, (predictions, generated) in zip(items, ranks.gather(results)):
        item["predictions"], item["generated_tokens"] = predictions, generated
    return items, too_long


PROMPTS = ("training", "gdt")


def evaluation_layout(tokenizer, system_prompt: str, style: str) -> Layout:
    """``training``: the exact training layout. ``gdt``: GDT's evaluation prompt (docs/evaluation.md):
    the system turn opens with its date lines and the answer follows a ``system`` header."""
    if style == "gdt":
        return Layout.build(tokenizer, GDT_EVAL_DATE_LINES + system_prompt.strip(), answer_role="system")
    return Layout.build(tokenizer, system_prompt)


def evaluate(checkpoint, data, out, cfg=None, max_samples=None, train_data=None, samples=10, batch_size=4,
             device=None, dtype=None, seed=0, prompt="training", train_samples=20_000) -> dict | None:
    """``dtype``: bf16 or fp32 (default: bf16 on CUDA, fp32 on CPU). ``prompt``: ``training`` or
    ``gdt`` (:func:`evaluation_layout`). ``train_samples``: how many training samples give the clip
    bounds, the censoring distribution and the baselines (None: all). Under torchrun the samples are
    split over the ranks; rank 0 writes and returns the metrics (None on the others)."""
    torch.manual_seed(seed)
    if prompt not in PROMPTS:
        raise ValueError(f"--prompt {prompt}: expected training or gdt")
    device, dtype = _device_and_dtype(device, dtype, int(os.environ.get("LOCAL_RANK", "0")))
    checkpoint, out = Path(checkpoint), Path(out)
    check_output_folder(out)
    if (inside := checkpoint_holding(out)) is not None:
        raise ValueError(f"--out {out} is inside the checkpoint {inside}: predictions.jsonl (per-sample truths, file:line) "
                         "would travel with it into an export; give a folder outside it")
    # one evaluate at a time writes into out (rank 0 holds its .lock until it is done)
    lock = OutputDirLock(out, key="--out", holder="evaluate") if int(os.environ.get("RANK", "0")) == 0 else None
    if lock is not None:
        lock.acquire()
    try:
        return _evaluate(checkpoint, data, out, cfg, max_samples, train_data, samples, batch_size, device, dtype, seed,
                         prompt, train_samples)
    finally:
        if lock is not None:
            lock.release()


def _evaluate(checkpoint, data, out, cfg, max_samples, train_data, samples, batch_size, device, dtype, seed, prompt,
              train_samples) -> dict | None:
    records = read_samples(data, max_samples)
    if not records:
        raise ValueError(f"--data {data}: no samples")
    if train_data is None and cfg is not None:
        train_data = cfg.dataset.get("data_files")
    train = None  # before the model loads: a wrong path or the test split given as training data fails fast
    if train_data is not None:
        train = read_training(train_data, train_samples)
        refuse_shared_patients(records, train)
    ranks = Ranks(device.type)
    try:
        trained = open_trained(checkpoint, cfg)
        model, tokenizer = trained.load(device, dtype), trained.tokenizer
        layout = evaluation_layout(tokenizer, trained.system_prompt, prompt)
        tasks, probs, scoring = score_events(model, tokenizer, layout, records, batch_size, device, ranks)
        items, forecasts_too_long = generate_forecasts(model, tokenizer, layout, records, samples, batch_size, device,
                                                       dtype, seed, ranks)
    finally:
        ranks.close()
    if ranks.rank != 0:
        return None
    events, truths = [t["event"] for t in tasks], [t["truth"] for t in tasks]
    metrics = {"checkpoint": str(checkpoint), "data": str(data), "samples": len(records), "prompt": prompt,
               "device": device.type, "dtype": str(dtype).removeprefix("torch."),
               "events": {**event_metrics(events, truths, probs), "scoring": scoring,
                          "cindex_harrell": cindex_harrell(tasks, probs)}}
    if tasks:
        metrics["events"]["auroc"] = event_auroc(events, [t["horizon_weeks"] for t in tasks], truths, probs)
    if train is not None and tasks:
        metrics["events"]["baseline_majority"] = majority_baseline(train.outcomes, events, truths)
    metrics["forecasting"] = {**forecast_metrics(items), "samples_too_long": forecasts_too_long}
    metrics["forecasting"]["generation"] = {"greedy": 1, "sampled": samples, "temperature": TEMPERATURE,
                                            "top_p": TOP_P, "seed": seed,
                                            "generated_tokens": sum(i["generated_tokens"] for i in items)}
    rows = forecast_rows(items, train.clip if train is not None else {}) + event_rows(tasks, probs)
    rsf = rsf_fit = None
    event_only = [r for r in rows if r["type"] == "event"]
    if train is not None and train.rsf and any(r["time_weeks"] is not None for r in event_only):
        instructions = {where: record["instruction"] for where, record in records}
        features = [{**instruction_features(instructions[r["where"]]), "indication": r["indication"]}
                    for r in event_only]
        rsf, rsf_fit = rsf_scores(train, event_only, features, seed)
    metrics["gdt"] = gdt_metrics(rows, train, prompt, rsf, rsf_fit)
    out.mkdir(parents=True, exist_ok=True)
    write_atomically(out / "predictions.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    write_atomically(out / "metrics.json", json.dumps(metrics, indent=1))
    write_atomically(out / "summary.md", "# Evaluation\n\n" + summary_table(metrics) + "\n")
    from gdt_tune.eval.plots import calibration_plot, forecast_mae_plot

    forecast_mae_plot(metrics["forecasting"], out / "forecast_mae.png")
    if tasks:
        calibration_plot(metrics["events"], out / "event_calibration.png")
    return metrics


def summary(metrics: dict) -> str:
    """A few lines for the terminal (numbers only)."""
    ev, fc = metrics["events"], metrics["forecasting"]

    def f(x):
        return "n/a" if x is None else f"{x:.3f}"

    lines = [f"samples: {metrics['samples']}"]
    if ev.get("tasks"):
        base = ev.get("baseline_majority", {})
        lines.append(f"events: {ev['tasks']} tasks, accuracy {f(ev['accuracy'])} (majority baseline "
                     f"{f(base.get('accuracy'))}), Brier {f(ev['brier'])} (baseline {f(base.get('brier'))})")
        overall = ev["auroc"]["all"]["all"]
        ci = overall["ci95"]
        lines.append(f"events AUROC of P(occurred), uncensored tasks: {f(overall['auroc'])} "
                     f"(95% CI {f(ci[0]) if ci else 'n/a'}-{f(ci[1]) if ci else 'n/a'}; {overall['tasks']} tasks, "
                     f"{overall['occurred']} occurred); per event and horizon in metrics.json")
        lines.append(f"event scoring: one forward per sample, {ev['scoring']['sequences']} sequences, "
                     f"{ev['scoring']['model_tokens']:,} model tokens")
    if fc["tasks"]:
        lines.append(f"forecasting: {fc['targets']} targets, MAE greedy {f(fc['mae_greedy'])}, sampled mean "
                     f"{f(fc['mae_sampled_mean'])}, copy-forward {f(fc['mae_copy_forward'])}; scaled MAE greedy "
                     f"{f(fc['scaled_mae_greedy'])} vs copy-forward {f(fc['scaled_mae_copy_forward'])}; "
                     f"unparseable {f(fc['unparseable_share'])}")
        gen = fc["generation"]
        lines.append(f"forecast generation: greedy + {gen['sampled']} sampled draws from one prefill per prompt, "
                     f"{fc['tasks']} prompts, {gen['generated_tokens']:,} tokens generated")
    return "\n".join(lines) + "\n\n" + summary_table(metrics)

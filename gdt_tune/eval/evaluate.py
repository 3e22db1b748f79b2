"""``gdt-tune evaluate``: clinical-task metrics of a trained checkpoint on held-out samples.

    gdt-tune evaluate --checkpoint RUN/epoch_0 --data DATA/test --out eval/ [--config CONFIG] [--max-samples N]

- Event tasks: the three completions are scored by mean per-token log-probability after the
  prompt and the true answer text up to that task's outcome; a softmax over the three gives the
  probabilities. Accuracy, Brier score, per-event confusion and calibration, against the training
  set's majority outcome per event (training data: ``--train-data`` or the config's dataset), and
  the AUROC of P(occurred) among uncensored tasks per event and horizon bucket with bootstrap 95%
  intervals (horizons read from the instruction's task list).
- Forecasting tasks: the answer is generated greedily and ``--samples`` times sampled
  (GDT's temperature and top-p: ``gdt_tune.serving.GENERATION``), parsed with ``parse_answer``; MAE and scaled MAE per
  variable against the copy-forward baseline, and the share of unparseable outputs.

Writes ``metrics.json``, ``forecast_mae.png`` and ``event_calibration.png``. No sample text is
logged or written.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from pathlib import Path

import torch
from tqdm import tqdm

from gdt_tune.data.answers import event_outcomes, parse_answer
from gdt_tune.data.layout import Layout
from gdt_tune.data.records import read_lines, resolve_data_files
from gdt_tune.data.text import EVENT, FORECASTING
from gdt_tune.eval.metrics import (
    OUTCOMES,
    event_auroc,
    event_metrics,
    forecast_metrics,
    forecast_points,
    last_values,
    majority_baseline,
    outcome_index,
    softmax,
)
from gdt_tune.serving import TEMPERATURE, TOP_P
from gdt_tune.trained import load_model_and_tokenizer
from gdt_tune.training.config import unwritable_folder

log = logging.getLogger("gdt_tune")
_HORIZON_RE = re.compile(r"Task (\d+) is time to event prediction:\n\tPredict whether the event \((.+?)\) was "
                         r"censored (\d+(?:\.\d+)?) weeks")


def read_samples(data, max_samples: int | None) -> list[tuple[str, dict]]:
    """(file:line, record) of the held-out samples, validated like training data."""
    out = []
    for path in resolve_data_files(data, "--data"):
        for _, _, _, where, record in read_lines(path):
            out.append((where, record))
            if max_samples and len(out) >= max_samples:
                return out
    return out


def training_outcomes(data) -> dict[str, Counter]:
    """Outcome counts per event name in the training data (for the majority baseline)."""
    counts: dict[str, Counter] = {}
    for path in resolve_data_files(data, "--train-data"):
        with open(path, "rb") as f:
            for raw in f:
                text = raw.decode("utf-8", errors="replace")
                for event, outcome in event_outcomes(text):
                    counts.setdefault(event, Counter())[OUTCOMES.index(outcome)] += 1
    return counts


# ---------------------------------------------------------------- scoring
def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_bos=False, add_eos=False)


def event_candidates(layout: Layout, record: dict) -> list[dict]:
    """For each event task: the context tokens (prompt, assistant header, answer up to the
    outcome) and the three candidate completions' tokens."""
    answer = record["answer"].strip()
    context = [*layout.prompt_tokens(record["instruction"]), *layout.assistant_header]
    horizons = {int(n): float(w) for n, _, w in _HORIZON_RE.findall(record["instruction"])}
    out = []
    for task in [t for t in parse_answer(answer) if t.type == EVENT]:
        prefix = answer[: task.outcome_start].rstrip()  # "... the event (death)"; the space goes with the outcome
        if task.number not in horizons:
            raise ValueError(f"the instruction has no horizon ('... was censored N weeks ...') for event task {task.number}")
        out.append({"event": task.event, "truth": outcome_index(task.censored, task.occurred),
                    "horizon_weeks": horizons[task.number],
                    "context": context + _encode(layout.tokenizer, prefix),
                    "candidates": [_encode(layout.tokenizer, f" {o}") for o in OUTCOMES]})  # the "." may merge with "\n"
    return out


@torch.no_grad()
def score_sequences(model, pairs: list[tuple[list[int], list[int]]], pad_id: int, device, batch_size: int) -> list[float]:
    """Mean log-probability of each continuation given its context, in padded batches."""
    scores = []
    for start in range(0, len(pairs), batch_size):
        batch = pairs[start:start + batch_size]
        length = max(len(c) + len(x) for c, x in batch)
        tokens = torch.full((len(batch), length), pad_id, dtype=torch.long)
        for i, (c, x) in enumerate(batch):
            tokens[i, : len(c) + len(x)] = torch.tensor(c + x)
        hidden, head = _hidden_states(model, tokens.to(device))
        # torchtune's decoder returns its output in fp32 (also for a bf16 model): back to the head's dtype
        head_dtype = next((p.dtype for p in head.parameters()), hidden.dtype)
        for i, (c, x) in enumerate(batch):
            pos = torch.arange(len(c) - 1, len(c) + len(x) - 1, device=hidden.device)
            logits = head(hidden[i, pos].to(head_dtype))  # only where needed: 128k vocab
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            scores.append(float(logprobs[torch.arange(len(x)), torch.tensor(x)].mean()))
    return scores


def _hidden_states(model, tokens):
    """(final hidden states, output head) of a torchtune decoder; (logits, identity) for any
    other module."""
    head = getattr(model, "output", None)
    if not isinstance(head, torch.nn.Module):
        return model(tokens), torch.nn.Identity()
    model.output = torch.nn.Identity()
    try:
        return model(tokens), head
    finally:
        model.output = head


def _top_p_next_token(top_p: float, temperature: float):
    def next_token(model, input_pos, x, q=None, *, mask=None, temperature_=None, **kwargs):
        logits = model(x, input_pos=input_pos, mask=mask)[:, -1]
        if temperature <= 0:
            return logits.argmax(-1, keepdim=True).to(torch.int), logits.unsqueeze(1)
        probs = torch.softmax(logits.float() / temperature, dim=-1)
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest set reaching top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        choice = torch.multinomial(sorted_p / sorted_p.sum(-1, keepdim=True), 1)
        return order.gather(-1, choice).to(torch.int), logits.unsqueeze(1)
    return next_token


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: list[list[int]], max_new: int, temperature: float, top_p: float,
                     device, dtype) -> list[str]:
    """Decoded completions of left-padded ``prompts`` (KV cache; stops at <|eot_id|>). The first
    token is picked by torchtune's sampler (temperature only; answers always start with 'Task')."""
    from torchtune.generation import generate
    from torchtune.modules.common_utils import local_kv_cache

    length = max(map(len, prompts))
    batch = torch.full((len(prompts), length), tokenizer.pad_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        batch[i, length - len(p):] = torch.tensor(p)
    with local_kv_cache(model, batch_size=len(prompts), device=device, dtype=dtype,
                        decoder_max_seq_len=length + max_new):
        out, _ = generate(model, batch.to(device), max_generated_tokens=max_new, pad_id=tokenizer.pad_id,
                          temperature=max(temperature, 1e-5), stop_tokens=[tokenizer.eot_id],
                          custom_generate_next_token=_top_p_next_token(top_p, temperature))
    texts = []
    for row in out[:, length:].tolist():
        row = row[: row.index(tokenizer.eot_id)] if tokenizer.eot_id in row else row
        texts.append(tokenizer.decode([t for t in row if t != tokenizer.pad_id and t != 0]))
    return texts


def parsed_forecast(text: str) -> dict | None:
    """The numeric forecasting task of a generated answer as points, or None when unparseable."""
    try:
        tasks = [t for t in parse_answer(text) if t.type == FORECASTING]
    except ValueError:
        return None
    return forecast_points(tasks[0].visits) if tasks else None


# ---------------------------------------------------------------- command
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def check_output_folder(out: Path) -> None:
    """``--out`` must be a folder this process can write (checked before any work)."""
    if (blocker := unwritable_folder(out)) == out and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder")
    if blocker is not None:
        raise ValueError(f"--out {out}: cannot create or write it ({blocker} is not a writable folder); give another")


def evaluate(checkpoint, data, out, cfg=None, max_samples=None, train_data=None, samples=3, batch_size=4,
             device=None, dtype=None, seed=0) -> dict:
    """``dtype``: bf16 or fp32 (default: bf16 on CUDA, fp32 on CPU)."""
    torch.manual_seed(seed)
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
    dtype = DTYPES[dtype or ("bf16" if device.type == "cuda" else "fp32")]
    checkpoint, out = Path(checkpoint), Path(out)
    check_output_folder(out)
    model, tokenizer, prompt = load_model_and_tokenizer(checkpoint, cfg, device, dtype)
    layout = Layout.build(tokenizer, prompt)
    records = read_samples(data, max_samples)
    if not records:
        raise ValueError(f"--data {data}: no samples")

    tasks, pairs = [], []
    for where, record in records:
        try:
            for t in event_candidates(layout, record):
                tasks.append(t)
                pairs += [(t["context"], c) for c in t["candidates"]]
        except ValueError as e:
            raise ValueError(f"{where}: answer does not parse ({e})") from None
    scores = []
    for start in tqdm(range(0, len(pairs), batch_size * 4), desc="scoring events", unit="batch"):
        scores += score_sequences(model, pairs[start:start + batch_size * 4], tokenizer.pad_id, device, batch_size)
    probs = [softmax(scores[3 * i: 3 * i + 3]) for i in range(len(tasks))]
    events, truths = [t["event"] for t in tasks], [t["truth"] for t in tasks]
    metrics = {"checkpoint": str(checkpoint), "data": str(data), "samples": len(records),
               "device": device.type, "dtype": str(dtype).removeprefix("torch."),
               "events": event_metrics(events, truths, probs)}
    if tasks:
        metrics["events"]["auroc"] = event_auroc(events, [t["horizon_weeks"] for t in tasks], truths, probs)
    if train_data is None and cfg is not None:
        train_data = cfg.dataset.get("data_files")
    if train_data is not None and tasks:
        metrics["events"]["baseline_majority"] = majority_baseline(training_outcomes(train_data), events, truths)

    items, prompts = [], []
    for _, record in records:
        truth = [t for t in parse_answer(record["answer"]) if t.type == FORECASTING]
        if truth:
            items.append({"truth": forecast_points(truth[0].visits), "last": last_values(record["instruction"]),
                          "predictions": [], "max_new": len(layout.answer_tokens(record["answer"])) + 32})
            prompts.append([*layout.prompt_tokens(record["instruction"]), *layout.assistant_header])
    runs = [(0.0, 1.0)] + [(TEMPERATURE, TOP_P)] * samples
    for start in tqdm(range(0, len(items), batch_size), desc="generating forecasts", unit="batch"):
        chunk = items[start:start + batch_size]
        max_new = max(i["max_new"] for i in chunk)
        for temperature, top_p in runs:
            texts = generate_answers(model, tokenizer, prompts[start:start + batch_size], max_new, temperature, top_p,
                                     device, dtype)
            for item, text in zip(chunk, texts):
                item["predictions"].append(parsed_forecast(text))
    metrics["forecasting"] = forecast_metrics(items)
    metrics["forecasting"]["generation"] = {"greedy": 1, "sampled": samples, "temperature": TEMPERATURE,
                                            "top_p": TOP_P}
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    from gdt_tune.eval.plots import calibration_plot, forecast_mae_plot

    forecast_mae_plot(metrics["forecasting"], out / "forecast_mae.png")
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
    if fc["tasks"]:
        lines.append(f"forecasting: {fc['targets']} targets, MAE greedy {f(fc['mae_greedy'])}, sampled mean "
                     f"{f(fc['mae_sampled_mean'])}, copy-forward {f(fc['mae_copy_forward'])}; scaled MAE greedy "
                     f"{f(fc['scaled_mae_greedy'])} vs copy-forward {f(fc['scaled_mae_copy_forward'])}; "
                     f"unparseable {f(fc['unparseable_share'])}")
    return "\n".join(lines)

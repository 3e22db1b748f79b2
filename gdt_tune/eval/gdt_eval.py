"""GDT's evaluation inside ``gdt-tune evaluate`` (docs/evaluation.md): what the training split gives
(clip bounds, the censoring rows, the majority outcomes, the Random Survival Forest's training rows),
the per-item rows of ``predictions.jsonl``, the RSF baseline and the summary table::

    train = read_training(paths, max_samples=20000)
    rows = forecast_rows(items, train.clip) + event_rows(tasks, probs)   # tasks from score_events
    gdt = gdt_metrics(rows, train, prompt="training")   # metrics.json["gdt"]
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import numpy as np

from gdt_tune.clinical.event_scoring import event_category
from gdt_tune.clinical.gdt_metrics import (
    LANDMARK_WEEKS,
    PUBLISHED,
    clip_stats,
    clipped_point,
    event_cindex,
    fill_forecast,
    forecast_ratios,
)
from gdt_tune.clinical.metrics import OCCURRED, forecast_points, outcome_index
from gdt_tune.data.answers import parse_answer
from gdt_tune.data.records import event_time, patient_of, read_lines, resolve_data_files
from gdt_tune.data.text import (
    DEMOGRAPHICS_HEADER,
    EVENT,
    FIRST_VISIT_HEADER,
    FORECASTING,
    SUMMARY_GENETIC,
    SUMMARY_LOT,
    history_end,
    visit_spans,
)

_ITEM_RE = re.compile(r"^\t([^\t\n]+?) is ([^\t\n]+?)[,.]?$", re.MULTILINE)
_NUMBER_RE = re.compile(r"-?\d+(?:\.\d+)?")
#: the RSF's training rows per event (seeded subsample) and its size: bounded time on any training file
RSF_MAX_ROWS, RSF_TREES, RSF_LABS = 1000, 100, 30


def indication_of(record: dict) -> str:
    meta = record.get("meta")
    return str(meta.get("indication") or "unknown") if isinstance(meta, dict) else "unknown"


def instruction_features(instruction: str) -> dict[str, float | str]:
    """What the RSF sees of a sample, read from its instruction: demographics (``age`` as a number,
    the others as categories), the last value of each lab in the history, the number of visits and
    weeks since the first, the genetic recap (gene = value) and the latest regimen. A lab value is its
    leading number (history values are the source's strings, units included)."""
    out: dict[str, float | str] = {}
    head = instruction.split(FIRST_VISIT_HEADER, 1)[0].split(DEMOGRAPHICS_HEADER, 1)[-1]
    for name, value in _ITEM_RE.findall(head):
        number = _NUMBER_RE.search(value)
        if name.startswith("age") and number:
            out["age"] = float(number.group())
        else:
            out[f"demographics:{name}"] = value
    history = instruction[:history_end(instruction)]
    for name, value in _ITEM_RE.findall(history):
        if " - " in name and (number := _NUMBER_RE.match(value)):  # "0.92 mg/dl": 0.92
            out[f"lab:{name}"] = float(number.group())  # the last value wins
    spans = visit_spans(instruction)
    out["visits"] = float(len(spans))
    out["weeks_since_first_visit"] = float(sum(w for _, _, w in spans if w is not None))
    if SUMMARY_GENETIC in instruction:
        recap = instruction.split(SUMMARY_GENETIC, 1)[1].split(SUMMARY_LOT, 1)[0]
        for gene, value in _ITEM_RE.findall(recap):
            if not gene.startswith("<"):
                out[f"genetic:{gene}"] = value
    if SUMMARY_LOT in instruction:
        regimen = instruction.split(SUMMARY_LOT, 1)[1].lstrip("\n").split("\n", 1)[0].strip()
        out["regimen"] = regimen
    return out


@dataclass
class TrainingSplit:
    """What ``--train-data`` gives evaluate, from its first ``limit`` samples."""

    samples: int = 0
    limit: int | None = None
    outcomes: dict[str, Counter] = field(default_factory=dict)  # event name -> outcome counts (majority)
    event_rows: dict[str, list[tuple[float, bool]]] = field(default_factory=lambda: defaultdict(list))
    values: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))  # forecast targets
    rsf: list[tuple[dict, str, float, bool]] = field(default_factory=list)  # (features, category, time, occurred)
    unparseable: int = 0
    patients: dict[str, str] = field(default_factory=dict)  # patient id -> file:line of its first sample

    @property
    def clip(self) -> dict[str, tuple[float, float]]:
        return clip_stats(self.values)


def read_training(data, max_samples: int | None) -> TrainingSplit:
    """One pass over the training samples (the first ``max_samples``; None: all)."""
    split = TrainingSplit(limit=max_samples)
    for path in resolve_data_files(data, "--train-data"):
        for _, _, _, where, record in read_lines(path):
            if max_samples is not None and split.samples >= max_samples:
                return split
            split.samples += 1
            if (patient := patient_of(record, where)) is not None:
                split.patients.setdefault(patient, where)
            try:
                tasks = parse_answer(record["answer"])
            except ValueError:
                split.unparseable += 1
                continue
            features = None
            for task in tasks:
                if task.type == FORECASTING:
                    for (_, variable), value in forecast_points(task.visits).items():
                        split.values[variable].append(value)
                elif task.type == EVENT:
                    split.outcomes.setdefault(task.event, Counter())[outcome_index(task.censored, task.occurred)] += 1
                    weeks, occurred = event_time(record, task.number)
                    if weeks is None:
                        continue
                    category = event_category(record, task)
                    split.event_rows[f"{indication_of(record)}|{category}"].append((weeks, occurred))
                    features = features if features is not None else {
                        **instruction_features(record["instruction"]), "indication": indication_of(record)}
                    split.rsf.append((features, category, weeks, occurred))
    return split


def refuse_shared_patients(records: list[tuple[str, dict]], train: TrainingSplit) -> None:
    """ValueError when a patient of the evaluated samples (``(file:line, record)``) is in the training
    split read: its clip bounds, censoring distribution and baselines would be fitted on test patients.
    Names where, never the id."""
    shared = {}
    for where, record in records:
        patient = patient_of(record, where)
        if patient is not None and patient in train.patients:
            shared.setdefault(patient, (where, train.patients[patient]))
    if shared:
        test_where, train_where = next(iter(shared.values()))
        raise ValueError(f"--data and --train-data share {len(shared)} patients (e.g. the patient of {test_where} and of "
                         f"{train_where}); --train-data must be the training split (its samples fit the clip bounds, "
                         "the censoring distribution and the baselines): give the training data the model was "
                         "trained on")


# ---------------------------------------------------------------- rows of predictions.jsonl
def event_rows(tasks: list[dict], probs: list[list[float]]) -> list[dict]:
    """One row per scored event task (``tasks``: evaluate's, each with its ``where`` and ``indication``)."""
    return [{"where": t["where"], "task": t["task"], "type": "event", "indication": t["indication"],
             "event": t["category"], "week": t["horizon_weeks"], "p_occurred": p[OCCURRED],
             "p_no_occurrence": 1.0 - p[OCCURRED], "time_weeks": t["time_weeks"], "occurred": t["occurred"]}
            for t, p in zip(tasks, probs)]


def forecast_rows(items: list[dict], clip: dict[str, tuple[float, float]]) -> list[dict]:
    """One row per target point of every forecasting task: the truth, GDT's forecast (the mean of
    the sampled draws, the greedy answer when there are none, missing points filled), the greedy
    forecast and copy-forward, each clipped to the variable's training bounds."""
    rows = []
    for item in items:
        keys = sorted(item["truth"])
        greedy_draw, sampled = item["predictions"][0], item["predictions"][1:]
        forecast, filled = fill_forecast(sampled if sampled else [greedy_draw], keys, item["last"])
        greedy, greedy_filled = fill_forecast([greedy_draw], keys, item["last"])
        for key in keys:
            week, variable = key
            bounds = clip.get(variable)
            truth, prediction, copy = clipped_point(item["truth"][key], forecast[key], item["last"].get(variable),
                                                    bounds)
            rows.append({"where": item["where"], "task": item["task"], "type": "forecast",
                         "indication": item["indication"], "variable": variable, "week": week, "truth": truth,
                         "prediction": prediction, "filled": key in filled, "copy_forward": copy,
                         "greedy": clipped_point(item["truth"][key], greedy[key], None, bounds)[1],
                         "greedy_filled": key in greedy_filled, "clipped": bounds is not None})
    return rows


# ---------------------------------------------------------------- the Random Survival Forest baseline
def rsf_scores(train: TrainingSplit, rows: list[dict], features: list[dict], seed: int) -> tuple[list, dict]:
    """P(occurred by the row's week) from ``sksurv.ensemble.RandomSurvivalForest``, one forest per
    event category trained on (at most ``RSF_MAX_ROWS``, seeded) training rows of that event, on
    :func:`instruction_features`; None where an event has no forest. Returns (scores, what was fit)."""
    from sklearn.feature_extraction import DictVectorizer
    from sksurv.ensemble import RandomSurvivalForest
    from sksurv.util import Surv

    from gdt_tune.runtime.cpus import available_cpus

    lab_counts = Counter(k for f, _, _, _ in train.rsf for k in f if k.startswith("lab:"))
    labs = {k for k, _ in lab_counts.most_common(RSF_LABS)}

    def keep(f: dict) -> dict:
        return {k: v for k, v in f.items() if not k.startswith("lab:") or k in labs}

    scores: list = [None] * len(rows)
    fitted = {}
    rng = np.random.default_rng(seed)
    for category in sorted({r["event"] for r in rows}):
        data = [r for r in train.rsf if r[1] == category]
        available = len(data)
        if len(data) > RSF_MAX_ROWS:
            data = [data[i] for i in sorted(rng.choice(len(data), RSF_MAX_ROWS, replace=False))]
        if len(data) < 10 or not any(o for *_, o in data):
            fitted[category] = {"rows": len(data), "skipped": "fewer than 10 training rows or no event"}
            continue
        vectorizer = DictVectorizer(sparse=False)
        x = vectorizer.fit_transform([keep(f) for f, *_ in data])
        forest = RandomSurvivalForest(n_estimators=RSF_TREES, min_samples_leaf=10, max_features="sqrt",
                                      n_jobs=available_cpus(), random_state=seed)
        forest.fit(x, Surv.from_arrays(event=[o for *_, o in data], time=[t for _, _, t, _ in data]))
        forest.set_params(n_jobs=1)  # the trees' average in one thread: the same numbers on every run
        mine = [i for i, r in enumerate(rows) if r["event"] == category]
        if mine:
            curves = forest.predict_survival_function(vectorizer.transform([keep(features[i]) for i in mine]),
                                                      return_array=True)
            times = forest.unique_times_
            for i, curve in zip(mine, curves):
                at = np.searchsorted(times, rows[i]["week"], side="right") - 1
                scores[i] = float(1.0 - (curve[at] if at >= 0 else 1.0))
        fitted[category] = {"rows": len(data), "of": available, "trees": RSF_TREES, "features": x.shape[1]}
    return scores, fitted


# ---------------------------------------------------------------- metrics.json["gdt"]
def gdt_metrics(rows: list[dict], train: TrainingSplit | None, prompt: str, rsf: list | None = None,
                rsf_fit: dict | None = None) -> dict:
    """``metrics.json["gdt"]``: exactly what the rows give (docs/evaluation.md)."""
    forecasts = [r for r in rows if r["type"] == "forecast"]
    events = [r for r in rows if r["type"] == "event"]
    out: dict = {"prompt": prompt, "forecasting": {}, "events": {}, "notes": []}
    if train is None:
        out["notes"].append("no --train-data: forecasts are not clipped and the events' IPCW metrics need the "
                            "training split's censoring distribution: not computed")
    elif train.limit is not None and train.samples >= train.limit:
        out["notes"].append(f"training statistics from the first {train.samples:,} training samples "
                            "(--train-samples)")
    if forecasts:
        sampled = forecast_ratios(forecasts)
        greedy = forecast_ratios([{**r, "prediction": r["greedy"]} for r in forecasts])
        out["forecasting"] = {
            "median_ratio": sampled["median_ratio"], "median_ratio_top30": sampled["median_ratio_top30"],
            "per_variable": sampled["per_variable"], "n": sampled["n"], "filled": sum(r["filled"] for r in forecasts),
            "points": len(forecasts), "greedy": {**{k: greedy[k] for k in ("median_ratio", "median_ratio_top30")},
                                                 "filled": sum(r.get("greedy_filled", False) for r in forecasts)},
            "copy_forward": {"median_ratio": 1.0 if sampled["per_variable"] else None,
                             "mae": _mae([(r["copy_forward"], r["truth"]) for r in forecasts])},
            "mae": _mae([(r["prediction"], r["truth"]) for r in forecasts]),
            "unclipped_points": sum(not r["clipped"] for r in forecasts)}
    timed = [r for r in events if r["time_weeks"] is not None]
    if events and not timed:
        out["notes"].append("the test event tasks have no meta.target_meta delta_time_numeric / occurred: the IPCW "
                            "C-index and Brier score are not computed")
    elif timed and train is not None and not train.event_rows:
        out["notes"].append("the training event tasks have no meta.target_meta delta_time_numeric / occurred: no "
                            "censoring distribution, the IPCW C-index and Brier score are not computed")
    elif timed and train is not None:
        weeks = sorted({r["week"] for r in timed})
        if not set(weeks) <= set(LANDMARK_WEEKS):
            out["notes"].append(f"the test horizons are not GDT's landmark weeks {', '.join(map(str, LANDMARK_WEEKS))}: "
                                f"C-index per horizon present ({len(weeks)} horizons)")
        out["events"] = event_cindex(timed, train.event_rows)
        share = {cell: float(np.mean([o for _, o in r])) for cell, r in train.event_rows.items() if r}
        majority = event_cindex([{**r, "majority": share.get(f"{r['indication']}|{r['event']}", 0.0)} for r in timed],
                                train.event_rows, score_key="majority")  # one constant per cell: ties
        out["events"]["baseline_majority"] = {"cindex_ipcw_average": majority["cindex_ipcw_average"],
                                              "cindex_ipcw_metastasis": majority["cindex_ipcw_metastasis"]}
        if rsf is not None:
            scored = [{**r, "rsf": s} for r, s in zip(events, rsf) if r["time_weeks"] is not None and s is not None]
            baseline = event_cindex(scored, train.event_rows, score_key="rsf")
            sub = {c: f for c, f in (rsf_fit or {}).items() if f.get("of", 0) > f["rows"]}
            if sub:
                out["notes"].append("the Random Survival Forest trained on a seeded subsample: " + ", ".join(
                    f"{c} {f['rows']:,} of {f['of']:,} rows" for c, f in sorted(sub.items())))
            out["events"]["baseline_rsf"] = {"cindex_ipcw_average": baseline["cindex_ipcw_average"],
                                             "cindex_ipcw_metastasis": baseline["cindex_ipcw_metastasis"],
                                             "cindex_ipcw": baseline["cindex_ipcw"], "fit": rsf_fit,
                                             "training_rows_max": RSF_MAX_ROWS}
    return out


def _mae(pairs) -> float | None:
    errors = [abs(a - b) for a, b in pairs if a is not None]
    return float(np.mean(errors)) if errors else None


#: the filled share of forecast points from which a ratio row is marked (!)
FILLED_WARN = 0.5


def summary_table(metrics: dict) -> str:
    """The markdown table of ``summary.md`` (also printed): metric, this model, baselines, GDT's
    published value (the paper's, on its own data), n."""
    gdt, ev = metrics.get("gdt", {}), metrics["events"]
    fc, ge = gdt.get("forecasting", {}), gdt.get("events", {})

    def f(x):
        return "–" if x is None else f"{x:.3f}"

    def share(filled: int) -> float:  # of the forecast points
        return filled / max(fc.get("points", 0), 1)

    def ratio(x, filled: int) -> str:  # a ratio of mostly filled points compares copy-forward with itself
        return "–" if x is None else f"{x:.3f} ({share(filled):.0%} filled){' (!)' if share(filled) >= FILLED_WARN else ''}"

    filled, greedy_filled = fc.get("filled", 0), fc.get("greedy", {}).get("filled", 0)

    auroc = ev.get("auroc", {}).get("all", {}).get("all", {})
    ci = auroc.get("ci95")
    base = ev.get("baseline_majority", {})
    rsf, majority = ge.get("baseline_rsf", {}), ge.get("baseline_majority", {})
    n_cindex = sum(n for weeks in ge.get("n", {}).values() for n in weeks.values())
    cells = [(c, w) for c, weeks in ge.get("cindex_ipcw", {}).items() for w in weeks]
    few = ge.get("few_pairs", [])
    lines = [f"prompt: {gdt.get('prompt', 'training')}", "",
             "| metric | this model | copy-forward | majority | RSF | GDT (paper, its own data) | n |",
             "|---|---|---|---|---|---|---|",
             f"| forecasting: median MAE ratio to copy-forward (mean of draws) | "
             f"{ratio(fc.get('median_ratio'), filled)} | "
             f"{f(fc.get('copy_forward', {}).get('median_ratio'))} | – | – | {PUBLISHED['forecasting_median_ratio']} "
             f"(best baseline {PUBLISHED['forecasting_best_baseline']}) | {len(fc.get('per_variable', {}))} cells, "
             f"{fc.get('points', 0)} points |",
             f"| forecasting: the same, 30 most frequent variables | "
             f"{ratio(fc.get('median_ratio_top30'), filled)} | "
             f"{f(fc.get('copy_forward', {}).get('median_ratio'))} | – | – | {PUBLISHED['forecasting_median_ratio_top30']} | |",
             f"| forecasting: median ratio, greedy answer | "
             f"{ratio(fc.get('greedy', {}).get('median_ratio'), greedy_filled)} | | | | | |",
             f"| events: IPCW C-index, mean over death, progression, next line of therapy | "
             f"{f(ge.get('cindex_ipcw_average'))} | – | {f(majority.get('cindex_ipcw_average'))} | "
             f"{f(rsf.get('cindex_ipcw_average'))} | "
             f"{PUBLISHED['events_cindex_average']} (RSF {PUBLISHED['events_rsf_cindex_average']}) | {n_cindex} tasks, "
             f"{len(cells) - len(few)} of {len(cells)} cells |",
             f"| events: IPCW C-index, next metastasis | {f(ge.get('cindex_ipcw_metastasis'))} | – | "
             f"{f(majority.get('cindex_ipcw_metastasis'))} | "
             f"{f(rsf.get('cindex_ipcw_metastasis'))} | – | |",
             f"| events: AUROC of P(occurred), uncensored | {f(auroc.get('auroc'))}"
             f"{f' (95% CI {ci[0]:.3f}-{ci[1]:.3f})' if ci else ''} | – | – | – | – | {auroc.get('tasks', 0)} tasks |",
             f"| events: accuracy | {f(ev.get('accuracy'))} | – | {f(base.get('accuracy'))} | – | – | "
             f"{ev.get('tasks', 0)} tasks |"]
    if max(share(filled), share(greedy_filled)) >= FILLED_WARN:
        lines.append("\nnote: (!) most forecast points were unparseable or missing in the answers and were filled from "
                     "the model's earlier point or copy-forward: such a ratio (near 1.000) says little about the model")
    if few:
        lines.append(f"\nnote: {len(few)} of {len(cells)} C-index cells (indication, event, week) have fewer than "
                     f"{ge['min_comparable_pairs']} comparable pairs and are left out of the C-index averages (below)")
    if cells:
        lines += ["", "IPCW C-index per cell (in the averages with at least "
                  f"{ge.get('min_comparable_pairs')} comparable pairs):", "",
                  "| indication | event | week | C-index | comparable pairs | tasks | in the average |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {c.split('|')[0]} | {c.split('|')[1]} | {w} | {f(ge['cindex_ipcw'][c][w])} | {ge['pairs'][c][w]} | "
                  f"{ge['n'][c][w]} | {'no' if f'{c}|{w}' in few else 'yes'} |" for c, w in cells]
    lines += [f"\nnote: {n}" for n in gdt.get("notes", [])]
    left_out = (ev.get("scoring", {}).get("samples_too_long", 0), metrics["forecasting"].get("samples_too_long", 0))
    if any(left_out):
        lines.append(f"\nnote: left out, longer than the model's context (max_seq_len): {left_out[0]} samples of event "
                     f"scoring, {left_out[1]} of forecasting (the model never saw longer inputs; training drops them too)")
    return "\n".join(lines)

"""Synthetic cancer-patient cohort serialized into TwinWeaver-format JSONL (docs/data-format.md §1–3).

Nothing here is real patient data: every patient, lab value and event is drawn from a seeded
random generator. Usage::

    python -m gdt_tune.data.synthetic --patients 200 --out data/synth --seed 0 [--splits-per-lot 10] [--event-weeks 8,26,52,104]

writes ``DIR/{train,validation,test}/part-NNNNN.jsonl``, split by patient. Each sample's
``meta.target_meta`` records the exact targets drawn with the converter's fields (events:
``censoring``, ``occurred``, ``target_category``, ``target_name``, ``date_event_occured``,
``delta_time_numeric``; forecasts: ``dates_to_forecast``, ``future_weeks_per_variable``,
``target_data_processed``, ...), so tests can check the answer text. The text is the converter's,
verbatim (``gdt_tune.data.text``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from gdt_tune.data.text import (
    DEMOGRAPHICS_HEADER,
    EVENT,
    EVENT_CATEGORIES,
    FIRST_VISIT_HEADER,
    FORECASTING,
    FORECASTING_QA,
    PREAMBLE,
    drop_oldest_visits,
    event_answer,
    event_prompt,
    fmt_number,
    forecast_prompt,
    genetic_lines,
    later_visit_header,
    qa_prompt,
    summary_block,
    task_header,
    task_list,
    visit_block,
    visit_spans,
)

# (name, LOINC code, population mean, population sd)
LABS = [
    ("hemoglobin", "718-7", 12.5, 1.8),
    ("leukocytes", "6690-2", 7.2, 2.5),
    ("platelets", "777-3", 250.0, 70.0),
    ("neutrophils", "751-8", 4.6, 1.9),
    ("lymphocytes", "731-0", 1.8, 0.7),
    ("creatinine", "2160-0", 0.95, 0.3),
    ("albumin", "1751-7", 3.9, 0.5),
    ("alanine aminotransferase", "1742-6", 24.0, 12.0),
    ("aspartate aminotransferase", "1920-8", 25.0, 11.0),
    ("alkaline phosphatase", "6768-6", 95.0, 40.0),
    ("bilirubin total", "1975-2", 0.6, 0.3),
    ("sodium", "2951-2", 139.0, 3.0),
    ("potassium", "2823-3", 4.2, 0.4),
    ("calcium", "17861-6", 9.3, 0.5),
    ("glucose", "2345-7", 110.0, 25.0),
    ("lactate dehydrogenase", "2532-0", 210.0, 80.0),
    ("carcinoembryonic antigen", "2039-6", 6.0, 5.0),
    ("protein total", "2885-2", 6.9, 0.6),
    ("urea nitrogen", "3094-0", 16.0, 6.0),
    ("chloride", "2075-0", 102.0, 3.0),
    ("hematocrit", "4544-3", 38.0, 5.0),
    ("monocytes", "742-7", 0.6, 0.25),
]
INDICATIONS = [
    "enhanced_" + x
    for x in (
        "nsclc sclc crc breast prostate pancreatic gastric bladder renal melanoma ovarian "
        "endometrial hcc headneck mcl cll dlbcl follicular multiplemyeloma esophageal"
    ).split()
]
REGIMENS = [
    ["carboplatin", "pemetrexed"], ["pembrolizumab"], ["carboplatin", "paclitaxel"],
    ["docetaxel"], ["osimertinib"], ["nivolumab", "ipilimumab"], ["folfox"],
    ["bevacizumab", "capecitabine"], ["gemcitabine", "cisplatin"], ["atezolizumab"],
]
GENES = ["EGFR", "KRAS", "ALK", "BRAF", "TP53", "PIK3CA", "ERBB2", "ROS1"]
EVENT_NAMES = list(EVENT_CATEGORIES)
QA_LETTERS = "abcde"
SPLIT_WINDOW_DAYS = 90
FORECAST_WINDOW_DAYS = 90
DEFAULT_TOKEN_BUDGET = 8192 - 200


def estimate_tokens(text: str) -> int:
    """Llama 3 tokens of this text, estimated: digits cost ~1.3 tokens each, other characters
    ~0.22 (a least-squares fit to Meta's tokenizer on synthetic samples, within 5%), plus 5% so that
    a sample budgeted at 8192 - 200 fits the 8000-token cap as the converter's do. The generator's
    budget only; the dataset builder counts exact tokens."""
    digits = sum(map(text.count, "0123456789"))
    return (137 * digits + 24 * (len(text) - digits)) // 100 + 1


def lab_label(lab) -> str:
    return f"{lab[0]} - {lab[1]}"


def qa_bins(lab) -> list[float]:
    """Four edges splitting a lab's population range into bins a-e, each (low, high]."""
    _, _, mean, sd = lab
    return [round(mean + k * sd, 2) for k in (-1.5, -0.5, 0.5, 1.5)]


def qa_letter(lab, value: float) -> str:
    return QA_LETTERS[sum(value > edge for edge in qa_bins(lab))]


@dataclass
class Visit:
    date: dt.date
    lines: list[str] = field(default_factory=list)
    rows: list[tuple[str, str, str]] = field(default_factory=list)  # (category, name, value)
    labs: dict[str, float] = field(default_factory=dict)  # lab label -> value


@dataclass
class Patient:
    patientid: str
    indication: str
    demographics: list[tuple[str, str]]
    visits: list[Visit]
    lots: list[tuple[dt.date, list[str]]]
    genetics: list[tuple[str, str]]
    progressions: list[dt.date]
    metastases: list[dt.date]
    death: dt.date | None


def simulate_patient(rng: random.Random, patientid: str) -> Patient:
    """One patient's timeline: diagnosis visit with genetics, 1–3 lines of therapy, visits every
    1–4 weeks with drifting labs, ECOG, progressions, metastases and maybe death."""
    start = dt.date(2014, 1, 1) + dt.timedelta(days=rng.randrange(2500))
    n_visits = rng.randint(12, 60)
    dates = [start]
    for _ in range(n_visits - 1):
        dates.append(dates[-1] + dt.timedelta(weeks=rng.randint(1, 4)))

    n_lots = rng.randint(1, 3)
    lot_visits = sorted(rng.sample(range(1, n_visits - 1), min(n_lots, n_visits - 2)))
    lots = [(dates[i], rng.choice(REGIMENS)) for i in lot_visits]
    progressions = [dates[i - 1] for i in lot_visits[1:]]
    if rng.random() < 0.5:
        progressions.append(dates[rng.randrange(1, n_visits)])
    metastases = [dates[rng.randrange(1, n_visits)]] if rng.random() < 0.4 else []
    death = dates[-1] + dt.timedelta(weeks=rng.randint(1, 8)) if rng.random() < 0.4 else None

    labs = rng.sample(LABS, rng.randint(5, 20))
    baseline = {lab_label(lab): lab[2] + lab[3] * rng.gauss(0, 0.5) for lab in labs}
    drift = {lab_label(lab): lab[3] * rng.gauss(0, 0.03) for lab in labs}
    genetics = [(g, rng.choice(["positive", "negative"])) for g in sorted(rng.sample(GENES, rng.randint(2, 4)))]
    if rng.random() < 0.2:
        genetics = []  # "No genetic data available."

    visits = []
    for i, date in enumerate(dates):
        v = Visit(date)
        if i == 0 and genetics:
            v.lines += genetic_lines(genetics)
            v.rows += [("genetic", g, r) for g, r in genetics]
        lot_no = sum(1 for d, _ in lots if d <= date)
        if lot_no and lots[lot_no - 1][0] == date:
            regimen = lots[lot_no - 1][1]
            value = f"{lot_no} ({', '.join(regimen)})"
            v.lines.append(f"\tline of therapy is {value}")
            v.rows.append(("lot", "line of therapy", value))
        if lot_no:
            for drug in lots[lot_no - 1][1]:
                if rng.random() < 0.7:
                    v.lines.append(f"\tdrug {drug} is administered")
                    v.rows.append(("drug", drug, "administered"))
        weeks = (date - start).days / 7
        for lab in labs:
            if rng.random() < 0.7:
                name = lab_label(lab)
                raw = baseline[name] + drift[name] * weeks + rng.gauss(0, 0.15 * lab[3])
                value = round(min(max(raw, lab[2] - 3 * lab[3]), lab[2] + 3 * lab[3]), 2)
                v.labs[name] = value
                v.lines.append(f"\t{name} is {fmt_number(value)}")
                v.rows.append(("lab", name, fmt_number(value)))
        if rng.random() < 0.3:
            ecog = str(rng.randint(0, 3))
            v.lines.append(f"\tECOG is {ecog}")
            v.rows.append(("ecog", "ECOG", ecog))
        if date in progressions:
            v.lines.append("\tprogression is progressive disease")
            v.rows.append(("progression", "progression", "progressive disease"))
        if date in metastases:
            site = rng.choice(["liver", "bone", "brain", "lung"])
            v.lines.append(f"\tmetastasis is {site}")
            v.rows.append(("metastasis", "metastasis", site))
        if not v.lines:
            v.lines.append("\tECOG is 1")
            v.rows.append(("ecog", "ECOG", "1"))
        visits.append(v)
    if death is not None:
        visits.append(Visit(death, ["\tdeath"], [("death", "death", "death")]))

    demographics = [  # the converter ends with the age
        ("gender", rng.choice(["female", "male"])),
        ("smoking status", rng.choice(["never", "former", "current"])),
        ("age of patient", f"{rng.randint(35, 88)} years"),
    ]
    indication = rng.choice(INDICATIONS)
    return Patient(patientid, indication, demographics, visits, lots, genetics,
                   sorted(set(progressions)), metastases, death)


def split_dates(rng: random.Random, p: Patient, n: int) -> list[tuple[dt.date, dt.date]]:
    """``n`` split dates per line of therapy, drawn with replacement, as (lot_date, split_date).

    Candidates are the distinct visit dates within 90 days after the LoT start; a date in two
    windows goes to the nearest (latest) LoT; death dates are excluded.
    """
    out = []
    starts = [d for d, _ in p.lots]
    for j, lot_date in enumerate(starts):
        end = lot_date + dt.timedelta(days=SPLIT_WINDOW_DAYS)
        nxt = starts[j + 1] if j + 1 < len(starts) else None
        candidates = sorted({
            v.date for v in p.visits
            if lot_date <= v.date <= end and v.date != p.death and (nxt is None or v.date < nxt)
        })
        if candidates:
            out += [(lot_date, rng.choice(candidates)) for _ in range(n)]
    return out


def _event_date(p: Patient, name: str, split: dt.date) -> dt.date | None:
    if name == "death":
        return p.death
    dates = {"next progression": p.progressions, "next metastasis": p.metastases,
             "next line of therapy": [d for d, _ in p.lots]}[name]
    return next((d for d in sorted(dates) if d > split), None)


def event_outcome(p: Patient, name: str, split: dt.date, weeks: int) -> tuple[bool, bool]:
    """(censored, occurred) of an event within ``weeks`` after the split date."""
    horizon = split + dt.timedelta(weeks=weeks)
    when = _event_date(p, name, split)
    if when is not None and split < when <= horizon:
        return False, True
    followed_to = dt.date.max if p.death is not None else p.visits[-1].date
    return followed_to < horizon, False


def _forecast_visits(future, names, split) -> list[tuple[dt.date, float, dict[str, float]]]:
    """Target visits for ``names``: (date, weeks since the previous target visit, values)."""
    out, prev = [], split
    for v in future:
        values = {n: v.labs[n] for n in names if n in v.labs}
        if values:
            out.append((v.date, round((v.date - prev).days / 7, 2), values))
            prev = v.date
    return out


def _weeks_per_variable(targets, names) -> dict[str, list[float]]:
    """Cumulative weeks from the split date at which each variable has a target."""
    out = {name: [] for name in names}
    cumulative = 0.0
    for _, delta, values in targets:
        cumulative += delta
        for name in values:
            out[name].append(round(cumulative, 2))
    return out


def _table(columns: list[str], rows: list[list]) -> str:
    """A pandas JSON table (orient=split), as the converter stores its tables in ``meta``."""
    return json.dumps({"columns": columns, "index": list(range(len(rows))), "data": rows})


def _forecast_task(kind, names, targets, history_last, lot_date) -> tuple[dict, str]:
    """(target_meta, answer body) of a forecasting or forecasting QA task, with the converter's fields."""
    labs = {lab_label(lab): lab for lab in LABS}
    weeks = _weeks_per_variable(targets, names)
    shown = [(date, delta, {n: qa_letter(labs[n], x) if kind == FORECASTING_QA else x for n, x in vals.items()})
             for date, delta, vals in targets]
    body = "\n".join(
        visit_block(later_visit_header(delta), [f"\t{n} is {v if isinstance(v, str) else fmt_number(v)}"
                                                for n, v in vals.items()])
        for _, delta, vals in shown)
    meta = {"task_type": f"{kind}:", "lot_date": lot_date.isoformat(),
            "dates_to_forecast": [date.isoformat() for date, _, _ in targets],
            "future_weeks_to_forecast": sorted({w for ws in weeks.values() for w in ws}),
            "future_weeks_per_variable": weeks, "variable_name_mapping": {n: n for n in names},
            "target_data_raw": _table(["date", "event_name", "event_value"],
                                      [[d.isoformat(), n, x] for d, _, vals in targets for n, x in vals.items()]),
            "target_data_processed": _table(["date", "event_name", "event_value"],
                                            [[d.isoformat(), n, x] for d, _, vals in shown for n, x in vals.items()]),
            "last_observed_values": _table(["event_name", "event_value"], [[n, history_last[n]] for n in names])}
    if kind == FORECASTING_QA:
        meta["category_splits"] = {n: qa_bins(labs[n]) for n in names}
    return meta, body


def _event_task(p: Patient, name: str, split: dt.date, weeks: int) -> tuple[dict, str]:
    """(target_meta, answer body) of an event task: the converter's fields, with (time, event) =
    (``delta_time_numeric`` weeks to ``date_event_occured``, ``occurred``)."""
    censored, occurred = event_outcome(p, name, split, weeks)
    when = _event_date(p, name, split)
    end_of_data = p.death if p.death is not None else p.visits[-1].date
    date = when if when is not None and (occurred or not censored) else end_of_data
    answer = event_answer(name, censored, occurred)
    # Like the original converter, event tasks carry no lot_date.
    meta = {"task_type": f"{EVENT}:", "target_name": name, "target_category": EVENT_CATEGORIES[name],
            "censoring": censored, "occurred": occurred,
            "censoring_detail": "end of data before the horizon" if censored else None,
            "split_date_included_in_input": split.isoformat(), "date_event_occured": date.isoformat(),
            "delta_time_numeric": round((date - split).days / 7, 2), "target_string": answer}
    return meta, answer + "\n"


def make_sample(rng: random.Random, p: Patient, split_name: str, lot_date: dt.date,
                split: dt.date, token_budget: int, event_weeks: list[int] | None = None) -> dict:
    """One TwinWeaver sample for the split date ``split``, in the converter's exact wording
    (``gdt_tune.data.text``). ``event_weeks``: draw each event horizon from these weeks (a landmark
    test set, as GDT's) instead of 1-104."""
    history = [v for v in p.visits if v.date <= split]
    next_lot = next((d for d, _ in p.lots if d > split), dt.date.max)
    window_end = min(split + dt.timedelta(days=FORECAST_WINDOW_DAYS), next_lot - dt.timedelta(days=1))
    future = [v for v in p.visits if split < v.date <= window_end and v.labs]
    observed = {n for v in history for n in v.labs}
    forecastable = sorted({n for v in future for n in v.labs} & observed)
    last = {n: v.labs[n] for v in history for n in v.labs}

    tasks = []  # (type, details, target_meta, answer body)
    event_only = not forecastable or rng.random() < 0.5
    if not event_only:
        kinds = [k for k in (FORECASTING, FORECASTING_QA) if rng.random() < 0.7] or [FORECASTING]
        for kind in kinds:
            names = rng.sample(forecastable, min(len(forecastable), rng.randint(1, 3)))
            names.sort(key=forecastable.index)
            meta, body = _forecast_task(kind, names, _forecast_visits(future, names, split), last, lot_date)
            tasks.append((kind, names, meta, body))
    n_events = rng.randint(1, 4) if event_only else rng.randint(0, 4)
    for name in rng.sample(EVENT_NAMES, n_events):
        weeks = rng.choice(event_weeks) if event_weeks else rng.randint(1, 104)
        meta, body = _event_task(p, name, split, weeks)
        tasks.append((EVENT, (name, weeks), meta, body))
    rng.shuffle(tasks)

    prompts = []
    for number, (kind, details, meta, _) in enumerate(tasks, start=1):
        if kind == EVENT:
            prompts.append(event_prompt(number, *details))
        elif kind == FORECASTING:
            prompts.append(forecast_prompt(number, meta["future_weeks_per_variable"]))
        else:
            prompts.append(qa_prompt(number, meta["future_weeks_per_variable"], meta["category_splits"]))
    answer = "".join(f"{task_header(i + 1, kind)}\n{body}\n" for i, (kind, _, _, body) in enumerate(tasks))

    demo = DEMOGRAPHICS_HEADER + "\n" + ",\n".join(f"\t{k} is {v}" for k, v in p.demographics) + ".\n"
    visits_text = "\n".join(
        visit_block(FIRST_VISIT_HEADER if i == 0 else
                    later_visit_header((v.date - history[i - 1].date).days / 7), v.lines)
        for i, v in enumerate(history))
    forecast_names = dict.fromkeys(n for kind, details, _, _ in tasks if kind != EVENT for n in details)
    summary = summary_block(p.genetics, ", ".join(next(r for d, r in reversed(p.lots) if d <= split)),
                            {n: fmt_number(last[n]) for n in forecast_names})
    instruction = PREAMBLE + "\n\n" + demo + "\n" + visits_text + summary + task_list(prompts)

    # Trim the oldest visits (never the first) until the estimate fits the budget.
    spans, full = visit_spans(instruction), instruction
    answer_tokens, dropped = estimate_tokens(answer), 0
    while estimate_tokens(instruction) + answer_tokens > token_budget and dropped < len(spans) - 1:
        dropped += 1
        instruction = drop_oldest_visits(full, dropped, spans)

    rows = [[p.patientid, _epoch_ms(v.date), c, n, x] for v in history for c, n, x in v.rows]
    return {
        "instruction": instruction,
        "answer": answer,
        "meta": {
            "patientid": p.patientid,
            "indication": p.indication,
            "split": split_name,
            "split_date_included_in_input": split.isoformat(),
            "target_meta": [m for _, _, m, _ in tasks],
            "history_data": _table(["patientid", "date", "event_category", "event_name", "event_value"], rows),
            "constant": _table(["patientid", "indication"] + [k for k, _ in p.demographics],
                               [[p.patientid, p.indication] + [v for _, v in p.demographics]]),
            "num_tokens_instruction": estimate_tokens(instruction),
            "num_tokens_answer": estimate_tokens(answer),
        },
    }


def _epoch_ms(d: dt.date) -> int:
    return int(dt.datetime(d.year, d.month, d.day, tzinfo=dt.timezone.utc).timestamp() * 1000)


def assign_splits(n_patients: int, rng: random.Random) -> list[str]:
    """10% validation, 10% test (at least one each from 3 patients on), the rest train."""
    order = list(range(n_patients))
    rng.shuffle(order)
    n_held = max(1, n_patients // 10) if n_patients >= 3 else 0
    names = ["train"] * n_patients
    for k, i in enumerate(order[: 2 * n_held]):
        names[i] = "validation" if k < n_held else "test"
    return names


def generate_cohort(n_patients: int, seed: int, splits_per_lot: int = 10,
                    token_budget: int = DEFAULT_TOKEN_BUDGET, event_weeks: list[int] | None = None):
    """Yield (split name, sample) for a whole cohort; deterministic for ``seed``. ``event_weeks``:
    every event horizon one of these weeks (a landmark set, e.g. [8, 26, 52, 104])."""
    splits = assign_splits(n_patients, random.Random(seed))
    for i in range(n_patients):
        rng = random.Random(seed * 1_000_003 + i)
        patient = simulate_patient(rng, f"SYN{seed:04d}-{i:06d}")
        n = splits_per_lot if splits[i] == "train" else 1
        for lot_date, split in split_dates(rng, patient, n):
            yield splits[i], make_sample(rng, patient, splits[i], lot_date, split, token_budget, event_weeks)


def write_cohort(out: str | Path, n_patients: int, seed: int, splits_per_lot: int = 10,
                 token_budget: int = DEFAULT_TOKEN_BUDGET, shard_size: int = 5000,
                 event_weeks: list[int] | None = None) -> dict[str, int]:
    """Write ``out/{train,validation,test}/part-NNNNN.jsonl``; returns samples per split."""
    out = Path(out)
    counts = {"train": 0, "validation": 0, "test": 0}
    handles = {}
    try:
        for split, sample in generate_cohort(n_patients, seed, splits_per_lot, token_budget, event_weeks):
            shard = counts[split] // shard_size
            if (split, shard) not in handles:
                path = out / split / f"part-{shard:05d}.jsonl"
                path.parent.mkdir(parents=True, exist_ok=True)
                handles[(split, shard)] = open(path, "w", encoding="utf-8")
            handles[(split, shard)].write(json.dumps(sample, ensure_ascii=False) + "\n")
            counts[split] += 1
    finally:
        for h in handles.values():
            h.close()
    for split in counts:  # an empty split still gets its folder
        (out / split).mkdir(parents=True, exist_ok=True)
    return counts


def _weeks_list(text: str) -> list[int]:
    try:
        weeks = [int(w) for w in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected whole weeks separated by commas, e.g. 8,26,52,104") from None
    if not weeks or min(weeks) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: weeks must be 1 or more")
    return weeks


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m gdt_tune.data.synthetic", description=__doc__.split("\n")[0])
    ap.add_argument("--patients", type=int, required=True, help="number of synthetic patients")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--splits-per-lot", type=int, default=10, help="training split dates per line of therapy")
    ap.add_argument("--token-budget", type=int, default=DEFAULT_TOKEN_BUDGET,
                    help="estimated tokens for instruction + answer; oldest visits are cut to fit")
    ap.add_argument("--event-weeks", type=_weeks_list, default=None, metavar="W,W,...",
                    help="every event horizon one of these weeks (GDT's landmark test set: 8,26,52,104); default 1-104")
    args = ap.parse_args(argv)
    counts = write_cohort(args.out, args.patients, args.seed, args.splits_per_lot, args.token_budget,
                          event_weeks=args.event_weeks)
    print(f"wrote {sum(counts.values())} samples to {args.out}: " +
          ", ".join(f"{k} {v}" for k, v in counts.items()))


if __name__ == "__main__":
    main()

"""``gdt-tune data-report``: what a dataset holds, read the way training reads it, before the
expensive run. Counts only: no sample text and no patient ids in the report.

    gdt-tune data-report --data DATA/train --data DATA/validation --tokenizer MODEL/original/tokenizer.model --out report/

``--data`` may repeat, or be a folder with train/validation/test subfolders. The files are read
in 32 MB pieces by all CPUs; memory grows with patients and, by a few tens of bytes, with samples
(their lengths, for the expected rank balance).
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import numpy as np

from gdt_tune.data.answers import parse_answer
from gdt_tune.data.layout import DEFAULT_MAX_SEQ_LEN, Layout, apply_cap, system_prompt_or_default
from gdt_tune.data.records import (
    default_index_workers,
    lot_of,
    map_chunks,
    patient_of,
    read_chunk,
    resolve_data_files,
)
from gdt_tune.runtime.files import check_output_folder, write_atomically
from gdt_tune.training.prefix_trees import sharing_line
from gdt_tune.training.sampling import expected_rank_balance

BINS = 40


def splits_of(data: list[str]) -> dict[str, list[Path]]:
    """``{split name: files}``, one split per ``--data`` argument, named by that argument (two
    files called part-00000.jsonl in different folders are two splits); a folder with
    train/validation/test subfolders gives those splits (named ``train`` etc. when it is the only
    argument, else ``ARG/train``)."""
    out: dict[str, list[Path]] = {}
    for spec in data:
        sub = [Path(spec) / s for s in ("train", "validation", "test") if (Path(spec) / s).is_dir()]
        for empty in (s for s in sub if not any(s.glob("*.jsonl"))):
            print(f"note: --data {spec}: {empty} holds no *.jsonl files; it is left out of the report",
                  file=sys.stderr)
        named = [(s.name if len(data) == 1 else f"{spec.rstrip('/')}/{s.name}", str(s))
                 for s in sub if any(s.glob("*.jsonl"))] if sub else [(spec.rstrip("/") or spec, spec)]
        for name, files in named:
            if name in out:
                raise ValueError(f"--data {spec}: given twice")
            out[name] = resolve_data_files(files, "--data")
    return out


def _chunk_stats(path: Path, start: int, end: int, first_line: int, layout: Layout, cap: int) -> dict:
    edges = np.linspace(0, 2 * cap, BINS + 1)
    st = {"samples": 0, "lengths": np.zeros(BINS + 1, dtype=np.int64), "tasks": Counter(), "events": Counter(),
          "policy": Counter(), "groups": Counter(), "patients": set(), "no_patient": 0, "no_lot": 0,
          "unparseable": 0, "tokens": 0, "sample_lengths": []}
    for _, _, _, where, record in read_chunk(path, start, end, first_line):
        st["samples"] += 1
        prompt, answer = layout.prompt_tokens(record["instruction"]), layout.answer_tokens(record["answer"])
        n = len(prompt) + len(answer)
        st["tokens"] += n
        st["sample_lengths"].append(min(n, cap))
        st["lengths"][min(np.searchsorted(edges, n, side="right") - 1, BINS)] += 1
        if n > cap:
            for policy in ("gdt", "drop", "history"):
                status = apply_cap(layout, record["instruction"], record["answer"], cap, policy)[2]
                st["policy"][(policy, "dropped" if status.dropped else "cut")] += 1
        try:
            for task in parse_answer(record["answer"]):
                st["tasks"][task.type] += 1
                if task.event:
                    st["events"][task.event] += 1
        except ValueError:
            st["unparseable"] += 1
        pid = patient_of(record, where)
        if pid is None:
            st["no_patient"] += 1
            continue
        st["patients"].add(pid)
        try:
            st["groups"][(pid, lot_of(record, where))] += 1
        except ValueError:
            st["no_lot"] += 1
    return st


def _merge(parts: list[dict]) -> dict:
    out = parts[0]
    for p in parts[1:]:
        for k, v in p.items():
            out[k] = out[k] | v if isinstance(v, set) else out[k] + v
    return out


def _file_name(split: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in split).strip("_.") or "split"


def split_stats(files: list[Path], layout: Layout, cap: int, workers: int, desc: str) -> dict:
    return _merge([st for _, st in map_chunks(files, _chunk_stats, (layout, cap), workers, desc)])


def data_report(data: list[str], tokenizer, out, max_seq_len: int = DEFAULT_MAX_SEQ_LEN, system_prompt: str | None = None,
                workers: int | None = None, world_size: int = 8) -> dict:
    """Write ``report.md`` and PNGs under ``out``; returns the numbers. ``world_size``: the ranks
    of the expected rank balance (random vs length-balanced steps, on the training split)."""
    from gdt_tune.eval.plots import bar_chart, length_histogram

    out = Path(out)
    check_output_folder(out)  # before the data is read
    out.mkdir(parents=True, exist_ok=True)
    layout = Layout.build(tokenizer, system_prompt_or_default(system_prompt))
    splits = splits_of(data)
    stats = {name: split_stats(files, layout, max_seq_len, workers or default_index_workers(), f"reading {name}")
             for name, files in splits.items()}
    edges = list(np.linspace(0, 2 * max_seq_len, BINS + 1)) + [float("inf")]
    lines = ["# Data report", "", f"Tokens counted in the training layout (system prompt, headers, answer), cap "
             f"{max_seq_len}. Counts only: no sample text, no patient ids.", "",
             "| split | files | samples | patients | samples per (patient, LoT): median / max | tokens: mean | "
             "over the cap | unparseable answers |", "|---|---|---|---|---|---|---|---|"]
    numbers = {}
    for name, st in stats.items():
        per_group = sorted(st["groups"].values())
        over = st["policy"][("drop", "dropped")]  # "drop" drops exactly the samples over the cap
        numbers[name] = {"files": len(splits[name]), "samples": st["samples"], "patients": len(st["patients"]),
                         "samples_per_patient_lot_median": per_group[len(per_group) // 2] if per_group else None,
                         "samples_per_patient_lot_max": per_group[-1] if per_group else None,
                         "mean_tokens": st["tokens"] / max(st["samples"], 1), "over_cap": over,
                         "unparseable_answers": st["unparseable"], "tasks": dict(st["tasks"]),
                         "events": dict(st["events"]),
                         "policies": {f"{p} {k}": v for (p, k), v in sorted(st["policy"].items())},
                         "without_patientid": st["no_patient"], "without_lot": st["no_lot"]}
        n = numbers[name]
        lines.append(f"| {name} | {n['files']} | {n['samples']:,} | {n['patients']:,} | "
                     f"{n['samples_per_patient_lot_median']} / {n['samples_per_patient_lot_max']} | "
                     f"{n['mean_tokens']:,.0f} | {over:,} | {n['unparseable_answers']:,} |")
        length_histogram(st["lengths"][:-1], edges[:-1], max_seq_len, out / f"lengths_{_file_name(name)}.png")
    lines += ["", "## Length cap: samples each truncation policy would cut or drop", "",
              "| split | gdt: cut | gdt: dropped | drop: dropped | history: trimmed | history: dropped |",
              "|---|---|---|---|---|---|"]
    for name, st in stats.items():
        p = st["policy"]
        lines.append(f"| {name} | {p[('gdt', 'cut')]:,} | {p[('gdt', 'dropped')]:,} | {p[('drop', 'dropped')]:,} | "
                     f"{p[('history', 'cut')]:,} | {p[('history', 'dropped')]:,} |")
    lines += ["", "## Task mix", "", "| split | " + " | ".join(["forecasting", "forecasting QA", "time to event prediction"])
              + " | events: " + ", ".join(sorted({e for st in stats.values() for e in st["events"]})) + " |",
              "|---|---|---|---|---|"]
    for name, st in stats.items():
        t = st["tasks"]
        lines.append(f"| {name} | {t['forecasting']:,} | {t['forecasting QA']:,} | {t['time to event prediction']:,} | "
                     + ", ".join(f"{st['events'][e]:,}" for e in sorted(st["events"])) + " |")
    total_tasks = sum((st["tasks"] for st in stats.values()), Counter())
    bar_chart(list(total_tasks), list(total_tasks.values()), "tasks (all splits)", out / "task_mix.png")
    lines += ["", "## Patient overlap between splits (must be 0)", "", "| splits | shared patients |", "|---|---|"]
    names = list(stats)
    overlap = {}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            shared = len(stats[a]["patients"] & stats[b]["patients"])
            overlap[f"{a}/{b}"] = shared
            lines.append(f"| {a} / {b} | {shared:,}{'  **NOT ZERO**' if shared else ''} |")
    train = "train" if "train" in stats else names[0]
    random_order, balanced = expected_rank_balance(stats[train]["sample_lengths"], world_size)
    balance_line = f"rank balance at {world_size} ranks: random {random_order:.2f}, balanced {balanced:.2f}"
    lines += ["", f"## Rank balance ({train})", "", "The expected mean over steps of (each rank's work / the busiest "
              "rank's), one sample per rank, work = training FLOPs at the Llama-3.1-8B shape: in a random order, and "
              f"with `balanced_steps: true` (`balance_group: {world_size}`).", "", balance_line]
    sharing = {name: prefix_sharing(files, tokenizer, max_seq_len, system_prompt) for name, files in splits.items()}
    lines += ["", "## Prefix sharing (`packing: true`, `share_prefixes: true`)", "",
              f"The tokens a tree layout trains (a patient's samples as one trie, each shared prefix once; a trie longer "
              f"than a row of {max_seq_len} tokens is cut, each part repeating its prefix) against the separate samples, "
              "under the length cap (`truncation: gdt`; cut and dropped samples above). Training logs the same ratio "
              "(`prefix_sharing`).", "",
              *[f"- {name}: {sharing_line(s['tree_tokens'], s['sample_tokens'])}; one trie per patient, rows "
                f"unlimited: {s['one_trie_per_patient']:.2f}×" for name, s in sharing.items()]]
    lines += ["", "Plots: " + ", ".join(f"`lengths_{_file_name(n)}.png`" for n in names) + ", `task_mix.png`."]
    write_atomically(out / "report.md", "\n".join(lines) + "\n")
    return {"splits": numbers, "overlap": overlap, "prefix_sharing": sharing,
            "rank_balance": {"world_size": world_size, "random": random_order, "balanced": balanced}}


def prefix_sharing(files: list[Path], tokenizer, max_seq_len: int, system_prompt: str | None) -> dict:
    """The tree layout's tokens of one split, read as training reads it (``cgdb_instruct_dataset``,
    its index cache) and laid out as ``share_prefixes`` lays it out (``training.prefix_trees``)."""
    from gdt_tune.datasets import cgdb_instruct_dataset
    from gdt_tune.training.prefix_trees import prefix_trees

    ds = cgdb_instruct_dataset(tokenizer, data_files=[str(f) for f in files], system_prompt=system_prompt,
                               max_seq_len=max_seq_len, truncation="gdt")
    trees = prefix_trees(ds, show_progress=False)
    tree_tokens, sample_tokens = trees.sharing(max_seq_len)
    unlimited, _ = trees.sharing(2**62)
    return {"tree_tokens": tree_tokens, "sample_tokens": sample_tokens, "ratio": sample_tokens / max(tree_tokens, 1),
            "one_trie_per_patient": sample_tokens / max(unlimited, 1)}

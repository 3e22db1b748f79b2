"""Training throughput and MFU: our recipe with compile, activation checkpointing (full, op-level
selective), float8, length-balanced steps, packed rows and shared-prefix rows, against torchtune's
stock ``full_finetune_distributed`` in the same call. Random weights of the real architecture (no download).

    python bench/gpu_throughput.py                    # GPU: Llama-3.2-3B shape on each GPU of the node
    python bench/gpu_throughput.py --model 8b         # Llama-3.1-8B shape (one GPU: needs AC, ~63 GiB)
    python bench/gpu_throughput.py --model 8b --layers 8 --variants stock:compile,ours:compile
    python bench/gpu_throughput.py --model tiny       # CPU: the pipeline end to end with the demo model
    python bench/gpu_throughput.py --model 8b --lengths spread --variants stock:compile,ours:compile,ours:compile+pack+f8
    python bench/gpu_throughput.py --model tiny --lengths spread --variants ours:plain,ours:pack
    python bench/gpu_throughput.py --model tiny --lengths gdt --variants stock:plain,ours:tree

A variant is ``recipe:options`` with options joined by ``+``: ``compile``, ``ac`` (full activation
checkpointing), ``op`` (op-level selective), ``every2`` (every 2nd layer), ``f8`` (float8), ``bal``
(``balanced_steps``, groups of one sample per process), ``pack`` (``packing``: rows of ``--seq-len``
tokens), ``tree`` (``share_prefixes``: packed rows in which a patient's samples share their prefixes),
or ``plain``. Ours loads data with the 8B config's ``num_workers`` (2); stock in the main process.
MFU: ``gdt_tune.training.mfu`` (PaLM appendix B FLOPs; the GPU's dense bf16 peak looked up by its name).
``--lengths fixed``: every sample is exactly ``--seq-len`` tokens, so both recipes process the same
tokens per step. ``--lengths spread`` (the real job's shape): lengths drawn evenly from
``--seq-len``/8 to ``--seq-len`` (1k-8k at 8,192), answer-only labels, and exactly one epoch of
``steps x processes`` samples, so every variant trains the same samples. ``--lengths gdt``: a synthetic
GDT cohort in the converter's wording, ten split dates per patient and line of therapy (samples of a
patient share their history), cut at ``--seq-len``, one epoch; its prefix sharing is printed. With
spread or gdt lengths, throughput is the epoch's *separate-sample* tokens / (mean step time x steps
taken): packed and shared-prefix rows take fewer steps; "tokens trained" is what the rows held.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RECIPE, TINY_CONFIG, command_line, demo_tokenizer, launch, machine, median, step_times, table  # noqa: E402

STOCK = "bench/stock_full_finetune_cpu.py"
SHAPES = {
    "8b": dict(vocab_size=128_256, num_layers=32, num_heads=32, num_kv_heads=8, embed_dim=4096, max_seq_len=131072,
               intermediate_dim=14336, norm_eps=1e-5, rope_base=500000.0),
    "3b": dict(vocab_size=128_256, num_layers=28, num_heads=24, num_kv_heads=8, embed_dim=3072, max_seq_len=131072,
               intermediate_dim=8192, norm_eps=1e-5, rope_base=500000.0),
}


def random_hf_checkpoint(folder: Path, dims: dict, dtype, demo: Path) -> None:
    """Random weights of shape ``dims`` as HF safetensors shards (bf16 on GPU), plus the demo tokenizer."""
    import torch
    from safetensors.torch import save_file
    from torchtune.models.convert_weights import tune_to_hf
    from torchtune.models.llama3 import llama3

    from gdt_tune.cli.demo_assets import hf_config

    if (folder / "DONE").exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in tune_to_hf(llama3(**dims).state_dict(), num_heads=dims["num_heads"],
                                                    num_kv_heads=dims["num_kv_heads"], dim=dims["embed_dim"]).items()}
    device = "cuda" if torch.cuda.is_available() else "cpu"  # random numbers are much faster on a GPU
    gen = torch.Generator(device).manual_seed(0)
    shard, size, files = {}, 0, []

    def flush():
        name = f"model-{len(files) + 1:05d}-of-XXXXX.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        files.append(name)

    for key, shape in shapes.items():
        t = (torch.ones(shape, dtype=dtype) if "norm" in key
             else (torch.randn(shape, generator=gen, device=device) * 0.02).to(dtype).cpu())
        shard[key], size = t, size + t.numel() * t.element_size()
        if size > 4 * 2**30:
            flush()
            shard, size = {}, 0
    if shard:
        flush()
    final = [f.replace("XXXXX", f"{len(files):05d}") for f in files]
    for a, b in zip(files, final):
        (folder / a).rename(folder / b)
    (folder / "files.json").write_text(json.dumps(final))
    (folder / "config.json").write_text(json.dumps(hf_config(dims), indent=1))
    for name in ("tokenizer.model", "special_tokens.json"):
        shutil.copy(demo / "model" / name, folder / name)
    (folder / "DONE").write_text("")


def samples_of_lengths(tokenizer, targets: list[int]) -> list[dict]:
    """GDT samples cut (oldest history kept) to exactly ``targets[i]`` tokens in the spec layout."""
    from gdt_tune.data.layout import DEFAULT_SYSTEM_PROMPT, Layout
    from gdt_tune.data.synthetic import generate_cohort

    layout = Layout.build(tokenizer, DEFAULT_SYSTEM_PROMPT)
    fixed = len(layout.prompt_tokens(""))
    out, seed = [], 0
    while len(out) < len(targets):
        for _, s in generate_cohort(20, seed, 2, token_budget=40_000):
            total = targets[len(out)]
            answer = len(layout.answer_tokens(s["answer"]))
            ids = tokenizer.encode(s["instruction"].strip(), add_bos=False, add_eos=False)
            k = total - answer - fixed
            if k <= 0 or len(ids) < k + 50:
                continue
            for cut in range(k, k + 8):  # a cut may re-tokenize to a token more or less
                text = tokenizer.decode(ids[:cut])
                if len(layout.prompt_tokens(text)) + answer == total:
                    out.append({"instruction": text, "answer": s["answer"]})
                    break
            if len(out) == len(targets):
                break
        seed += 1
    return out


def fixed_length_samples(tokenizer, n: int, total: int) -> list[dict]:
    """``n`` GDT samples of exactly ``total`` tokens."""
    return samples_of_lengths(tokenizer, [total] * n)


def spread_samples(tokenizer, n: int, low: int, high: int, seed: int = 0) -> list[dict]:
    """``n`` GDT samples of lengths drawn evenly from ``low``..``high`` tokens (seeded)."""
    import random

    rng = random.Random(seed)
    return samples_of_lengths(tokenizer, [rng.randint(low, high) for _ in range(n)])


#: the 8B config's DataLoader workers per GPU (gdt_tune/configs/llama3_1_8b_gdt_full.yaml)
NUM_WORKERS = 2


def variant_overrides(who: str, opts: str, cuda: bool, nproc: int = 1) -> list[str]:
    """Config overrides of one variant (see the module docstring)."""
    parts = set(opts.split("+"))
    ac = bool(parts & {"ac", "op", "every2"})
    out = [f"compile={'compile' in parts}", f"enable_activation_checkpointing={ac}", f"log_peak_memory_stats={cuda}"]
    if who == "stock":
        if parts & {"op", "every2", "f8", "bal", "pack", "tree"}:
            raise SystemExit(f"variant stock:{opts}: the stock recipe runs only plain, compile and ac")
        return out + ["optimizer_in_bwd=false", "enable_activation_offloading=false"]
    if "op" in parts:
        out += ["ac_mode=selective", "ac_option=op"]
    if "every2" in parts:
        out += ["ac_mode=selective", "ac_option=2"]
    if "bal" in parts:
        out += ["balanced_steps=true", f"balance_group={nproc}"]
    if parts & {"pack", "tree"}:
        out += ["packing=true"]
    if "tree" in parts:
        out += ["share_prefixes=true"]
    return out + [f"float8={'f8' in parts}", f"num_workers={NUM_WORKERS}"]


def run_variants(model: str, variants: list[str], work: Path, seq: int, steps: int, nproc: int,
                 layers: int | None = None, lr: float | None = None, lengths: str = "fixed") -> tuple[str, list[list]]:
    """Run each variant; returns (a header describing the setup, table rows)."""
    import torch

    from gdt_tune.cli.demo_assets import TINY_MODEL
    from gdt_tune.training.mfu import decoder_flops_per_token, mfu, peak_tflops

    cuda = torch.cuda.is_available()
    tokenizer = demo_tokenizer(work)
    dims = dict(TINY_MODEL if model == "tiny" else SHAPES[model])
    if layers:
        dims["num_layers"] = layers
    ckpt = work / f"model_{model}_{dims['num_layers']}"
    random_hf_checkpoint(ckpt, dims, torch.bfloat16 if cuda else torch.float32, work / "demo")
    from gdt_tune.data.layout import DEFAULT_SYSTEM_PROMPT, Layout, apply_cap

    epoch = lengths in ("spread", "gdt")  # one epoch of the same samples for every variant
    budget = cohort_budget(seq)
    data = work / (f"data_{lengths}_{seq}_{nproc * steps}_{budget}.jsonl" if epoch else f"data_{seq}.jsonl")
    if not data.exists():
        samples = (spread_samples(tokenizer, nproc * steps, seq // 8, seq) if lengths == "spread"
                   else gdt_samples(nproc * steps, budget) if lengths == "gdt"
                   else fixed_length_samples(tokenizer, max(64, 2 * nproc * (steps + 2)), seq))
        data.write_text("".join(json.dumps(s) + "\n" for s in samples))
    layout = Layout.build(tokenizer, DEFAULT_SYSTEM_PROMPT)
    records = [json.loads(line) for line in data.read_text().splitlines()]
    capped = [apply_cap(layout, r["instruction"], r["answer"], seq, "gdt")[0] for r in records]
    sample_lengths = [len(ids) for ids in capped if ids]
    if not sample_lengths:
        raise SystemExit(f"no sample of {data} fits --seq-len {seq} (each loses its answer at the cap); delete the file "
                         "or give a longer --seq-len")
    with torch.device("meta"):
        from torchtune.models.llama3 import llama3

        m = llama3(**dims)
        n_params = sum(p.numel() for p in m.parameters())
        per_token = decoder_flops_per_token(m)
        flops_per_token = (sum(n * per_token(n) for n in sample_lengths) / sum(sample_lengths) if epoch
                           else per_token(seq))
    peak = peak_tflops(torch.cuda.get_device_name()) if cuda else None
    every = 5 if steps >= 20 else 1  # as a real run: the loss is read (a host sync) only when logged
    shape = (f"samples of exactly {seq} tokens" if not epoch else
             f"one epoch of {len(sample_lengths)} samples of {min(sample_lengths)}-{max(sample_lengths)} tokens "
             f"(mean {sum(sample_lengths) / len(sample_lengths):,.0f}), answer-only labels")
    if lengths == "gdt":
        shape += (f"; a synthetic GDT cohort, ten splits per patient and line of therapy: the patients' tries hold "
                  f"1/{prefix_sharing(records, capped):.2f} of the tokens")
    header = (f"model: {model} shape, {dims['num_layers']} layers, {n_params / 1e6:,.1f}M parameters, random weights; "
              f"{nproc} processes; {shape}, batch 1 per GPU; at most {steps} steps, logged every {every}; step time: "
              f"{'mean' if epoch else 'median'} over the logging windows after the first; FLOPs per token "
              f"{flops_per_token / 1e9:.4g} GFLOP (gdt_tune.training.mfu); peak {peak or 'n/a'} TFLOP/s")
    base = [f"demo_dir={work / 'demo'}", f"checkpointer.checkpoint_dir={ckpt}",
            f"checkpointer.checkpoint_files={json.dumps(json.loads((ckpt / 'files.json').read_text()))}",
            f"dataset.data_files={data}", f"dataset.max_seq_len={seq}", "dataset_val=null", "run_val_every_n_steps=null",
            f"max_steps_per_epoch={steps}", "epochs=1", f"log_every_n_steps={every}", "save_every_n_steps=null", "batch_size=1",
            f"device={'cuda' if cuda else 'cpu'}", f"dtype={'bf16' if cuda else 'fp32'}", "shuffle=false",
            "optimizer.fused=" + ("true" if cuda else "false"), *[f"model.{k}={v}" for k, v in dims.items()]]
    if lr is not None:
        base.append(f"optimizer.lr={lr}")
    rows, stock_tps = [], None
    for variant in variants:
        who, _, opts = variant.partition(":")
        recipe = RECIPE if who == "ours" else STOCK
        out = work / "runs" / variant.replace(":", "_").replace("+", "_")
        shutil.rmtree(out, ignore_errors=True)
        try:
            res = launch(recipe, TINY_CONFIG, [*base, f"output_dir={out}", *variant_overrides(who, opts, cuda, nproc)],
                         out / "logs", nproc=nproc)
        except RuntimeError as e:
            print(f"{variant} failed:\n{str(e)[-3000:]}", file=sys.stderr, flush=True)
            rows.append([variant, "failed", "", "", "", "", "", "", str(e).strip().splitlines()[-1][:100]])
            continue
        times = step_times(res["rows"])
        taken = max(times, default=0)
        logged = sorted(s for s in times if s > min(times, default=0))
        gaps = [(times[b] - times[a]) / (b - a) for a, b in zip([min(times, default=0), *logged], logged)
                if a >= max(2, every)]
        step = sum(gaps) / len(gaps) if epoch else median(gaps)
        # batch 1 per GPU: fixed, every sample is seq tokens; an epoch, its separate-sample tokens over the steps taken
        tps = sum(sample_lengths) / nproc / taken / step if epoch else seq / step
        stock_tps = tps if who == "stock" and stock_tps is None else stock_tps
        trained = next((r["tokens_seen"] for r in reversed(res["rows"]) if "tokens_seen" in r), sum(sample_lengths))
        peak_mem = max((r.get("peak_memory_alloc_gib", r.get("peak_memory_alloc", 0.0)) for r in res["rows"]),
                       default=0.0)
        losses = [r["loss"] for r in res["rows"] if "loss" in r]
        first = next((r["first_step_seconds"] for r in res["rows"] if "first_step_seconds" in r), "")
        rows.append([variant, step, tps, f"{tps / stock_tps:.2f}x" if stock_tps else "", f"{taken} / {int(trained):,}",
                     mfu(tps, flops_per_token, peak) if peak else "n/a", peak_mem or "", first,
                     f"{sum(losses[-10:]) / len(losses[-10:]):.4f}"])
    return header, rows


def cohort_budget(seq: int) -> int:
    """The generator's token budget of a GDT cohort for rows of ``seq`` tokens: whole histories (no
    visit trimmed) at GDT's 8k; the demo's trimmed ones for the tiny model's 2k rows."""
    return 12_000 if seq >= 8000 else int(seq * 0.7)


def gdt_samples(n: int, budget: int, seed: int = 0) -> list[dict]:
    """The first ``n`` training samples of a synthetic GDT cohort (ten splits per patient and line of
    therapy; the generator trims the oldest visits to ``budget``)."""
    from gdt_tune.data.synthetic import generate_cohort

    out = []
    for split, s in generate_cohort(max(4, n // 6), seed, 10, token_budget=budget):
        if split == "train" and len(out) < n:
            out.append(s)
    if len(out) < n:
        return out + gdt_samples(n - len(out), budget, seed + 1)
    return out


def prefix_sharing(records: list[dict], token_ids: list[list[int]]) -> float:
    """Separate-sample tokens / the tokens of one trie per patient."""
    from collections import defaultdict

    from gdt_tune.training.batches import trie_size

    by_patient = defaultdict(list)
    for r, ids in zip(records, token_ids):
        if ids:
            by_patient[r["meta"]["patientid"]].append(ids)
    return sum(map(len, token_ids)) / sum(trie_size(v) for v in by_patient.values())


HEADERS = ["recipe:variant", "s/step (median; epoch: mean)", "sample tokens/s/GPU", "vs stock",
           "steps / tokens trained", "MFU", "peak alloc GiB", "first step s", "mean loss of the last 10 logged steps"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=["3b", "8b", "tiny"], default=None, help="default: 3b on GPU, tiny on CPU")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers of the same shape (default: all)")
    ap.add_argument("--work", default="/tmp/gdt_bench_gpu")
    ap.add_argument("--seq-len", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--lr", type=float, default=None, help="learning rate (default: the tiny config's)")
    ap.add_argument("--lengths", choices=["fixed", "spread", "gdt"], default="fixed",
                    help="fixed: every sample --seq-len tokens; spread: --seq-len/8 to --seq-len, one epoch; gdt: a "
                         "synthetic GDT cohort (samples of a patient share their history), one epoch")
    ap.add_argument("--nproc", type=int, default=None, help="processes (default: GPUs, or 2 on CPU)")
    ap.add_argument("--variants", default=None,
                    help="comma list, e.g. ours:compile+ac,ours:compile+op,ours:compile,stock:compile+ac "
                         "(default: those four on GPU; ours:plain, ours:ac, stock:plain on CPU)")
    args = ap.parse_args()
    import torch

    cuda = torch.cuda.is_available()
    model = args.model or ("3b" if cuda else "tiny")
    nproc = args.nproc or (torch.cuda.device_count() if cuda else 2)
    seq = args.seq_len if model != "tiny" else min(args.seq_len, 2048)
    variants = (args.variants or ("ours:compile+ac,ours:compile+op,ours:compile,stock:compile+ac" if cuda
                                  else "ours:plain,ours:ac,stock:plain")).split(",")
    header, rows = run_variants(model, variants, Path(args.work), seq, args.steps, nproc, args.layers, args.lr,
                                args.lengths)
    print(f"# GPU throughput benchmark\n\nmachine: {machine()}\ncommand: `{command_line()}`\n{header}\n")
    print(table(HEADERS, rows))
    if not cuda:
        print("\nMFU is not measurable on CPU; this run checks that the pipeline works")


if __name__ == "__main__":
    main()

"""Training throughput and MFU on GDT-shaped 8k-token samples: our recipe with compile and
activation checkpointing on/off, against torchtune's stock ``full_finetune_distributed`` in the
same call. Random weights of the real architecture (no download).

    python bench/gpu_throughput.py                    # GPU: Llama-3.2-3B shape on each GPU of the node
    python bench/gpu_throughput.py --model 8b         # Llama-3.1-8B shape (needs ~80 GB per GPU at 8k tokens with AC)
    python bench/gpu_throughput.py --model tiny       # CPU: the pipeline end to end with the demo model

MFU convention: model FLOPs per token = 6 x (parameters - input embedding) + 12 x layers x
dim x seq_len (causal attention counted in full, as PaLM's appendix B); MFU = tokens/s/GPU x
FLOPs per token / 989e12 (H100 SXM dense bf16). Every sample is exactly ``--seq-len`` tokens, so
both recipes process the same tokens per step.
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
PEAK_FLOPS = 989e12
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

    from gdt_tune.demo_assets import hf_config

    if (folder / "DONE").exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in tune_to_hf(llama3(**dims).state_dict(), num_heads=dims["num_heads"],
                                                    num_kv_heads=dims["num_kv_heads"], dim=dims["embed_dim"]).items()}
    gen = torch.Generator().manual_seed(0)
    shard, size, files = {}, 0, []

    def flush():
        name = f"model-{len(files) + 1:05d}-of-XXXXX.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        files.append(name)

    for key, shape in shapes.items():
        t = torch.ones(shape, dtype=dtype) if "norm" in key else (torch.randn(shape, generator=gen) * 0.02).to(dtype)
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


def fixed_length_samples(tokenizer, n: int, total: int) -> list[dict]:
    """``n`` GDT samples cut (oldest history kept) to exactly ``total`` tokens in the spec layout."""
    from gdt_tune.data.synthetic import generate_cohort
    from gdt_tune.datasets._layout import DEFAULT_SYSTEM_PROMPT, Layout

    layout = Layout.build(tokenizer, DEFAULT_SYSTEM_PROMPT)
    out, seed = [], 0
    while len(out) < n:
        for _, s in generate_cohort(20, seed, 2, token_budget=40_000):
            answer = len(layout.answer_tokens(s["answer"]))
            fixed = len(layout.prompt_tokens(""))
            ids = tokenizer.encode(s["instruction"].strip(), add_bos=False, add_eos=False)
            k = total - answer - fixed
            if k <= 0 or len(ids) < k + 50:
                continue
            for cut in range(k, k + 8):  # a cut may re-tokenize to a token more or less
                text = tokenizer.decode(ids[:cut])
                if len(layout.prompt_tokens(text)) + answer == total:
                    out.append({"instruction": text, "answer": s["answer"]})
                    break
            if len(out) == n:
                break
        seed += 1
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=["3b", "8b", "tiny"], default=None, help="default: 3b on GPU, tiny on CPU")
    ap.add_argument("--work", default="/tmp/gdt_bench_gpu")
    ap.add_argument("--seq-len", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--nproc", type=int, default=None, help="processes (default: GPUs, or 2 on CPU)")
    ap.add_argument("--variants", default=None,
                    help="comma list of ours:compile+ac, ours:ac, ours:compile, ours:plain, stock:compile+ac, ... "
                         "(default: all four of ours and stock:compile+ac on GPU; ours:plain, ours:ac, stock:plain on CPU)")
    args = ap.parse_args()
    import torch

    cuda = torch.cuda.is_available()
    model = args.model or ("3b" if cuda else "tiny")
    nproc = args.nproc or (torch.cuda.device_count() if cuda else 2)
    seq = args.seq_len if model != "tiny" else min(args.seq_len, 2048)
    variants = (args.variants or ("ours:compile+ac,ours:ac,ours:compile,ours:plain,stock:compile+ac" if cuda
                                  else "ours:plain,ours:ac,stock:plain")).split(",")
    work = Path(args.work)
    tokenizer = demo_tokenizer(work)
    from gdt_tune.demo_assets import TINY_MODEL

    dims = TINY_MODEL if model == "tiny" else SHAPES[model]
    ckpt = work / f"model_{model}"
    random_hf_checkpoint(ckpt, dims, torch.bfloat16 if cuda else torch.float32, work / "demo")
    data = work / f"data_{seq}.jsonl"
    if not data.exists():
        n = max(64, 2 * nproc * (args.steps + 2))
        data.write_text("".join(json.dumps(s) + "\n" for s in fixed_length_samples(tokenizer, n, seq)))
    with torch.device("meta"):
        from torchtune.models.llama3 import llama3

        m = llama3(**dims)
        n_params = sum(p.numel() for p in m.parameters())
        flops_per_token = 6 * (n_params - m.tok_embeddings.weight.numel()) + 12 * dims["num_layers"] * dims["embed_dim"] * seq
    print(f"# GPU throughput benchmark\n\nmachine: {machine()}\ncommand: `{command_line()}`\n"
          f"model: {model} shape, {n_params / 1e6:,.1f}M parameters, random weights; {nproc} processes; "
          f"samples of exactly {seq} tokens, batch 1 per GPU; {args.steps} steps, median of steps 3..{args.steps}\n"
          f"FLOPs per token: {flops_per_token / 1e9:.4g} GFLOP (convention in the script docstring)\n")
    base = [f"demo_dir={work / 'demo'}", f"checkpointer.checkpoint_dir={ckpt}",
            f"checkpointer.checkpoint_files={json.dumps(json.loads((ckpt / 'files.json').read_text()))}",
            f"dataset.data_files={data}", f"dataset.max_seq_len={seq}", "dataset_val=null", "run_val_every_n_steps=null",
            f"max_steps_per_epoch={args.steps}", "epochs=1", "save_every_n_steps=null", "batch_size=1",
            f"device={'cuda' if cuda else 'cpu'}", f"dtype={'bf16' if cuda else 'fp32'}",
            "optimizer.fused=" + ("true" if cuda else "false"), *[f"model.{k}={v}" for k, v in dims.items()]]
    rows = []
    for variant in variants:
        who, _, opts = variant.partition(":")
        recipe = RECIPE if who == "ours" else STOCK
        out = work / "runs" / variant.replace(":", "_").replace("+", "_")
        shutil.rmtree(out, ignore_errors=True)
        extra = [f"output_dir={out}", f"compile={'compile' in opts}",
                 f"enable_activation_checkpointing={'ac' in opts}"]
        if who == "stock":
            extra += ["optimizer_in_bwd=false", "enable_activation_offloading=false", f"log_peak_memory_stats={cuda}"]
        try:
            res = launch(recipe, TINY_CONFIG, [*base, *extra], out / "logs", nproc=nproc)
        except RuntimeError as e:
            rows.append([variant, "failed", "", "", "", str(e).splitlines()[-1][:80]])
            continue
        times = step_times(res["rows"])
        gaps = [times[s] - times[s - 1] for s in sorted(times) if s >= 3 and s - 1 in times]
        step = median(gaps)
        tps = seq / step  # batch 1 per GPU, every sample exactly seq tokens
        peak = max((r.get("peak_memory_alloc_gib", r.get("peak_memory_alloc", 0.0)) for r in res["rows"]), default=0.0)
        rows.append([variant, step, tps, tps * flops_per_token / PEAK_FLOPS if cuda else "n/a (CPU)", peak or "",
                     f"{res['rows'][-1].get('loss', float('nan')):.3f}"])
    print(table(["recipe:variant", "s/step (median)", "tokens/s/GPU", "MFU", "peak alloc GiB", "last loss"], rows))
    print("\ntarget: >= 40% MFU" + ("" if cuda else " (not measurable on CPU; this run checks that the pipeline works)"))


if __name__ == "__main__":
    main()

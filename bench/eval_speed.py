"""Evaluation engine: event scoring (one forward per candidate vs one forward per sample) and
forecast generation (one prefill per draw vs one prefill per prompt shared by all draws), on
synthetic GDT-sized samples (prompt + answer near ``--budget`` tokens, answer-only scoring) and a
randomly initialised Llama 3 of ``--dim``/``--layers`` (the work per token, not the model's answers,
is measured). Prints model tokens per evaluated sample and wall time, old vs new, and their ratios.

    python bench/eval_speed.py                        # 4 samples of 4-8k tokens, 10 draws, CPU
    python bench/eval_speed.py --device cuda --dtype bf16 --dim 4096 --layers 8 --heads 32 --kv-heads 8 \
        --intermediate 14336 --vocab 128256 --max-new 64       # 8B layer shapes (bench/gpu_check.sh)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command_line, demo_tokenizer, machine, table  # noqa: E402


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="/tmp/gdt_bench_eval", help="scratch folder")
    ap.add_argument("--budget", type=int, default=9000, help="synthetic generator's token budget per sample")
    ap.add_argument("--samples", type=int, default=4, help="samples evaluated")
    ap.add_argument("--draws", type=int, default=10, help="sampled forecasts besides the greedy one (GDT: 10)")
    ap.add_argument("--max-new", type=int, default=32, help="tokens generated per draw (capped for CPU)")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--intermediate", type=int, default=0, help="feed-forward width; 0: 3 x dim")
    ap.add_argument("--vocab", type=int, default=0, help="0: the demo tokenizer's")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="fp32")
    args = ap.parse_args()

    from torchtune.models.llama3 import llama3

    from gdt_tune.clinical.event_scoring import event_candidates, pack_sample, score_samples
    from gdt_tune.data.layout import DEFAULT_SYSTEM_PROMPT, Layout
    from gdt_tune.data.synthetic import write_cohort
    from gdt_tune.eval.evaluate import read_samples
    from gdt_tune.eval.generation import generate_draws
    from gdt_tune.eval.reference import generate_answers, score_sequences
    from gdt_tune.runtime.torch_env import torch_dtype
    from gdt_tune.trained.serving import TEMPERATURE, TOP_P
    from gdt_tune.training.loss_head import LossOnlyHead

    work, device = Path(args.work), torch.device(args.device)
    dtype = torch_dtype(args.dtype)
    tokenizer = demo_tokenizer(work)
    data = work / f"cohort_{args.budget}"
    if not (data / "test").is_dir():
        write_cohort(data, n_patients=120, seed=7, splits_per_lot=4, token_budget=args.budget)
    layout = Layout.build(tokenizer, DEFAULT_SYSTEM_PROMPT)
    # the samples with the most event tasks (GDT: 0-4 a sample), then the longest
    records = sorted((r for _, r in read_samples(data / "test", None)),
                     key=lambda r: (r["answer"].count("time to event prediction:"), len(r["instruction"])),
                     reverse=True)[:args.samples]
    torch.manual_seed(0)
    vocab = args.vocab or max(tokenizer.special_tokens.values()) + 1
    with torch.device(device):
        model = llama3(vocab_size=vocab, num_layers=args.layers, num_heads=args.heads, num_kv_heads=args.kv_heads,
                       embed_dim=args.dim, max_seq_len=32768, intermediate_dim=args.intermediate or 3 * args.dim).to(dtype).eval()
    lengths = [len(layout.prompt_tokens(r["instruction"])) + len(layout.answer_tokens(r["answer"])) for r in records]

    # events
    samples = [event_candidates(layout, r) for r in records]
    pairs = [(t["context"], c) for tasks in samples for t in tasks for c in t["candidates"]]
    old_tokens = sum(len(c) + len(x) for c, x in pairs)
    _, old_s = timed(lambda: score_sequences(model, pairs, tokenizer.pad_id, device, args.batch_size), device)
    packs = [pack_sample(tasks, model.max_seq_len) for tasks in samples]
    new_tokens = sum(len(p) for sample in packs for p in sample)
    head = LossOnlyHead(model, num_chunks=1)
    _, new_s = timed(lambda: score_samples(head, packs, tokenizer.pad_id, device, args.batch_size), device)
    n, tasks = len(records), sum(map(len, samples))

    # forecasts: greedy + draws
    prompts = [[*layout.prompt_tokens(r["instruction"]), *layout.assistant_header] for r in records]
    runs = [(0.0, 1.0)] + [(TEMPERATURE, TOP_P)] * args.draws

    def old_generate():
        for start in range(0, n, args.batch_size):
            for temperature, top_p in runs:
                generate_answers(model, tokenizer, prompts[start:start + args.batch_size], args.max_new, temperature,
                                 top_p, device, dtype)

    def new_generate():
        for start in range(0, n, args.batch_size):
            generate_draws(model, prompts[start:start + args.batch_size], runs, args.max_new, tokenizer.pad_id, -1,
                           torch.Generator().manual_seed(start), device, dtype)  # no stop token: full length

    _, old_gen_s = timed(old_generate, device)
    _, new_gen_s = timed(new_generate, device)
    prompt_tokens = sum(map(len, prompts))
    old_gen_tokens = len(runs) * (prompt_tokens + n * args.max_new)
    new_gen_tokens = prompt_tokens + len(runs) * n * args.max_new

    print(f"machine: {machine()}\ncommand: {command_line()}")
    print(f"{n} samples, {min(lengths):,}-{max(lengths):,} tokens (mean {sum(lengths) / n:,.0f}), {tasks} event tasks "
          f"({tasks / n:.1f} a sample), {sum(1 for p in prompts)} forecast prompts; "
          f"model dim {args.dim}, {args.layers} layers, vocab {vocab}, {args.dtype} on {device.type}; "
          f"{args.max_new} tokens per draw, {len(runs)} draws (greedy + {args.draws})\n")
    print(table(["work", "path", "model tokens per sample", "seconds per sample"], [
        ["event scoring", "one forward per candidate (old)", old_tokens / n, old_s / n],
        ["event scoring", "one forward per sample (new)", new_tokens / n, new_s / n],
        ["forecasting", "one prefill per draw (old)", old_gen_tokens / n, old_gen_s / n],
        ["forecasting", "one prefill per prompt (new)", new_gen_tokens / n, new_gen_s / n]]))
    print(f"\nevent scoring new / old: tokens {new_tokens / old_tokens:.3f}x, time {new_s / old_s:.3f}x")
    print(f"forecasting new / old: tokens {new_gen_tokens / old_gen_tokens:.3f}x, time {new_gen_s / old_gen_s:.3f}x")


if __name__ == "__main__":
    main()

"""The loss-only head on CPU with a large vocabulary: forward + backward time of a 1-layer Llama 3
whose output projection dominates, with the stock head (every position projected, chunked, -100
ignored) vs ``gdt_tune.training.loss_head.LossOnlyHead`` (labelled positions only), at GDT's label
share (an answer of ~10% of the tokens), as a ratio in one run.

    python bench/loss_head.py                       # vocab 65,536, 2 x 2,048 tokens, 10% labels
    python bench/loss_head.py --vocab 8192 --repeat 2   # the CI version (bench/smoke.py)
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command_line, machine, median, table  # noqa: E402


def main() -> None:
    import torch
    from torchtune.models.llama3 import llama3
    from torchtune.modules.loss import CEWithChunkedOutputLoss

    from gdt_tune.training.loss_head import LossOnlyHead

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, default=65536)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=2048, help="tokens per sample (2 samples)")
    ap.add_argument("--label-share", type=float, default=0.10)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--work", default=None, help="unused (the benchmarks' common option)")
    args = ap.parse_args()
    torch.manual_seed(0)
    full = llama3(vocab_size=args.vocab, num_layers=1, num_heads=4, num_kv_heads=2, embed_dim=args.dim,
                  max_seq_len=args.tokens, intermediate_dim=3 * args.dim)
    ours = copy.deepcopy(full)
    tokens = torch.randint(0, args.vocab, (2, args.tokens))
    labels = torch.full_like(tokens, -100)
    answer = int(args.tokens * args.label_share)
    labels[:, -answer:] = tokens[:, -answer:]
    loss_fn = CEWithChunkedOutputLoss(num_output_chunks=8)
    full.set_num_output_chunks(8)
    head = LossOnlyHead(ours, 8)

    def stock():
        logits = full(tokens)
        return sum(loss_fn.compute_cross_entropy(lc.reshape(-1, lc.size(-1)), lab.reshape(-1))
                   for lc, lab in zip(logits, labels.chunk(8, dim=1)))

    def timed(step) -> float:
        times = []
        for _ in range(args.repeat):
            started = time.perf_counter()
            step().backward()
            times.append(time.perf_counter() - started)
        return median(times)

    stock_s, ours_s = timed(stock), timed(lambda: head(tokens, labels))
    print(f"# loss-only head\n\nmachine: {machine()}\ncommand: `{command_line()}`\n"
          f"model: 1 layer, width {args.dim}, vocabulary {args.vocab:,}; 2 x {args.tokens:,} tokens, "
          f"{answer:,} labelled each ({args.label_share:.0%}); forward + backward, median of {args.repeat}\n")
    print(table(["head", "ms (fwd + bwd)", "positions projected"],
                [["stock (every position, chunked)", stock_s * 1000, 2 * args.tokens],
                 ["loss-only (labelled positions)", ours_s * 1000, 2 * answer]]))
    print(f"\nloss-only / stock time: {ours_s / stock_s:.3f}x (label share {args.label_share:.2f})")


if __name__ == "__main__":
    main()

"""Tiny, seeded assets for the CPU demo and the tests: a synthetic cohort, a tiktoken BPE
tokenizer trained on it with the Llama 3 special tokens at small ids, and a tiny Llama 3 model
in Hugging Face format (config.json + safetensors), loadable by torchtune's HF checkpointer
exactly like Llama-3.1-8B-Instruct.

    gdt-tune prepare-demo --dir .gdt_demo

writes ``DIR/data/{train,validation,test}/``, ``DIR/model/{config.json, model.safetensors,
tokenizer.model, special_tokens.json}``. A second call reuses what is there.
"""

from __future__ import annotations

import base64
import json
import logging
from collections import Counter, defaultdict
from pathlib import Path

import regex
import torch
from safetensors.torch import save_file
from torchtune.models.convert_weights import tune_to_hf
from torchtune.models.llama3 import llama3

from gdt_tune.data.synthetic import write_cohort
from gdt_tune.runtime.files import atomic_output
from gdt_tune.trained.serving import PATTERN

log = logging.getLogger("gdt_tune")

# The ten special tokens torchtune's Llama3Tokenizer needs, right after the BPE ranks.
SPECIAL_TOKEN_NAMES = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>", "<|step_id|>",
    "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
    "<|image|>",
]
VOCAB_SIZE = 1024
BPE_RANKS = VOCAB_SIZE - len(SPECIAL_TOKEN_NAMES)

# Keep in sync with configs/tiny_gdt_cpu.yaml (a test checks it).
TINY_MODEL = dict(vocab_size=VOCAB_SIZE, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64,
                  max_seq_len=2048, intermediate_dim=192, norm_eps=1e-5, rope_base=500000.0)
DEMO_PATIENTS = 60
DEMO_SPLITS_PER_LOT = 4
DEMO_TOKEN_BUDGET = 1450  # generator estimate (Llama 3 tokens); about 1.1k tokens a sample with the tiny vocabulary


def train_bpe(texts, n_ranks: int) -> dict[bytes, int]:
    """Byte-level BPE ranks (tiktoken's mergeable_ranks) learned from ``texts`` with the Llama 3
    pre-tokenizer pattern; deterministic (ties broken by the pair's bytes)."""
    pattern = regex.compile(PATTERN)
    word_counts = Counter(piece.encode("utf-8") for text in texts for piece in pattern.findall(text))
    words = [[bytes([b]) for b in w] for w in word_counts]
    freqs = list(word_counts.values())
    ranks = {bytes([i]): i for i in range(256)}
    pairs: Counter = Counter()
    where = defaultdict(set)
    for i, w in enumerate(words):
        for p in zip(w, w[1:]):
            pairs[p] += freqs[i]
            where[p].add(i)
    while len(ranks) < n_ranks and pairs:
        best, count = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        if count <= 0:
            break
        merged = best[0] + best[1]
        ranks.setdefault(merged, len(ranks))
        for i in list(where.pop(best, ())):
            w, f = words[i], freqs[i]
            for p in zip(w, w[1:]):
                pairs[p] -= f
            out, j = [], 0
            while j < len(w):
                if j + 1 < len(w) and (w[j], w[j + 1]) == best:
                    out.append(merged)
                    j += 2
                else:
                    out.append(w[j])
                    j += 1
            words[i] = out
            for p in zip(out, out[1:]):
                pairs[p] += f
                where[p].add(i)
        pairs = +pairs  # drop zero counts
    return ranks


def write_tokenizer(texts, model_dir: Path) -> None:
    """``tokenizer.model`` (tiktoken format) and ``special_tokens.json`` (HF added_tokens form)."""
    ranks = train_bpe(texts, BPE_RANKS)
    model_dir.mkdir(parents=True, exist_ok=True)
    with open(model_dir / "tokenizer.model", "w") as f:
        for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(f"{base64.b64encode(token).decode()} {rank}\n")
    added = [{"id": BPE_RANKS + i, "content": name, "special": True} for i, name in enumerate(SPECIAL_TOKEN_NAMES)]
    (model_dir / "special_tokens.json").write_text(json.dumps({"added_tokens": added}, indent=1))


def hf_config(m: dict) -> dict:
    """config.json for ``transformers.LlamaForCausalLM`` matching torchtune's ``llama3(**m)``."""
    ids = {name: BPE_RANKS + i for i, name in enumerate(SPECIAL_TOKEN_NAMES)}
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": m["vocab_size"], "hidden_size": m["embed_dim"],
        "intermediate_size": m["intermediate_dim"], "num_hidden_layers": m["num_layers"],
        "num_attention_heads": m["num_heads"], "num_key_value_heads": m["num_kv_heads"],
        "head_dim": m["embed_dim"] // m["num_heads"], "max_position_embeddings": m["max_seq_len"],
        "rms_norm_eps": m["norm_eps"], "rope_theta": m["rope_base"], "hidden_act": "silu",
        "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
        "bos_token_id": ids["<|begin_of_text|>"], "eos_token_id": ids["<|eot_id|>"],
        "torch_dtype": "float32",
    }


def write_model(model_dir: Path, seed: int, dims: dict = TINY_MODEL) -> None:
    """A randomly initialised Llama 3 of shape ``dims`` (``llama3(**dims)``; seeded) in HF format."""
    torch.manual_seed(seed)
    model = llama3(**dims)
    state = tune_to_hf(model.state_dict(), num_heads=dims["num_heads"], num_kv_heads=dims["num_kv_heads"],
                       dim=dims["embed_dim"])
    model_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(model_dir / "model.safetensors"),
              metadata={"format": "pt"})
    (model_dir / "config.json").write_text(json.dumps(hf_config(dims), indent=1))


def _training_text(data_dir: Path, max_chars: int = 3_000_000):
    total = 0
    for path in sorted((data_dir / "train").glob("*.jsonl")):
        for line in open(path, encoding="utf-8"):
            record = json.loads(line)
            for text in (record["instruction"], record["answer"]):
                total += len(text)
                yield text
            if total > max_chars:
                return


def _atomic_dir(target: Path, build) -> None:
    """Build into a temporary sibling and rename, so an interrupted call leaves nothing half-made."""
    if target.exists():
        return
    with atomic_output(target) as tmp:
        build(tmp)


def prepare_demo(root: str | Path, seed: int = 0) -> Path:
    """Write (or reuse) the demo assets under ``root``; returns ``root``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    data, model = root / "data", root / "model"
    _atomic_dir(data, lambda d: write_cohort(d, DEMO_PATIENTS, seed, DEMO_SPLITS_PER_LOT, DEMO_TOKEN_BUDGET))

    def build_model(d: Path) -> None:
        write_tokenizer(_training_text(data), d)
        write_model(d, seed)

    _atomic_dir(model, build_model)
    return root

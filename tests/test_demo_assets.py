"""prepare-demo assets: idempotent, tokenizer with Llama 3 specials, HF checkpoint that torchtune
and transformers load to the same logits."""

import json
import os

import torch
from torchtune.models.llama3 import llama3
from torchtune.training import FullModelHFCheckpointer

from gdt_tune.cli.demo_assets import SPECIAL_TOKEN_NAMES, TINY_MODEL, prepare_demo, train_bpe


def test_prepare_demo_is_idempotent(demo_dir):
    files = sorted(p for p in demo_dir.rglob("*") if p.is_file())
    stamps = {p: os.stat(p).st_mtime_ns for p in files}
    prepare_demo(demo_dir)
    assert sorted(p for p in demo_dir.rglob("*") if p.is_file()) == files
    assert {p: os.stat(p).st_mtime_ns for p in files} == stamps
    for split in ("train", "validation", "test"):
        assert list((demo_dir / "data" / split).glob("*.jsonl"))


def test_tokenizer_has_all_llama3_special_tokens_at_small_ids(demo_dir, tokenizer):
    special = json.loads((demo_dir / "model" / "special_tokens.json").read_text())["added_tokens"]
    assert [t["content"] for t in special] == SPECIAL_TOKEN_NAMES
    assert tokenizer.vocab_size == TINY_MODEL["vocab_size"] == 1024
    assert tokenizer.special_tokens["<|begin_of_text|>"] == 1014
    text = "On the first visit, the patient experienced the following: \n\themoglobin - 718-7 is 12.5,\n"
    ids = tokenizer.encode(text, add_bos=False, add_eos=False)
    assert tokenizer.decode(ids) == text
    assert len(ids) < len(text) / 2.5  # trained merges compress the synthetic text


def test_train_bpe_is_deterministic_and_merges_frequent_pairs():
    ranks = train_bpe(["aaab aaab aaab xy"], 260)
    assert train_bpe(["aaab aaab aaab xy"], 260) == ranks
    assert ranks[b"aa"] == 256 and len(ranks) == 260 and all(ranks[bytes([i])] == i for i in range(256))


def test_hf_checkpoint_loads_in_torchtune_and_matches_transformers(demo_dir, tmp_path):
    transformers = __import__("pytest").importorskip("transformers")
    ckpt = FullModelHFCheckpointer(checkpoint_dir=str(demo_dir / "model"), checkpoint_files=["model.safetensors"],
                                   model_type="LLAMA3", output_dir=str(tmp_path / "out"))
    model = llama3(**TINY_MODEL)
    model.load_state_dict(ckpt.load_checkpoint()["model"])
    model.eval()
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(demo_dir / "model"), torch_dtype=torch.float32)
    hf.eval()
    tokens = torch.randint(0, 1014, (2, 37), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(tokens), hf(tokens).logits
    assert ours.shape == theirs.shape == (2, 37, 1024)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)

"""The shipped ``llama3_1_8b_gdt_full`` config on a folder shaped like the real
Llama-3.1-8B-Instruct snapshot (tests/real_snapshot.py: rope scaling ``llama3``, the real
128,256-token vocabulary, 4 bf16 shards + index, Meta's tokenizer), on 2 CPU ranks, with only the
model's size, the device and the cadence overridden: validation with ``val_metrics_samples``,
``step_N``, an exact resume, ``epoch_0`` that transformers loads with torchtune's logits, and
``gdt-tune evaluate`` on it."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from meta_assets import TOKENIZER
from real_snapshot import MODEL_OVERRIDES, VOCAB, write_snapshot
from recipe_utils import REPO, final_weights

from gdt_tune.data.synthetic import write_cohort

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.xdist_group("real_snapshot")

CONFIG = str(REPO / "configs" / "llama3_1_8b_gdt_full.yaml")
SIZE_DEVICE_CADENCE = [
    *MODEL_OVERRIDES,                     # size: the real vocabulary at toy width
    "device=cpu", "compile=false", "num_workers=0", "balance_group=2",  # device: 2 CPU ranks, batch 1 each
    "max_steps_per_epoch=4", "save_every_n_steps=2", "run_val_every_n_steps=2", "val_metrics_samples=4",
    "log_every_n_steps=1",                # cadence
]


def _train(snapshot, data, out, *extra):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "gdt_tune.recipes.full_finetune_fsdp_ckpt", "--config", CONFIG,
           f"model_dir={snapshot}", f"data_dir={data}", f"output_dir={out}", *SIZE_DEVICE_CADENCE, *extra]
    env = dict(os.environ, TIKTOKEN_CACHE_DIR="", WANDB_MODE="offline")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


@pytest.fixture(scope="module")
def run(meta_assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    snapshot = write_snapshot(root / "Llama-3.1-8B-Instruct", meta_assets / TOKENIZER)
    data = root / "data"
    write_cohort(data, 20, seed=5, splits_per_lot=2, token_budget=500)
    out = root / "run"
    proc = _train(snapshot, data, out)
    return snapshot, data, out, proc


def test_trains_validates_and_writes_step_and_epoch_checkpoints(run):
    snapshot, data, out, proc = run
    assert (out / "step_2").is_dir() and (out / "step_4").is_dir()
    # the 8B config logs to wandb (offline here): its run file holds every validation series
    (record,) = (out / "logs" / "wandb").glob("offline-run-*/run-*.wandb")
    logged = record.read_bytes()
    for key in ("loss", "val_loss", "val_loss_forecasting", "val_loss_events", "val_events_accuracy",
                "val_events_brier", "val_metrics_seconds"):
        assert f'"{key}"'.encode() in logged or key.encode() in logged, key
    # no patient text or id in anything the run wrote (wandb's files included) or printed
    from test_no_leaks import leaks, needles

    found = needles(data)
    tensors = (".safetensors", ".distcp")  # weight shards: numbers (the demo's leak test scans its own)
    blobs = [(str(p), p.read_bytes()) for p in out.rglob("*") if p.is_file() and p.suffix not in tensors] + [
        ("stdout/stderr", (proc.stdout + proc.stderr).encode())]
    assert any("wandb" in name for name, _ in blobs) and len(blobs) > 15
    assert {name: hits[:2] for name, blob in blobs if (hits := leaks(blob, found))} == {}
    ids = {json.loads(line)["meta"]["patientid"] for f in data.rglob("*.jsonl") for line in f.read_text().splitlines()}
    assert [name for name, blob in blobs if any(i.encode() in blob for i in ids)] == []
    assert (out / "val_metrics_samples.txt").read_text().count(":") == 4
    epoch = out / "epoch_0"
    index = json.loads((epoch / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [f"model-0000{k}-of-00004.safetensors" for k in range(1, 5)]
    config = json.loads((epoch / "config.json").read_text())
    assert config["rope_scaling"]["rope_type"] == "llama3" and config["vocab_size"] == VOCAB
    weights = final_weights(out, 0)
    assert weights["model.embed_tokens.weight"].shape == (VOCAB, 64)
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    # the serving files replaced the snapshot's stock chat template
    template = json.loads((epoch / "tokenizer_config.json").read_text())["chat_template"]
    assert "Cutting Knowledge" not in template
    added = [t["id"] for t in json.loads((epoch / "tokenizer.json").read_text())["added_tokens"]]
    assert max(added) < VOCAB


def test_resume_from_step_2_ends_bit_identical(run, tmp_path):
    snapshot, data, out, _ = run
    again = tmp_path / "run"
    shutil.copytree(out, again, ignore=shutil.ignore_patterns("step_4", "epoch_0", "logs", "wandb", ".lock"))
    _train(snapshot, data, again, "resume_from_checkpoint=true")
    first, resumed = final_weights(out, 0), final_weights(again, 0)
    assert first.keys() == resumed.keys()
    assert all(torch.equal(first[k], resumed[k]) for k in first)


def test_transformers_loads_epoch_0_with_torchtunes_logits(run):
    from recipe_utils import load_trained

    _, _, out, _ = run
    epoch = out / "epoch_0"
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(epoch), torch_dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(epoch))
    model, tt_tokenizer, prompt = load_trained(epoch, None, torch.device("cpu"), torch.float32)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "hemoglobin - 718-7 is 12.5, ECOG is 1."}],
                                        add_generation_prompt=True, tokenize=True)
    ids = torch.tensor([ids["input_ids"] if not isinstance(ids, list) else ids])
    with torch.no_grad():
        want, got = hf(ids).logits, model(ids)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5), (got - want).abs().max()
    assert tokenizer.encode("x 12.5 µmol/L", add_special_tokens=False) == tt_tokenizer.encode(
        "x 12.5 µmol/L", add_bos=False, add_eos=False)


def test_evaluate_reads_epoch_0(run, tmp_path, capsys):
    from gdt_tune.cli.main import main

    _, data, out, _ = run
    assert main(["evaluate", "--checkpoint", str(out / "epoch_0"), "--data", str(data / "test"), "--out",
                 str(tmp_path / "eval"), "--samples", "1", "--max-samples", "3", "--train-data",
                 str(data / "train")]) == 0, capsys.readouterr().err[-3000:]
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    test_samples = sum(1 for f in (data / "test").glob("*.jsonl") for _ in f.open())
    assert metrics["samples"] == min(3, test_samples) and metrics["events"]["tasks"] > 0


def test_export_of_step_2_serves_with_torchtunes_special_tokens(run, meta_assets, tmp_path):
    """``gdt-tune export`` of an interim step_N with the shipped config (special_tokens_path unset):
    every special token at its training id inside the vocabulary, the training prompt ids."""
    from torchtune.models.llama3 import llama3_tokenizer

    from gdt_tune.data.layout import DEFAULT_SYSTEM_PROMPT, Layout

    snapshot, data, out, _ = run
    served = tmp_path / "served"
    from gdt_tune.cli.main import main

    assert main(["export", "--checkpoint", str(out / "step_2"), "--out", str(served), "--config",
                 "llama3_1_8b_gdt_full", f"model_dir={snapshot}", f"data_dir={data}", f"output_dir={out}",
                 *MODEL_OVERRIDES]) == 0
    hf = transformers.AutoTokenizer.from_pretrained(str(served))
    tokenizer = llama3_tokenizer(str(meta_assets / TOKENIZER))
    for name, token_id in tokenizer.special_tokens.items():
        assert hf.convert_tokens_to_ids(name) == token_id if token_id < VOCAB else name not in hf.get_vocab()
    record = json.loads(next((data / "test").glob("*.jsonl")).read_text().splitlines()[0])
    layout = Layout.build(tokenizer, DEFAULT_SYSTEM_PROMPT)
    got = hf.apply_chat_template([{"role": "user", "content": record["instruction"]}], add_generation_prompt=True,
                                 tokenize=True)
    assert (got["input_ids"] if not isinstance(got, list) else got) == [
        *layout.prompt_tokens(record["instruction"]), *layout.assistant_header]

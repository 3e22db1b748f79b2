"""Serving exactly as trained: the exported tokenizer and chat template give the training prompt
ids, the answers round-trip, and `gdt_tune.prompt` gives the same text and ids."""

import json
import shutil

import pytest

import gdt_tune
from gdt_tune.data.layout import DEFAULT_SYSTEM_PROMPT, Layout
from gdt_tune.datasets import cgdb_instruct_dataset
from gdt_tune.eval.evaluate import read_samples
from gdt_tune.trained.serving import write_serving_files

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def served(demo_dir, tokenizer, tmp_path_factory):
    folder = tmp_path_factory.mktemp("served")
    shutil.copy(demo_dir / "model" / "config.json", folder)
    write_serving_files(folder, demo_dir / "model" / "tokenizer.model", tokenizer, DEFAULT_SYSTEM_PROMPT, 2048, 1024)
    return folder


def _ids(out):
    return out["input_ids"] if not isinstance(out, list) else out


def test_chat_template_gives_the_training_prompt(served, demo_dir, tokenizer):
    hf = transformers.AutoTokenizer.from_pretrained(str(served))
    layout = Layout.build(tokenizer, DEFAULT_SYSTEM_PROMPT)
    records = [r for _, r in read_samples(demo_dir / "data" / "test", 12)]
    for record in records:
        want = [*layout.prompt_tokens(record["instruction"]), *layout.assistant_header]
        user = [{"role": "user", "content": record["instruction"]}]
        system = [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}, *user]
        for messages in (user, system):  # without a system message the training one is used
            assert _ids(hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)) == want
        answer = layout.answer_tokens(record["answer"])[len(layout.assistant_header):-1]
        assert hf.encode(record["answer"].strip(), add_special_tokens=False) == answer
        assert hf.decode(answer) == record["answer"].strip()
        # gdt_tune.prompt: the same text and ids, also from a tokenizer path
        p = gdt_tune.prompt(record["instruction"], tokenizer=demo_dir / "model" / "tokenizer.model")
        assert p.ids == want
        assert p.text == hf.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
        assert hf.encode(p.text, add_special_tokens=False) == want
    # and exactly what training fed the model: the dataset's first sample up to its answer
    ds = cgdb_instruct_dataset(tokenizer, data_files=demo_dir / "data" / "test", max_seq_len=4096)
    assert ds.where(0).endswith(":1") and len(ds) >= len(records)
    first = [*layout.prompt_tokens(records[0]["instruction"]), *layout.assistant_header]
    assert ds[0]["tokens"][: len(first)] == first


def test_generation_config_and_special_tokens(served, tokenizer):
    gen = json.loads((served / "generation_config.json").read_text())
    assert (gen["temperature"], gen["top_p"], gen["do_sample"]) == (0.9, 0.85, True)
    assert gen["eos_token_id"] == [tokenizer.eot_id, tokenizer.eos_id] and gen["bos_token_id"] == tokenizer.bos_id
    hf = transformers.AutoTokenizer.from_pretrained(str(served))
    for name, token_id in tokenizer.special_tokens.items():
        assert hf.convert_tokens_to_ids(name) == token_id
    assert "Cutting Knowledge" not in (served / "tokenizer_config.json").read_text()


def test_prompt_text_without_a_tokenizer():
    p = gdt_tune.prompt("  Patient history.  ", system_prompt=" Be precise. ")
    assert p.ids is None
    assert p.text == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe precise.<|eot_id|>"
                      "<|start_header_id|>user<|end_header_id|>\n\nPatient history.<|eot_id|>"
                      "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_trained_epoch_and_exported_step_serve_like_training(demo_dir, tokenizer, tmp_path):
    """The recipe's epoch_0 carries the serving files; `gdt-tune export` of the last step_N gives
    the same weights and files; transformers loads both and the template gives the training ids."""
    import os
    import subprocess
    import sys

    import torch
    from recipe_utils import final_weights, train_in_process
    from safetensors.torch import load_file

    run = tmp_path / "run"
    train_in_process(demo_dir, run, "max_steps_per_epoch=2", "save_every_n_steps=2", "dataset_val=null",
                     "run_val_every_n_steps=null")
    exported = tmp_path / "exported"
    proc = subprocess.run([sys.executable, "-m", "gdt_tune.cli.main", "export", "--checkpoint", str(run / "step_2"),
                           "--out", str(exported), "--config", "tiny_gdt_cpu", f"demo_dir={demo_dir}"],
                          cwd=tmp_path, capture_output=True, text=True, env=dict(os.environ, TIKTOKEN_CACHE_DIR=""))
    assert proc.returncode == 0, proc.stderr[-3000:]
    # only what is true of the export: no torchtune save path in a temporary folder, no DCP warning
    assert proc.stderr == "" and proc.stdout.splitlines() == [
        f"exported {run / 'step_2'} to {exported}: load it with transformers.AutoModelForCausalLM / AutoTokenizer, "
        f"or serve it with vllm serve {exported}"], proc.stdout + proc.stderr
    trained = final_weights(run, 0)
    # pointed at the run's own epoch_0, export refuses and leaves the final weights as they are
    proc = subprocess.run([sys.executable, "-m", "gdt_tune.cli.main", "export", "--checkpoint", str(run / "step_2"),
                           "--out", str(run / "epoch_0"), "--config", "tiny_gdt_cpu", f"demo_dir={demo_dir}"],
                          cwd=tmp_path, capture_output=True, text=True, env=dict(os.environ, TIKTOKEN_CACHE_DIR=""))
    assert proc.returncode == 1 and proc.stderr.startswith(f"error: --out {run / 'epoch_0'} is not empty (")
    assert len(proc.stderr.splitlines()) == 1
    assert all(torch.equal(final_weights(run, 0)[k], v) for k, v in trained.items())
    weights = {}
    for f in exported.glob("*.safetensors"):
        weights.update(load_file(str(f)))
    assert weights.keys() == trained.keys() and all(torch.equal(weights[k], trained[k]) for k in trained)
    layout = Layout.build(tokenizer, DEFAULT_SYSTEM_PROMPT)
    record = read_samples(demo_dir / "data" / "test", 1)[0][1]
    want = [*layout.prompt_tokens(record["instruction"]), *layout.assistant_header]
    for folder in (run / "epoch_0", exported):
        for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
            assert (folder / name).is_file(), (folder, name)
        hf = transformers.AutoTokenizer.from_pretrained(str(folder))
        messages = [{"role": "user", "content": record["instruction"]}]
        assert _ids(hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)) == want
        model = transformers.AutoModelForCausalLM.from_pretrained(str(folder))
        assert model.generation_config.top_p == 0.85


def test_export_writes_only_into_a_new_or_empty_folder_or_over_an_earlier_export(demo_dir, tmp_path):
    from gdt_tune.cli.export import EXPORT_MARKER, export_checkpoint

    source = demo_dir / "model"  # an HF folder, like a run's epoch_N
    files = lambda folder: {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}  # noqa: E731
    snapshot = tmp_path / "base_snapshot"  # the base model's download: the same shard names
    shutil.copytree(source, snapshot)
    user = tmp_path / "mine"
    user.mkdir()
    (user / "config.json").write_text("the user's own")
    (tmp_path / "a_file").write_text("x")
    for target, words in ((snapshot, "is not empty (config.json, "), (user, "is not empty (config.json) and holds no "
                                                                              "earlier export"),
                          (tmp_path / "a_file", "is a file"), (source, "is or overlaps the checkpoint")):
        before = files(target) if target.is_dir() else target.read_bytes()
        with pytest.raises(ValueError, match=r"^--out .*" + words.replace("(", r"\(").replace(")", r"\)")):
            export_checkpoint(source, target)
        assert (files(target) if target.is_dir() else target.read_bytes()) == before
    out = tmp_path / "new" / "serve"
    export_checkpoint(source, out)
    assert (out / EXPORT_MARKER).is_file() and (out / "tokenizer.json").is_file()
    assert (out / "config.json").read_bytes() == (source / "config.json").read_bytes()
    with pytest.raises(ValueError, match="holds an earlier export; pass --replace"):
        export_checkpoint(source, out)
    (out / "stale.txt").write_text("from the earlier export")
    export_checkpoint(source, out, replace=True)
    assert not (out / "stale.txt").exists() and (out / EXPORT_MARKER).is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == ["serve"]  # no staging or replaced folder left
    empty = tmp_path / "empty"
    empty.mkdir()
    export_checkpoint(source, empty)
    assert (empty / "tokenizer.json").is_file()


def test_export_checks_the_serving_files_before_any_work(demo_dir, tmp_path):
    """A checkpoint whose tokenizer cannot serve its model is refused before anything is copied or
    read: here config.json says 1000 embedding rows, below every special token (1014-1023)."""
    from gdt_tune.cli.export import export_checkpoint

    source = tmp_path / "epoch_0"
    shutil.copytree(demo_dir / "model", source)
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "vocab_size": 1000}))
    out = tmp_path / "serve"
    with pytest.raises(ValueError, match=r"^no special token has an id below the model's vocab_size 1000; "):
        export_checkpoint(source, out)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["epoch_0"]

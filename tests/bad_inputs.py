"""The bad-input corpus: data files and config overrides that must stop a run with a one-line
error naming the file:line or config key and the fix. ``tests/test_bad_inputs.py`` runs each
case through the recipe.

A case is (id, setup, expected) where ``setup(tmp, demo)`` writes what it needs under ``tmp`` and
returns the command-line overrides; ``expected`` are substrings of the error line ({tmp} and
{demo} are filled in).
"""

import json
from pathlib import Path

GOOD = {"instruction": "Patient history.\n\tECOG is 1.", "answer": "Task 1 is time to event prediction:\nx"}


def _line(i: int, **change) -> str:
    return json.dumps({**GOOD, "instruction": f"{GOOD['instruction']} Visit {i}.", **change}) + "\n"


def train_file(*lines, name="train.jsonl"):
    """A setup writing ``lines`` (str or bytes) as the training data."""
    def setup(tmp: Path, demo: Path) -> list[str]:
        path = tmp / "data" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"".join(x if isinstance(x, bytes) else x.encode() for x in lines))
        return [f"dataset.data_files={path}"]
    return setup


def overrides(*items):
    def setup(tmp: Path, demo: Path) -> list[str]:
        return [x.format(tmp=tmp, demo=demo) for x in items]
    return setup


def with_meta(i, **meta):
    return _line(i, meta=meta)


def _val_shares_train(tmp: Path, demo: Path) -> list[str]:
    return [f"dataset_val.data_files={demo}/data/train/part-00000.jsonl"]


def _empty_dir(tmp: Path, demo: Path) -> list[str]:
    (tmp / "empty").mkdir()
    return [f"dataset.data_files={tmp}/empty"]


def _huge_line(tmp: Path, demo: Path) -> list[str]:
    path = tmp / "data" / "train.jsonl"
    path.parent.mkdir(parents=True)
    with open(path, "w") as f:
        f.write(_line(1))
        f.write(json.dumps({"instruction": "x" * (17 * 2**20), "answer": "y"}) + "\n")
    return [f"dataset.data_files={path}"]


def _other_files_only(tmp: Path, demo: Path) -> list[str]:
    (tmp / "csv").mkdir()
    (tmp / "csv" / "train.csv").write_text("instruction,answer\n")
    return [f"dataset.data_files={tmp}/csv"]


def _a_shard_left_out(tmp: Path, demo: Path) -> list[str]:
    """A two-shard model whose config lists the first shard only."""
    import json
    import shutil

    model = tmp / "model"
    shutil.copytree(demo / "model", model)
    for i in (1, 2):
        shutil.copy(model / "model.safetensors", model / f"model-0000{i}-of-00002.safetensors")
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    return [f"checkpointer.checkpoint_dir={model}", "checkpointer.checkpoint_files=[model-00001-of-00002.safetensors]"]


def _tiny_yaml_without(key):
    def setup(tmp: Path, demo: Path) -> list[str]:
        from omegaconf import OmegaConf
        cfg = OmegaConf.load(Path(__file__).resolve().parents[1] / "configs" / "tiny_gdt_cpu.yaml")
        del cfg[key]
        OmegaConf.save(cfg, tmp / "config.yaml")
        return ["--config-file", str(tmp / "config.yaml")]
    return setup


def _gzip_named_jsonl(tmp: Path, demo: Path) -> list[str]:
    import gzip

    path = tmp / "data" / "train.jsonl"
    path.parent.mkdir(parents=True)
    path.write_bytes(gzip.compress(_line(1).encode()))
    return [f"dataset.data_files={path}"]


def _only_compressed(tmp: Path, demo: Path) -> list[str]:
    (tmp / "packed").mkdir()
    (tmp / "packed" / "train.jsonl.gz").write_bytes(b"\x1f\x8b")
    return [f"dataset.data_files={tmp}/packed"]


def _output_dir_file(tmp: Path, demo: Path) -> list[str]:
    (tmp / "afile").write_text("x")
    return [f"output_dir={tmp}/afile"]


def _output_dir_under_file(tmp: Path, demo: Path) -> list[str]:
    (tmp / "afile").write_text("x")
    return [f"output_dir={tmp}/afile/run"]


def _hf_tokenizer_json(tmp: Path, demo: Path) -> list[str]:
    (tmp / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {}}}))
    return [f"tokenizer.path={tmp}/tokenizer.json"]


def _final_save_under_file(tmp: Path, demo: Path) -> list[str]:
    (tmp / "afile").write_text("x")
    return [f"checkpointer.output_dir={tmp}/afile/epochs"]


def _special_tokens_past_vocab(tmp: Path, demo: Path) -> list[str]:
    """Special tokens at ids the 1024-row model cannot embed: the final save could not write a
    tokenizer.json that fits it (issue 28: refused at setup, not after training)."""
    added = json.loads((demo / "model" / "special_tokens.json").read_text())["added_tokens"]
    shifted = [{**t, "id": t["id"] + 1000} for t in added]
    (tmp / "special_tokens.json").write_text(json.dumps({"added_tokens": shifted}))
    return [f"tokenizer.special_tokens_path={tmp}/special_tokens.json"]


F = "{tmp}/data/train.jsonl"
DATA_CASES = [
    ("invalid-utf8", train_file(_line(1), b'{"instruction": "caf\xe9", "answer": "b"}\n'), [f"{F}:2: not valid UTF-8"]),
    ("invalid-json", train_file(_line(1), _line(2), '{"instruction": "a", "answer": \n'), [f"{F}:3: invalid JSON"]),
    ("json-array-line", train_file('["instruction", "answer"]\n'), [f"{F}:1: expected a JSON object"]),
    ("answer-not-string", train_file(_line(1, answer=7)), [f"{F}:1: field 'answer' is a int; expected a non-empty string"]),
    ("instruction-null", train_file(_line(1, instruction=None)), [f"{F}:1: field 'instruction' is missing"]),
    ("instruction-empty", train_file(_line(1, instruction="")), [f"{F}:1: field 'instruction' is empty"]),
    ("answer-whitespace", train_file(_line(1, answer="  \n ")), [f"{F}:1: field 'answer' is empty"]),
    ("answer-missing", train_file(json.dumps({"instruction": "a"}) + "\n"), [f"{F}:1: field 'answer' is missing"]),
    ("blank-line", train_file(_line(1), "\n", _line(2)), [f"{F}:2: empty line"]),
    ("huge-line", _huge_line, [f"{F}:2: line of 17 MiB, over the 16 MiB limit"]),
    ("duplicate-samples", train_file(_line(1), _line(2), _line(1)), [f"{F}:3: same instruction and answer as {F}:1"]),
    ("empty-file", train_file(), [f"{F}: the file is empty"]),
    ("empty-directory", _empty_dir, ["dataset.data_files: directory {tmp}/empty holds no *.jsonl files"]),
    ("directory-without-jsonl", _other_files_only, ["dataset.data_files: directory {tmp}/csv holds no *.jsonl"]),
    ("glob-matches-nothing", overrides("dataset.data_files={tmp}/nowhere/*.jsonl"),
     ["dataset.data_files: {tmp}/nowhere/*.jsonl matches no file"]),
    ("patients-in-two-splits", _val_shares_train,
     ["dataset and dataset_val share", "(e.g. the patient of {demo}/data/train/part-00000.jsonl:"]),
    ("meta-patientid-missing", lambda t, d: [*train_file(with_meta(1, target_meta=[{"lot_date": "2020-01-01"}]))(t, d),
                                            "dataset.splits_per_patient_therapy=1"],
     [f"{F}:1: field 'meta.patientid' is missing; it is needed by splits_per_patient_therapy"]),
    ("meta-target-meta-missing", lambda t, d: [*train_file(with_meta(1, patientid="p"))(t, d),
                                              "dataset.splits_per_patient_therapy=1"],
     [f"{F}:1: field 'meta.target_meta' is missing"]),
    ("meta-patientid-list", lambda t, d: [*train_file(with_meta(1, patientid=["p"]))(t, d),
                                         "dataset.splits_per_patient_therapy=1"],
     [f"{F}:1: field 'meta.patientid' must be a string"]),
    ("meta-bad-date", lambda t, d: [*train_file(with_meta(1, patientid="p", target_meta=[{"lot_date": "soon"}]))(t, d),
                                   "dataset.splits_per_patient_therapy=1"],
     [f"{F}:1: field 'meta.target_meta.lot_date' holds an unreadable date"]),
    ("meta-history-not-a-table", lambda t, d: [*train_file(with_meta(
        1, patientid="p", target_meta=[], split_date_included_in_input="2020-01-01", history_data="[1, 2]"))(t, d),
        "dataset.splits_per_patient_therapy=1"],
     [f"{F}:1: field 'meta.history_data' is not a pandas orient='split' table"]),
    ("gzip-named-jsonl", _gzip_named_jsonl, [f"{F}: the file is gzip-compressed; decompress it"]),
    ("only-compressed-files", _only_compressed,
     ["dataset.data_files: directory {tmp}/packed holds no *.jsonl files (found train.jsonl.gz: decompress it"]),
    ("all-samples-too-long", overrides("dataset.max_seq_len=64", "dataset.truncation=drop"),
     ["dropped by the length cap: raise dataset.max_seq_len"]),
    ("all-validation-samples-too-long", overrides("dataset_val.max_seq_len=64", "dataset_val.truncation=drop"),
     ["dataset_val: no samples (13 dropped by the length cap); raise dataset_val.max_seq_len"]),
]

CONFIG_CASES = [
    ("unknown-key", overrides("learning_rate=1e-4"), ["config key 'learning_rate' is not known to this recipe"]),
    ("typo-batch-size", overrides("bacth_size=2"), ["config key 'bacth_size'", "did you mean 'batch_size'"]),
    ("typo-save-every", overrides("save_every_n_step=5"), ["did you mean 'save_every_n_steps'"]),
    ("typo-keep-last", overrides("keep_last_checkpoints=3"), ["did you mean 'keep_last_n_checkpoints'"]),
    ("batch-size-text", overrides("batch_size=two"), ["config key 'batch_size': got 'two'; expected an integer >= 1"]),
    ("batch-size-zero", overrides("batch_size=0"), ["config key 'batch_size': got 0"]),
    ("grad-accum-zero", overrides("gradient_accumulation_steps=0"), ["config key 'gradient_accumulation_steps': got 0"]),
    ("epochs-float", overrides("epochs=1.5"), ["config key 'epochs': got 1.5"]),
    ("async-not-bool", overrides("async_checkpointing=maybe"), ["config key 'async_checkpointing': got 'maybe'"]),
    ("keep-1-with-async", overrides("async_checkpointing=true", "keep_last_n_checkpoints=1"),
     ["'keep_last_n_checkpoints' must be >= 2 with async_checkpointing=true"]),
    ("save-every-zero", overrides("save_every_n_steps=0"), ["config key 'save_every_n_steps': got 0"]),
    ("timeout-zero", overrides("checkpoint_timeout_minutes=0"),
     ["config key 'checkpoint_timeout_minutes': got 0; expected a number of minutes > 0"]),
    ("resume-number", overrides("resume_from_checkpoint=3"), ["config key 'resume_from_checkpoint': got 3"]),
    ("resume-nothing-saved", overrides("resume_from_checkpoint=true"),
     ["no usable step_N checkpoint in {tmp}/out", "resume_from_checkpoint=false"]),
    ("resume-missing-path", overrides("resume_from_checkpoint={tmp}/elsewhere/step_3"),
     ["{tmp}/elsewhere/step_3 is not usable (not a folder)"]),
    ("resume-from-final-epoch", overrides("resume_from_checkpoint={demo}/model"),
     ["config key 'resume_from_checkpoint': {demo}/model is a final Hugging Face checkpoint (epoch_N)",
      "pass a step_N folder"]),
    ("data-twice", overrides("dataset.data_files=[{demo}/data/train/part-00000.jsonl,{demo}/data/train]"),
     ["dataset.data_files: the file {demo}/data/train/part-00000.jsonl is reached twice", "give each file once"]),
    ("dtype-fp16", overrides("dtype=fp16"), ["config key 'dtype': got 'fp16'"]),
    ("device-tpu", overrides("device=tpu"), ["config key 'device': got 'tpu'"]),
    ("cuda-without-gpu", overrides("device=cuda"), ["no CUDA device is visible; set device=cpu"]),
    ("cpu-offload-on-cpu", overrides("fsdp_cpu_offload=true"), ["'fsdp_cpu_offload': true with device=cpu"]),
    ("validation-without-dataset", overrides("dataset_val=null"),
     ["'run_val_every_n_steps' is set but 'dataset_val' is missing"]),
    ("clip-negative", overrides("clip_grad_norm=-1"), ["config key 'clip_grad_norm': got -1"]),
    ("plain-cross-entropy", overrides("loss._component_=torch.nn.CrossEntropyLoss"),
     ["config key 'loss._component_'", "CEWithChunkedOutputLoss"]),
    ("missing-tokenizer", overrides("tokenizer.path={tmp}/nope/tokenizer.model"),
     ["config key 'tokenizer.path': {tmp}/nope/tokenizer.model is not a file"]),
    ("missing-checkpoint-dir", overrides("checkpointer.checkpoint_dir={tmp}/no_model"),
     ["config key 'checkpointer.checkpoint_dir': {tmp}/no_model is not a folder"]),
    ("missing-checkpoint-file", overrides("checkpointer.checkpoint_files=[model-0001.safetensors]"),
     ["config key 'checkpointer.checkpoint_files': model-0001.safetensors is not in"]),
    ("batch-larger-than-data", overrides("batch_size=100000"),
     ["samples make no optimizer step with batch_size=100000 x 1 ranks"]),
    ("truncation-unknown", overrides("dataset.truncation=middle"), ["dataset.truncation: 'middle' is not one of"]),
    ("max-seq-len-tiny", overrides("dataset.max_seq_len=4"), ["dataset.max_seq_len: 4; expected an integer >= 16"]),
    ("missing-optimizer", _tiny_yaml_without("optimizer"), ["config key 'optimizer' is missing"]),
    ("model-other-shape", overrides("model.num_layers=3"), ["checkpointer: weights do not match config key 'model'"]),
    ("val-other-cache", overrides("dataset_val.cache_dir={tmp}/other-cache"),
     ["dataset.cache_dir and dataset_val.cache_dir hold different id-hashing keys"]),
    ("float8-on-cpu", overrides("float8=true"), ["config key 'float8': float8 needs a CUDA GPU", "set float8=false"]),
    ("lr-negative", overrides("optimizer.lr=-1e-5"), ["config key 'optimizer.lr': got -1e-05; expected a number > 0 and < 1"]),
    ("lr-huge", overrides("optimizer.lr=5"), ["config key 'optimizer.lr': got 5; expected a number > 0 and < 1"]),
    ("lr-text", overrides("optimizer.lr=fast"), ["config key 'optimizer.lr': got 'fast'"]),
    ("weight-decay-negative", overrides("optimizer.weight_decay=-0.1"), ["config key 'optimizer.weight_decay': got -0.1"]),
    ("nested-typo-dataset", overrides("dataset.max_seqlen=100"),
     ["config key 'dataset.max_seqlen' is not an argument of gdt_tune.datasets.cgdb_instruct_dataset; "
      "did you mean 'max_seq_len'?"]),
    ("nested-typo-optimizer", overrides("optimizer.weight_decy=0.1"), ["config key 'optimizer.weight_decy'",
                                                                       "did you mean 'weight_decay'?"]),
    ("nested-typo-val", overrides("dataset_val.data_file=x"), ["config key 'dataset_val.data_file'",
                                                               "did you mean 'data_files'?"]),
    ("component-path-typo", overrides("model._component_=torchtune.models.llama3.llama33"),
     ["config key 'model._component_': cannot import 'torchtune.models.llama3.llama33'"]),
    ("output-dir-is-a-file", _output_dir_file, ["config key 'output_dir': {tmp}/afile is a file; choose a folder"]),
    ("output-dir-under-a-file", _output_dir_under_file,
     ["config key 'output_dir': cannot create or write {tmp}/afile/run ({tmp}/afile is not a writable folder)"]),
    ("tokenizer-json-instead-of-model", _hf_tokenizer_json,
     ["config key 'tokenizer.path': {tmp}/tokenizer.json is not a torchtune.models.llama3.llama3_tokenizer tokenizer",
      "original/tokenizer.model"]),
    ("model-context-below-cap", overrides("model.max_seq_len=1024"),
     ["config key 'dataset.max_seq_len': 2048 is above model.max_seq_len (1024)"]),
    ("val-batch-zero", overrides("batch_size_val=0"), ["config key 'batch_size_val': got 0; expected an integer >= 1 or null"]),
    ("num-workers-negative", overrides("num_workers=-2"), ["config key 'num_workers': got -2; expected an integer >= 0"]),
    ("val-metrics-negative", overrides("val_metrics_samples=-8"),
     ["config key 'val_metrics_samples': got -8; expected an integer >= 0"]),
    ("val-metrics-typo", overrides("val_metric_samples=8"),
     ["config key 'val_metric_samples' is not known to this recipe; did you mean 'val_metrics_samples'?"]),
    ("final-save-folder-unwritable", _final_save_under_file,
     ["config key 'checkpointer.output_dir': cannot write epoch_N into {tmp}/afile/epochs"]),
    ("special-tokens-cannot-serve", _special_tokens_past_vocab,
     ["config key 'tokenizer': the final checkpoint could not be served: no special token has an id below the "
      "model's vocab_size 1024"]),
    ("ac-option-typo", overrides("enable_activation_checkpointing=true", "ac_mode=selective", "ac_option=ops"),
     ["config key 'ac_option': got 'ops'"]),
    ("component-missing-argument", overrides("~metric_logger.log_dir"),
     ["config key 'metric_logger.log_dir' is missing: torchtune.training.metric_logging.DiskLogger needs it"]),
    ("shard-left-out", _a_shard_left_out,
     ["config key 'checkpointer.checkpoint_files': model-00002-of-00002.safetensors holds weights "
      "(model.safetensors.index.json lists it) but is not listed; list all 2 shards"]),
    ("share-prefixes-without-packing", overrides("share_prefixes=true"),
     ["config key 'share_prefixes': true needs packed rows", "set packing=true"]),
    ("packing-and-balanced-steps", overrides("packing=true", "balanced_steps=true"),
     ["config key 'balanced_steps': with packing=true every row has the same length", "set balanced_steps=false"]),
    ("collective-timeout-zero", overrides("collective_timeout_minutes=0"),
     ["config key 'collective_timeout_minutes': got 0; expected a number of minutes > 0"]),
]

CASES = DATA_CASES + CONFIG_CASES

"""The recipe's config: one typed dataclass per concern (training, data loading, checkpoints,
logging, validation), each field with its default, its check and a line of documentation.
Unknown keys, the "did you mean" hint, type and range errors all come from these fields::

    rc = parse(cfg, cuda_available=torch.cuda.is_available())   # ValueError naming the key and the fix
    rc.training.batch_size, rc.checkpoints.keep_last_n_checkpoints, rc.validation.val_metrics_samples, ...

The YAML stays flat, as torchtune's recipes (``batch_size: 1``, ``save_every_n_steps: 5000``), and
``tune run ... key=value`` overrides work as before. Components (``model``, ``tokenizer``,
``dataset``, ...; a ``_component_`` and its arguments) stay DictConfig and are built with
``torchtune.config.instantiate``. To add a key: add a field to one of the dataclasses below
(``docs/architecture.md``).
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import json
import os
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from gdt_tune.runtime.files import unwritable_folder

REQUIRED = MISSING


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def integer(default, doc: str, minimum: int = 1, null: bool = False):
    """An integer field >= ``minimum`` (or null)."""
    expected = f"an integer >= {minimum}" + (" or null" if null else "")
    ok = lambda v: (null and v is None) or (_is_int(v) and v >= minimum)  # noqa: E731
    return field(default=default, metadata={"doc": doc, "ok": ok, "expected": expected})


def positive(default, doc: str, expected: str = "a positive number or null"):
    """A number > 0, or null."""
    return field(default=default, metadata={"doc": doc, "ok": lambda v: v is None or (_is_number(v) and v > 0),
                                            "expected": expected})


def flag(default: bool, doc: str):
    return field(default=default, metadata={"doc": doc, "ok": lambda v: isinstance(v, bool),
                                            "expected": "true or false"})


def choice(default, doc: str, options: tuple, expected: str | None = None):
    return field(default=default, metadata={"doc": doc, "ok": lambda v: v in options,
                                            "expected": expected or " or ".join(map(str, options))})


def anything(default, doc: str, ok, expected: str):
    return field(default=default, metadata={"doc": doc, "ok": ok, "expected": expected})


@dataclass(frozen=True)
class Training:
    """Optimisation, the loop and how the model runs."""

    epochs: int = integer(REQUIRED, "passes over the training data")
    batch_size: int = integer(REQUIRED, "samples per rank per micro-batch")
    gradient_accumulation_steps: int = integer(1, "micro-batches per optimizer step")
    max_steps_per_epoch: int | None = integer(None, "stop an epoch after this many optimizer steps", null=True)
    clip_grad_norm: float | None = positive(None, "clip the global gradient norm to this; null: no clipping")
    seed: int | None = integer(None, "seed of the data order and the RNGs; null: random (a resume keeps "
                               "the saved one)", minimum=0, null=True)
    device: str = choice("cuda", "cuda (NCCL) or cpu (gloo)", ("cuda", "cpu"))
    dtype: str = choice("bf16", "parameters, gradients and optimizer states: bf16 or fp32", ("bf16", "fp32"),
                        "bf16 or fp32 (fp16 is not supported)")
    compile: bool = flag(False, "torch.compile each decoder layer and the loss")
    enable_activation_checkpointing: bool = flag(False, "recompute activations in backward (see ac_mode)")
    ac_mode: str | None = choice(None, "full (every layer) or selective (see ac_option); null: full",
                                 (None, "full", "selective"), "full or selective")
    ac_option: int | str | None = anything(
        None, "with ac_mode=selective: k (every k-th layer) or op (keep matmul outputs)",
        lambda v: v is None or v == "op" or (_is_int(v) and v >= 1),
        "a layer interval k >= 1 (every k-th layer) or op (keep matmul outputs, recompute the rest)")
    float8: bool = flag(False, "float8 matmuls in the decoder layers (torchao; CUDA compute capability >= 8.9)")
    custom_sharded_layers: list | None = anything(
        None, "modules sharded as their own FSDP unit besides the layers (e.g. [tok_embeddings, output])",
        lambda v: v is None or (isinstance(v, list) and all(isinstance(x, str) for x in v)),
        "a list of module names or null")
    fsdp_cpu_offload: bool = flag(False, "keep parameters and optimizer states in CPU memory (CUDA only)")
    fsdp_reshard_after_forward: bool = flag(True, "free gathered parameters after forward (less memory)")
    collective_timeout_minutes: float = anything(
        10, "after the first step: how long a training collective waits for a rank before the job ends with one "
            "line naming the silent rank (start-up, compile and the final save keep torch's longer timeout)",
        lambda v: _is_number(v) and v > 0, "a number of minutes > 0 (a frozen rank ends the job after this long)")


@dataclass(frozen=True)
class Data:
    """How the training data is loaded (what it holds is the ``dataset`` component's job)."""

    shuffle: bool = flag(True, "shuffle the global sample order each epoch (seeded)")
    num_workers: int = integer(0, "DataLoader worker processes per rank", minimum=0)
    balanced_steps: bool = flag(False, "each step's global batch holds samples of similar length, so every rank "
                                       "does about the same work (training.sampling.balanced_order)")
    balance_group: int | None = integer(None, "with balanced_steps: samples of similar length per group; null: the "
                                              "global batch (batch_size x ranks x accumulation)", null=True)
    balance_window: int = integer(64, "with balanced_steps: groups sorted by length together (larger: better "
                                      "balance, less shuffling)")
    packing: bool = flag(False, "rows of exactly dataset.max_seq_len tokens, each holding whole samples that see only "
                                "themselves (training.batches); false: one sample a row, as GDT")
    pack_window: int = integer(1024, "with packing: consecutive samples of the order placed together best-fit-decreasing "
                                     "(larger: fuller rows, less shuffling)")
    share_prefixes: bool = flag(False, "with packing: a patient's samples as one trie, each shared prefix trained once "
                                       "(training.prefix_trees); the order shuffles patients, not samples")


@dataclass(frozen=True)
class Checkpoints:
    """Interim checkpoints and resume (``gdt_tune.training.checkpointing``)."""

    output_dir: str = anything(REQUIRED, "where step_N/, epoch_N/ and logs go",
                               lambda v: isinstance(v, str) and v.strip() != "", "a folder path")
    save_every_n_steps: int | None = integer(None, "interim checkpoint every N optimizer steps; null: none",
                                             null=True)
    keep_last_n_checkpoints: int = integer(2, "keep the N newest complete step_N folders (>= 2 with async saves)")
    async_checkpointing: bool = flag(False, "write checkpoints in the background (training blocks while staging)")
    overwrite_output_dir: bool = flag(False, "start fresh in an output_dir holding another run: its files move to "
                                             "output_dir/previous-<run id>/ (never deleted)")
    checkpoint_timeout_minutes: float = anything(
        10, "how long a rank waits for the others in a checkpoint collective before failing with one line",
        lambda v: _is_number(v) and v > 0, "a number of minutes > 0 (raise it for a slow file system)")
    resume_from_checkpoint: bool | str = anything(
        False, "true: the newest usable step_N in output_dir; a path: that step_N; false: start fresh",
        lambda v: isinstance(v, (bool, str)), "true, false or a step_N path")


@dataclass(frozen=True)
class Logging:
    """Metrics and profiling."""

    log_every_n_steps: int = integer(1, "log loss, throughput and MFU every N optimizer steps")
    log_peak_memory_stats: bool = flag(True, "log peak CUDA memory")
    mfu_peak_tflops: float | None = positive(
        None, "the GPU's dense bf16 TFLOP/s for MFU; null: looked up from the GPU's name",
        "the GPU's dense bf16 TFLOP/s (e.g. 989 for an H100 SXM) or null to look it up from the GPU's name")


@dataclass(frozen=True)
class Validation:
    """When and how ``dataset_val`` is validated (``gdt_tune.training.validator``)."""

    run_val_every_n_steps: int | None = integer(None, "validation loss every N steps; null: at the end only",
                                                null=True)
    batch_size_val: int | None = integer(None, "validation batch per rank; null: batch_size", null=True)
    val_metrics_samples: int = integer(0, "with each validation, score the event tasks of this many validation "
                                       "samples (a fixed, seeded subset; all when fewer) and log val_events_*; 0: off",
                                       minimum=0)


#: Component blocks (``_component_`` + arguments), built by torchtune: True when required.
COMPONENTS = {"model": True, "tokenizer": True, "checkpointer": True, "dataset": True, "optimizer": True,
              "loss": True, "dataset_val": False, "lr_scheduler": False, "metric_logger": False, "profiler": False}
#: Arguments the recipe gives a component itself (the rest of its required ones must be in the config).
SUPPLIED = {"dataset": ("tokenizer",), "dataset_val": ("tokenizer",), "optimizer": ("params",),
            "lr_scheduler": ("optimizer", "num_training_steps")}
#: Free keys for interpolation (``${model_dir}/...``).
FREE_KEYS = ("demo_dir", "model_dir", "data_dir")
SECTIONS = (Training, Data, Checkpoints, Logging, Validation)


@dataclass(frozen=True)
class RecipeConfig:
    """The typed part of a recipe config; ``cfg`` holds the components (and everything else)."""

    training: Training
    data: Data
    checkpoints: Checkpoints
    logging: Logging
    validation: Validation
    cfg: DictConfig


def known_keys() -> list[str]:
    return sorted([f.name for s in SECTIONS for f in fields(s)] + list(COMPONENTS) + list(FREE_KEYS))


def has_component(cfg: DictConfig, key: str) -> bool:
    """True when ``key`` is set to a component. ``key=null`` on the command line leaves
    ``{_component_: null}`` (torchtune reads ``key=value`` as the component path), which counts as unset."""
    node = cfg.get(key)
    return node is not None and not (OmegaConf.is_dict(node) and node.get("_component_", "") is None)


def _section(cls, cfg: DictConfig):
    values = {}
    for f in fields(cls):
        if f.name not in cfg or (cfg[f.name] is None and f.default is REQUIRED):
            if f.default is REQUIRED:
                raise ValueError(f"config key '{f.name}' is missing; add it to the config or pass {f.name}=... "
                                 "on the command line")
            continue
        value = cfg[f.name]
        value = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
        if not f.metadata["ok"](value):
            raise ValueError(f"config key '{f.name}': got {value!r}; expected {f.metadata['expected']}")
        values[f.name] = value
    return cls(**values)


def parse(cfg: DictConfig, cuda_available: bool) -> RecipeConfig:
    """The typed config, or ValueError naming the first bad key and how to fix it."""
    known = set(known_keys())
    for key in cfg:
        if key not in known:
            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            hint = f"did you mean '{close[0]}'?" if close else "remove it"
            raise ValueError(f"config key '{key}' is not known to this recipe; {hint}")
    for key, required in COMPONENTS.items():
        if required and cfg.get(key) is None:
            raise ValueError(f"config key '{key}' is missing; add it to the config or pass {key}=... on the command line")
        if required and (not OmegaConf.is_dict(cfg[key]) or "_component_" not in cfg[key]):
            raise ValueError(f"config key '{key}' needs a '_component_' entry")
    rc = RecipeConfig(*(_section(s, cfg) for s in SECTIONS), cfg=cfg)
    _check_combinations(rc, cuda_available)
    return rc


def _check_combinations(rc: RecipeConfig, cuda_available: bool) -> None:
    t, c, v, cfg = rc.training, rc.checkpoints, rc.validation, rc.cfg
    if t.device == "cuda" and not cuda_available:
        raise ValueError("config key 'device': cuda, but no CUDA device is visible; set device=cpu or run on a GPU node")
    if t.device == "cpu" and t.fsdp_cpu_offload:
        raise ValueError("config key 'fsdp_cpu_offload': true with device=cpu; set fsdp_cpu_offload=false")
    if v.run_val_every_n_steps is not None and not has_component(cfg, "dataset_val"):
        raise ValueError("config key 'run_val_every_n_steps' is set but 'dataset_val' is missing; add dataset_val "
                         "or set run_val_every_n_steps=null")
    if rc.data.share_prefixes and not rc.data.packing:
        raise ValueError("config key 'share_prefixes': true needs packed rows (a patient's trie fills a row with other "
                         "tries); set packing=true")
    if rc.data.packing and rc.data.balanced_steps:
        raise ValueError("config key 'balanced_steps': with packing=true every row has the same length, so there is "
                         "nothing to balance; set balanced_steps=false")
    if c.async_checkpointing and c.keep_last_n_checkpoints < 2:
        raise ValueError("config key 'keep_last_n_checkpoints' must be >= 2 with async_checkpointing=true "
                         "(the newest save may still be in flight); raise it or set async_checkpointing=false")
    loss = str(cfg.loss.get("_component_", ""))
    if not loss.endswith("CEWithChunkedOutputLoss"):
        raise ValueError(f"config key 'loss._component_': got {loss!r}; expected torchtune.modules.loss.CEWithChunkedOutputLoss")
    profiler = cfg.get("profiler")
    if profiler is not None and not OmegaConf.is_dict(profiler):
        raise ValueError(f"config key 'profiler': got {profiler!r}; expected a block with enabled: true and the "
                         "torchtune.training.setup_torch_profiler options, or null")
    if not t.enable_activation_checkpointing:
        if t.ac_mode is not None or t.ac_option is not None:
            raise ValueError(f"config key '{'ac_mode' if t.ac_mode is not None else 'ac_option'}' is set but "
                             "enable_activation_checkpointing is false; set enable_activation_checkpointing=true")
    elif t.ac_mode != "selective" and t.ac_option is not None:
        raise ValueError(f"config key 'ac_option': {t.ac_option!r} needs ac_mode=selective; remove it or set "
                         "ac_mode=selective")
    elif t.ac_mode == "selective" and t.ac_option is None:
        raise ValueError("config key 'ac_option': got None; with ac_mode=selective expected a layer interval k >= 1 "
                         "(every k-th layer) or op (keep matmul outputs, recompute the rest)")


def _component(path: str, key: str):
    """The callable a ``_component_`` names, or ValueError naming the key."""
    module, _, name = str(path).rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        raise ValueError(f"config key '{key}._component_': cannot import {path!r}; check its spelling") from None


def check_components(cfg: DictConfig) -> None:
    """Arguments of the component blocks: unknown names (with a hint), the learning rate, and a
    dataset cap above the model's context. Raises ValueError naming the nested key."""
    for key in COMPONENTS:
        node = cfg.get(key)
        if not has_component(cfg, key) or not OmegaConf.is_dict(node) or "_component_" not in node:
            continue
        params = inspect.signature(_component(node._component_, key)).parameters
        for name, param in params.items():  # required arguments the recipe does not give itself
            if (param.default is inspect.Parameter.empty and name not in node and name not in SUPPLIED.get(key, ())
                    and param.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)):
                raise ValueError(f"config key '{key}.{name}' is missing: {node._component_} needs it; add it to the "
                                 f"config or pass {key}.{name}=... on the command line")
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            continue
        for arg in node:
            if arg != "_component_" and arg not in params:
                close = difflib.get_close_matches(str(arg), list(params), n=1)
                hint = f"did you mean '{close[0]}'?" if close else f"its arguments: {', '.join(params)}"
                raise ValueError(f"config key '{key}.{arg}' is not an argument of {node._component_}; {hint}")
    for arg, in_range, expected in (("lr", lambda v: 0 < v < 1, "> 0 and < 1 (GDT: 1e-5)"),
                                    ("weight_decay", lambda v: 0 <= v < 10, ">= 0 and < 10 (GDT: 0.1)")):
        value = cfg.optimizer.get(arg)
        if value is not None and not (_is_number(value) and in_range(value)):
            raise ValueError(f"config key 'optimizer.{arg}': got {value!r}; expected a number {expected}")
    model_len = cfg.model.get("max_seq_len")
    for key in ("dataset", "dataset_val"):
        cap = cfg.get(key).get("max_seq_len") if has_component(cfg, key) else None
        if _is_int(model_len) and _is_int(cap) and cap > model_len:
            raise ValueError(f"config key '{key}.max_seq_len': {cap} is above model.max_seq_len ({model_len}); "
                             f"lower {key}.max_seq_len or raise model.max_seq_len")


def check_paths(cfg: DictConfig) -> None:
    """Raise ValueError naming the config key of a tokenizer or checkpoint file that does not exist,
    or an output_dir (or the checkpointer's, for epoch_N) that cannot be a folder."""
    out = Path(cfg.output_dir)
    if (blocker := unwritable_folder(out)) == out and not out.is_dir():
        raise ValueError(f"config key 'output_dir': {out} is a file; choose a folder")
    if blocker is not None:
        raise ValueError(f"config key 'output_dir': cannot create or write {out} ({blocker} is not a writable folder); "
                         "choose a writable folder")
    final = cfg.checkpointer.get("output_dir")
    if final is not None and (blocker := unwritable_folder(Path(final))) is not None:  # where epoch_N goes
        raise ValueError(f"config key 'checkpointer.output_dir': cannot write epoch_N into {final} ({blocker} is not "
                         "a writable folder); choose a folder this job can write")
    for key in ("path", "special_tokens_path"):
        value = cfg.tokenizer.get(key)
        if value is not None and not os.path.isfile(value):
            raise ValueError(f"config key 'tokenizer.{key}': {value} is not a file; point it at the model's tokenizer")
    folder = cfg.checkpointer.get("checkpoint_dir")
    if folder is None or not os.path.isdir(folder):
        raise ValueError(f"config key 'checkpointer.checkpoint_dir': {folder} is not a folder; point it at the "
                         "downloaded model (e.g. tune download meta-llama/Llama-3.1-8B-Instruct --output-dir DIR)")
    files = cfg.checkpointer.get("checkpoint_files")
    names = [str(n) for n in files] if OmegaConf.is_list(files) else []
    for name in names:
        if not os.path.isfile(os.path.join(folder, name)):
            raise ValueError(f"config key 'checkpointer.checkpoint_files': {name} is not in {folder}; "
                             "list the model's *.safetensors files")
    index = Path(folder) / "model.safetensors.index.json"
    if names and index.is_file():  # a shard left out would look like another architecture later
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError):
            shards = []
        if missing := [s for s in shards if s not in names]:
            raise ValueError(f"config key 'checkpointer.checkpoint_files': {missing[0]} holds weights ({index.name} "
                             f"lists it) but is not listed; list all {len(shards)} shards: {', '.join(shards)}")

"""Fail-fast checks of a recipe config: unknown keys (with a "did you mean"), wrong types and
contradictory settings, each reported with the key and the fix before anything is built."""

from __future__ import annotations

import difflib
import os

from omegaconf import DictConfig, OmegaConf

#: Top-level keys the recipe reads. Names and meanings follow torchtune's full_finetune_distributed.
KNOWN_KEYS = {
    # components
    "model", "tokenizer", "checkpointer", "dataset", "dataset_val", "optimizer", "lr_scheduler",
    "loss", "metric_logger", "profiler",
    # training
    "seed", "shuffle", "batch_size", "batch_size_val", "epochs", "max_steps_per_epoch",
    "gradient_accumulation_steps", "clip_grad_norm", "compile", "device", "dtype",
    "enable_activation_checkpointing", "ac_mode", "ac_option", "float8", "custom_sharded_layers",
    "fsdp_cpu_offload", "fsdp_reshard_after_forward", "num_workers",
    # logging and validation
    "log_every_n_steps", "log_peak_memory_stats", "mfu_peak_tflops", "run_val_every_n_steps", "output_dir",
    # checkpoints
    "resume_from_checkpoint", "save_every_n_steps", "keep_last_n_checkpoints", "async_checkpointing",
    # free: interpolation helpers
    "demo_dir", "model_dir", "data_dir",
}
REQUIRED_KEYS = ("model", "tokenizer", "checkpointer", "dataset", "optimizer", "loss", "output_dir",
                 "batch_size", "epochs")


def has_component(cfg: DictConfig, key: str) -> bool:
    """True when ``key`` is set to a component. ``key=null`` on the command line leaves
    ``{_component_: null}`` (torchtune reads ``key=value`` as the component path), which counts as unset."""
    node = cfg.get(key)
    return node is not None and not (OmegaConf.is_dict(node) and node.get("_component_", "") is None)


def _int(cfg: DictConfig, key: str, minimum: int, allow_none: bool = False) -> None:
    value = cfg.get(key)
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        none = " or null" if allow_none else ""
        raise ValueError(f"config key '{key}': got {value!r}; expected an integer >= {minimum}{none}")


def _bool(cfg: DictConfig, key: str) -> None:
    if not isinstance(cfg.get(key, False), bool):
        raise ValueError(f"config key '{key}': got {cfg.get(key)!r}; expected true or false")


def check_config(cfg: DictConfig, cuda_available: bool) -> None:
    """Raise ValueError naming the first bad key and how to fix it."""
    for key in cfg:
        if key not in KNOWN_KEYS:
            close = difflib.get_close_matches(str(key), sorted(KNOWN_KEYS), n=1)
            hint = f"did you mean '{close[0]}'?" if close else "remove it"
            raise ValueError(f"config key '{key}' is not known to this recipe; {hint}")
    for key in REQUIRED_KEYS:
        if cfg.get(key) is None:
            raise ValueError(f"config key '{key}' is missing; add it to the config or pass {key}=... on the command line")
    for key in ("model", "tokenizer", "checkpointer", "dataset", "optimizer", "loss"):
        if not OmegaConf.is_dict(cfg[key]) or "_component_" not in cfg[key]:
            raise ValueError(f"config key '{key}' needs a '_component_' entry")
    _int(cfg, "batch_size", 1)
    _int(cfg, "epochs", 1)
    _int(cfg, "gradient_accumulation_steps", 1) if "gradient_accumulation_steps" in cfg else None
    _int(cfg, "max_steps_per_epoch", 1, allow_none=True)
    _int(cfg, "log_every_n_steps", 1) if "log_every_n_steps" in cfg else None
    _int(cfg, "run_val_every_n_steps", 1, allow_none=True)
    _int(cfg, "batch_size_val", 1, allow_none=True)
    _int(cfg, "num_workers", 0) if "num_workers" in cfg else None
    _int(cfg, "seed", 0, allow_none=True)
    _int(cfg, "save_every_n_steps", 1, allow_none=True)
    _int(cfg, "keep_last_n_checkpoints", 1) if "keep_last_n_checkpoints" in cfg else None
    resume = cfg.get("resume_from_checkpoint", False)
    if not isinstance(resume, (bool, str)):
        raise ValueError(f"config key 'resume_from_checkpoint': got {resume!r}; expected true, false or a step_N path")
    for key in ("shuffle", "compile", "enable_activation_checkpointing", "fsdp_cpu_offload",
                "log_peak_memory_stats", "fsdp_reshard_after_forward", "async_checkpointing", "float8"):
        _bool(cfg, key)
    _check_activation_checkpointing(cfg)
    profiler = cfg.get("profiler")
    if profiler is not None and not OmegaConf.is_dict(profiler):
        raise ValueError(f"config key 'profiler': got {profiler!r}; expected a block with enabled: true and the "
                         "torchtune.training.setup_torch_profiler options, or null")
    peak = cfg.get("mfu_peak_tflops")
    if peak is not None and (isinstance(peak, bool) or not isinstance(peak, (int, float)) or peak <= 0):
        raise ValueError(f"config key 'mfu_peak_tflops': got {peak!r}; expected the GPU's dense bf16 TFLOP/s "
                         "(e.g. 989 for an H100 SXM) or null to look it up from the GPU's name")
    clip = cfg.get("clip_grad_norm")
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float)) or clip <= 0):
        raise ValueError(f"config key 'clip_grad_norm': got {clip!r}; expected a positive number or null")
    if cfg.get("dtype", "bf16") not in ("bf16", "fp32"):
        raise ValueError(f"config key 'dtype': got {cfg.get('dtype')!r}; expected bf16 or fp32 (fp16 is not supported)")
    device = cfg.get("device", "cuda")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"config key 'device': got {device!r}; expected cpu or cuda")
    if device == "cuda" and not cuda_available:
        raise ValueError("config key 'device': cuda, but no CUDA device is visible; set device=cpu or run on a GPU node")
    if device == "cpu" and cfg.get("fsdp_cpu_offload", False):
        raise ValueError("config key 'fsdp_cpu_offload': true with device=cpu; set fsdp_cpu_offload=false")
    if cfg.get("run_val_every_n_steps") is not None and not has_component(cfg, "dataset_val"):
        raise ValueError("config key 'run_val_every_n_steps' is set but 'dataset_val' is missing; add dataset_val or set run_val_every_n_steps=null")
    if cfg.get("async_checkpointing", False) and cfg.get("keep_last_n_checkpoints", 2) < 2:
        raise ValueError("config key 'keep_last_n_checkpoints' must be >= 2 with async_checkpointing=true "
                         "(the newest save may still be in flight); raise it or set async_checkpointing=false")
    loss = str(cfg.loss.get("_component_", ""))
    if not loss.endswith("CEWithChunkedOutputLoss"):
        raise ValueError(f"config key 'loss._component_': got {loss!r}; expected torchtune.modules.loss.CEWithChunkedOutputLoss")


def _check_activation_checkpointing(cfg: DictConfig) -> None:
    mode, option = cfg.get("ac_mode"), cfg.get("ac_option")
    if not cfg.get("enable_activation_checkpointing", False):
        if mode is not None or option is not None:
            raise ValueError(f"config key '{'ac_mode' if mode is not None else 'ac_option'}' is set but "
                             "enable_activation_checkpointing is false; set enable_activation_checkpointing=true")
        return
    if mode not in (None, "full", "selective"):
        raise ValueError(f"config key 'ac_mode': got {mode!r}; expected full or selective")
    if mode == "selective":
        every = isinstance(option, int) and not isinstance(option, bool) and option >= 1
        if not every and option != "op":
            raise ValueError(f"config key 'ac_option': got {option!r}; with ac_mode=selective expected a layer "
                             "interval k >= 1 (every k-th layer) or op (keep matmul outputs, recompute the rest)")
    elif option is not None:
        raise ValueError(f"config key 'ac_option': {option!r} needs ac_mode=selective; remove it or set ac_mode=selective")


def check_paths(cfg: DictConfig) -> None:
    """Raise ValueError naming the config key of a tokenizer or checkpoint file that does not exist."""
    for key in ("path", "special_tokens_path"):
        value = cfg.tokenizer.get(key)
        if value is not None and not os.path.isfile(value):
            raise ValueError(f"config key 'tokenizer.{key}': {value} is not a file; point it at the model's tokenizer")
    folder = cfg.checkpointer.get("checkpoint_dir")
    if folder is None or not os.path.isdir(folder):
        raise ValueError(f"config key 'checkpointer.checkpoint_dir': {folder} is not a folder; point it at the "
                         "downloaded model (e.g. tune download meta-llama/Llama-3.1-8B-Instruct --output-dir DIR)")
    files = cfg.checkpointer.get("checkpoint_files")
    names = list(files) if OmegaConf.is_list(files) else []
    for name in names:
        if not os.path.isfile(os.path.join(folder, str(name))):
            raise ValueError(f"config key 'checkpointer.checkpoint_files': {name} is not in {folder}; "
                             "list the model's *.safetensors files")

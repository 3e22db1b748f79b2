"""Letting a torchtune ``FullModelHFCheckpointer`` save without reading the weights first.

A resumed run takes its weights from the interim checkpoint, but the checkpointer's
``save_checkpoint`` needs the key -> file map that ``load_checkpoint`` builds as a side effect
(reading 16 GB for an 8B model). :func:`prepare_for_save` builds that map from the safetensors
headers alone. torchtune has no public API for it, so this is the one place that writes the
checkpointer's private ``_weight_map``, checked against the torchtune version it was written for
(tests/test_hf_weights.py fails if torchtune changes how the map is built); on another version
it reads the weights instead.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torchtune

from gdt_tune.training.model_shapes import shape_mismatch

log = logging.getLogger("gdt_tune")
TESTED_TORCHTUNE = ("0.6.",)


def weight_map(paths) -> dict[str, str]:
    """``{weight name: "0001"-style file number}`` of safetensors files, from their headers."""
    from safetensors import safe_open

    out = {}
    for i, path in enumerate(paths):
        with safe_open(str(path), framework="pt") as f:
            out.update(dict.fromkeys(f.keys(), f"{i + 1:04}"))
    return out


def prepare_for_save(checkpointer) -> None:
    """Make ``checkpointer.save_checkpoint`` work without ``load_checkpoint``."""
    from torchtune.training import FullModelHFCheckpointer

    paths = getattr(checkpointer, "_checkpoint_paths", None)
    known = torchtune.__version__.startswith(TESTED_TORCHTUNE) and type(checkpointer) is FullModelHFCheckpointer
    if not known or paths is None or not all(str(p).endswith(".safetensors") for p in paths):
        if type(checkpointer) is FullModelHFCheckpointer and not torchtune.__version__.startswith(TESTED_TORCHTUNE):
            log.warning("checkpointer: torchtune %s is untested here; reading the HF weights to learn their file "
                        "layout", torchtune.__version__)
        checkpointer.load_checkpoint()
        return
    checkpointer._weight_map = weight_map(paths)


def tune_shapes(checkpointer) -> dict[str, tuple] | None:
    """``{torchtune weight name: shape}`` of a Llama-type HF safetensors checkpoint, from the file
    headers and config.json alone (meta tensors through torchtune's key conversion), so a model
    config that does not fit the weights is refused before 16 GB are read. None when the
    checkpoint is of another kind (the full load checks it then)."""
    import json

    from safetensors import safe_open
    from torchtune.models.convert_weights import hf_to_tune
    from torchtune.training import FullModelHFCheckpointer

    paths = getattr(checkpointer, "_checkpoint_paths", None)
    if type(checkpointer) is not FullModelHFCheckpointer or not paths or str(
            getattr(checkpointer, "_model_type", "")).split(".")[-1] not in ("LLAMA3", "LLAMA3_2", "LLAMA2"):
        return None
    if not all(str(p).endswith(".safetensors") for p in paths):
        return None
    c = json.loads((Path(paths[0]).parent / "config.json").read_text())
    meta = {}
    for path in paths:
        with safe_open(str(path), framework="pt") as f:
            meta.update({k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()})
    converted = hf_to_tune(meta, num_heads=c["num_attention_heads"],
                           num_kv_heads=c.get("num_key_value_heads", c["num_attention_heads"]), dim=c["hidden_size"],
                           head_dim=c.get("head_dim"))
    return {k: tuple(v.shape) for k, v in converted.items()}


def init_rope_buffers(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Compute the rotary-embedding caches: buffers that no checkpoint holds (after ``to_empty``)."""
    from torchtune.training import set_default_dtype

    with set_default_dtype(dtype), device:
        for m in model.modules():
            if hasattr(m, "rope_init"):
                m.rope_init()


def check_weights_fit(shapes: dict[str, tuple], model: torch.nn.Module, checkpoint_dir) -> None:
    """ValueError naming the first weight whose shape (``{name: shape}``, from the HF checkpoint in
    ``checkpoint_dir``) differs from ``model``'s (config key ``model``)."""
    mismatch = shape_mismatch(shapes, {k: tuple(v.shape) for k, v in model.state_dict().items()})
    if mismatch:
        name, theirs, ours = mismatch
        raise ValueError(f"checkpointer: weights do not match config key 'model' ({name}: checkpoint {theirs}, "
                         f"model {ours}); set model to the architecture of {checkpoint_dir}")


class Placeholders(dict):
    """``{torchtune name: shape}`` standing in for the full HF weights on the ranks that do not read
    them. torchtune's ``load_from_full_model_state_dict`` shards each weight with
    ``distribute_tensor``, which takes the values of the first rank of the mesh (global rank 0) and
    scatters its shards, so the other ranks need only tensors of the right shape: each is made
    (uninitialised, on the device, in the model's dtype) when the loader reaches it, so no rank
    holds them all and none reads the checkpoint."""

    def __init__(self, shapes: dict[str, tuple], dtype: torch.dtype, device: torch.device):
        super().__init__(shapes)
        self.dtype, self.device = dtype, device

    def items(self):
        for name, shape in super().items():
            yield name, torch.empty(shape, dtype=self.dtype, device=self.device)


def weights_for_rank(checkpointer, rank: int, shapes: dict[str, tuple] | None, dtype: torch.dtype,
                     device: torch.device) -> tuple[dict, int]:
    """(the weights to give ``load_from_full_model_state_dict``, bytes this rank read): rank 0 reads
    the HF checkpoint, the others get :class:`Placeholders` (one read per job, so at most one per
    node). With ``shapes`` None (a checkpoint whose shapes the headers do not give) every rank reads."""
    if rank == 0 or shapes is None:
        state = checkpointer.load_checkpoint()["model"]
        return state, sum(t.numel() * t.element_size() for t in state.values())
    return Placeholders(shapes, dtype, device), 0

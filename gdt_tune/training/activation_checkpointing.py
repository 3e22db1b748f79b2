"""Activation checkpointing of the decoder layers: all of them, every k-th one, or op-level
selective (keep the matmul and attention outputs, recompute the cheap element-wise ops)::

    enable_activation_checkpointing: true
    ac_mode: full          # full: every layer recomputed in backward
    # ac_mode: selective
    # ac_option: 2         # every 2nd layer (k >= 1)
    # ac_option: op        # every layer, op-level: matmuls and attention kept

Applied on the meta device before compile and sharding; each layer is wrapped in place, so
checkpoint and state-dict keys do not change (the wrapper's prefix is stripped by torch).
"""

from __future__ import annotations

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

_aten = torch.ops.aten
#: Outputs kept by op-level selective checkpointing: the expensive ops. Everything else (norms,
#: rotary embeddings, SiLU, residual adds, casts) is recomputed in backward.
SAVED_OPS = {
    _aten.mm.default,
    _aten.addmm.default,
    _aten.bmm.default,
    _aten._scaled_mm.default,  # float8 matmuls
    _aten._scaled_dot_product_flash_attention.default,
    _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_cudnn_attention.default,
    _aten._scaled_dot_product_flash_attention_for_cpu.default,
}


def _keep_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _op_level_context():
    return create_selective_checkpoint_contexts(_keep_matmuls)


def layers_to_checkpoint(num_layers: int, mode: str, option: int | str | None) -> list[int]:
    """Indices of the layers to wrap: all for ``full`` and ``selective``/``op``, every k-th
    (the k-th, 2k-th, ... counted from 1) for ``selective``/``k``."""
    if mode == "full" or option == "op":
        return list(range(num_layers))
    every = int(option)
    return [i for i in range(num_layers) if (i + 1) % every == 0]


def apply_activation_checkpointing(model: torch.nn.Module, mode: str, option: int | str | None = None) -> list[int]:
    """Wrap ``model.layers`` (a torchtune decoder) as ``mode``/``option`` say; returns the wrapped
    indices. Non-reentrant checkpointing, no RNG state saved (the model has no dropout)."""
    kwargs = {"preserve_rng_state": False}
    if mode == "selective" and option == "op":
        kwargs["context_fn"] = _op_level_context
    wrapped = layers_to_checkpoint(len(model.layers), mode, option)
    for i in wrapped:
        model.layers[i] = checkpoint_wrapper(model.layers[i], **kwargs)
    return wrapped


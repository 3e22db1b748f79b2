"""A model's shapes without its weights, and whether saved weights fit them::

    model = meta_model(cfg.model, torch.bfloat16)     # on the meta device: no memory, no 16 GB read
    model.tok_embeddings.num_embeddings, model.max_seq_len
    refuse_other_model(f"checkpoint {path}", saved_shapes, model.state_dict(), fix)
    state_bytes(model, optimizer)                     # about what a checkpoint of them takes on disk

The recipe builds the model once, on the meta device, reads its vocabulary and context from it and
then shards it; the tools open a trained model (``gdt_tune.trained.model``) the same way.
"""

from __future__ import annotations

import torch


def meta_model(cfg_model, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """The config's ``model`` component on the meta device (parameters in ``dtype`` when given)."""
    from torchtune import config, training

    with torch.device("meta"):
        if dtype is None:
            return config.instantiate(cfg_model)
        with training.set_default_dtype(dtype):
            return config.instantiate(cfg_model)


def shape_mismatch(theirs: dict, ours: dict) -> tuple[str, tuple | None, tuple | None] | None:
    """The first tensor name (sorted) whose shape differs between two ``{name: shape}`` maps, with
    both shapes (None where absent); None when they match."""
    for name in sorted(set(theirs) | set(ours)):
        if theirs.get(name) != ours.get(name):
            return name, theirs.get(name), ours.get(name)
    return None


def refuse_other_model(what: str, saved: dict[str, tuple], model_state: dict, fix: str) -> None:
    """ValueError naming the first tensor whose saved shape (``{name: shape}``) differs from
    ``model_state``'s: "{what} holds another model (...); {fix}"."""
    mismatch = shape_mismatch(saved, {k: tuple(v.shape) for k, v in model_state.items()})
    if mismatch:
        name, theirs, ours = mismatch
        raise ValueError(f"{what} holds another model ({name}: saved {theirs}, this config {ours}); {fix}")


def state_bytes(model, optimizer=None) -> int:
    """Bytes of the model's parameters and the optimizer's state, over all ranks (a DTensor's
    ``numel`` is its global one): about what a checkpoint of them takes on disk. No collective."""
    tensors = [*model.parameters()]
    if optimizer is not None:
        tensors += [t for state in optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)

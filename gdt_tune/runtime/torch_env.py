"""torch's settings for this process, each read or made in one place: the dtype names of the configs
and the command line, the compile backend, the CUDA allocator and Python's garbage collector::

    dtype = torch_dtype("bf16")                  # config key 'dtype', evaluate --dtype
    layer.compile(backend=compile_backend())     # $TORCH_COMPILE_BACKEND, default inductor
    prefer_expandable_segments()                 # on CUDA, before its first allocation
    with CollectEvery(50) as gc_steps:           # the training loop: gc_steps.step(step)
"""

from __future__ import annotations

import gc
import os

import torch

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
#: the allocator settings torch reads at its first CUDA allocation (the newer name first)
ALLOC_CONF_VARS = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")


def torch_dtype(name: str) -> torch.dtype:
    """``bf16`` or ``fp32`` as a torch dtype."""
    return DTYPES[name]


def compile_backend() -> str:
    """The ``torch.compile`` backend: ``$TORCH_COMPILE_BACKEND`` (tests use ``eager``), else inductor."""
    return os.environ.get("TORCH_COMPILE_BACKEND", "inductor")


def prefer_expandable_segments() -> bool:
    """Use the CUDA caching allocator's expandable segments unless the user configured the allocator
    (as torchtitan runs): samples of 1k-8k tokens allocate activations of a different size every step,
    and fixed-size segments then fragment into blocks no later step fits. Call before the first
    CUDA allocation; returns whether it set it."""
    if any(os.environ.get(name) for name in ALLOC_CONF_VARS):
        return False
    os.environ[ALLOC_CONF_VARS[0]] = "expandable_segments:True"
    return True


class CollectEvery:
    """Python's automatic garbage collection off while training, a young-generation collection every
    ``every`` steps instead (as torchtitan's ``GarbageCollection``): an automatic collection can start
    in any step on any rank and stall the others in the next collective."""

    def __init__(self, every: int = 50):
        self.every = every
        self._was_enabled = gc.isenabled()

    def __enter__(self) -> CollectEvery:
        gc.disable()
        gc.collect(1)
        return self

    def step(self, step: int) -> None:
        if step % self.every == 0:
            gc.collect(1)

    def __exit__(self, *exc) -> None:
        if self._was_enabled:
            gc.enable()

"""torchtune's profiler for the training loop, as a ``with`` block (a no-op one when off)::

    profiler:
      _component_: torchtune.training.setup_torch_profiler
      enabled: true
      wait_steps: 5
      warmup_steps: 3
      active_steps: 2
      num_cycles: 1

Traces go to ``${output_dir}/profiling`` unless ``profiler.output_dir`` says otherwise.
"""

from __future__ import annotations

import logging
import os

import torch
from omegaconf import DictConfig, OmegaConf
from torchtune import config
from torchtune.training import DummyProfiler

log = logging.getLogger("gdt_tune")


def step_profiler(cfg_profiler: DictConfig | None, output_dir: str, device: torch.device, announce: bool):
    """The configured profiler (``profiler.step()`` after every step), or torchtune's ``DummyProfiler``."""
    if cfg_profiler is None or not cfg_profiler.get("enabled", False):
        return DummyProfiler()
    cfg_profiler = OmegaConf.merge({"_component_": "torchtune.training.setup_torch_profiler",
                                    "output_dir": os.path.join(output_dir, "profiling"),
                                    "cuda": device.type == "cuda"}, cfg_profiler)
    profiler, _ = config.instantiate(cfg_profiler)
    if announce:
        log.info("profiler: traces in %s", cfg_profiler.output_dir)
    return profiler

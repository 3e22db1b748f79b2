"""float8 training (opt-in), through torchao: every ``nn.Linear`` of the decoder layers runs its
matmuls in float8 with dynamic tensor-wise scales, and FSDP2 all-gathers the weights in float8.
The output head stays in bf16 (its logits feed the loss directly)::

    float8: true      # needs CUDA compute capability >= 8.9 (H100, H200, L40S, L4, B200)

Apply :func:`convert_to_float8` on the meta-device model before sharding, and call
:func:`after_optimizer_step` after each optimizer step (one all-reduce for all weight scales).
torch's ``_scaled_mm`` needs every inner dimension divisible by 16, and in the weight-gradient
matmul that dimension is the micro-batch's token count: with float8 the recipe pads every row to a
multiple of 16 tokens (``training.batches``; the padding has no label and no sample sees it).
"""

from __future__ import annotations

import torch


def float8_problem(device: torch.device) -> str | None:
    """Why ``device`` cannot train in float8, or None when it can."""
    if device.type != "cuda":
        return f"float8 needs a CUDA GPU with compute capability >= 8.9, not device {device.type}"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        return (f"float8 needs compute capability >= 8.9 (H100, L40S, ...); {torch.cuda.get_device_name(device)} "
                f"has {major}.{minor}")
    return None


def _float8_eligible(module: torch.nn.Module, fqn: str) -> bool:
    """Linear layers inside the decoder layers whose dims suit float8 matmuls (multiples of 16)."""
    return (isinstance(module, torch.nn.Linear) and fqn.startswith("layers.")
            and module.in_features % 16 == 0 and module.out_features % 16 == 0)


def convert_to_float8(model: torch.nn.Module, emulate: bool = False) -> list[str]:
    """Swap the eligible linear layers for torchao ``Float8Linear``; returns their names. ``emulate``:
    torchao's float8 maths in fp32 (any device; the tests' CPU check of the padding)."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    names = [n for n, m in model.named_modules() if _float8_eligible(m, n)]
    convert_to_float8_training(model, config=Float8LinearConfig(enable_fsdp_float8_all_gather=True, emulate=emulate),
                               module_filter_fn=_float8_eligible)
    return names


def after_optimizer_step(model: torch.nn.Module) -> None:
    """Recompute the float8 scales of the (updated) sharded weights for the next all-gather."""
    from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

    precompute_float8_dynamic_scale_for_fsdp(model)

"""Model FLOPs utilisation: one formula for the recipe and ``bench/``, and the GPU's peak.

MFU = tokens/s per GPU x FLOPs per token / peak FLOP/s per GPU, with FLOPs per token as in PaLM
(Chowdhery et al. 2022, appendix B): ``6 N + 12 L d T``, N the parameters without the input
embedding (a lookup, no matmul), L layers, d the model width, T the sequence length (causal
attention counted in full, as PaLM does). The peak is the GPU's dense bf16 tensor-core rate, looked
up from its name, or set in the config::

    mfu_peak_tflops: null     # null: from the GPU's name (H100 SXM 989, A100 312, ...); e.g. 756 for an H100 PCIe
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

#: Dense (no sparsity) bf16 tensor-core TFLOP/s from the vendors' data sheets, matched in order
#: against ``torch.cuda.get_device_name()``: the more specific name first.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("GB200", 2500.0),
    ("B200", 2250.0),
    ("B100", 1750.0),
    ("H100 PCIe", 756.5),
    ("H100 NVL", 835.5),
    ("H800 PCIe", 756.5),
    ("GH200", 989.4),
    ("H200", 989.4),
    ("H100", 989.4),   # SXM / HBM3
    ("H800", 989.4),
    ("H20", 148.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.05),
    ("L40", 181.05),
    ("L4", 121.0),
    ("A6000", 154.8),
    ("A40", 149.7),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("MI300X", 1307.4),
    ("MI250X", 383.0),
)


def peak_tflops(device_name: str) -> float | None:
    """Dense bf16 peak of a GPU by its name, or None when unknown (then set ``mfu_peak_tflops``)."""
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops
    return None


def device_peak_tflops(device, configured: float | None, warn: bool = True) -> float | None:
    """The peak for MFU: ``mfu_peak_tflops`` when set, else the CUDA GPU's by its name (a warning for
    an unknown one); None on CPU."""
    if configured is not None or device.type != "cuda":
        return configured
    import logging

    import torch

    peak = peak_tflops(torch.cuda.get_device_name(device))
    if peak is None and warn:
        logging.getLogger("gdt_tune").warning("mfu: unknown GPU %r; set mfu_peak_tflops=<its dense bf16 TFLOP/s> to "
                                              "log MFU", torch.cuda.get_device_name(device))
    return peak


def flops_per_token(params_without_embedding: int, num_layers: int, dim: int, seq_len: float) -> float:
    """Training FLOPs per token, forward and backward (PaLM appendix B)."""
    return 6.0 * params_without_embedding + 12.0 * num_layers * dim * seq_len


#: Llama-3.1-8B: parameters without the input embedding, layers, width (data-report's work estimate).
LLAMA3_1_8B = (8_030_261_248 - 128_256 * 4096, 32, 4096)


def decoder_flops_per_token(model) -> Callable[[float], float]:
    """:func:`flops_per_token` of a torchtune ``TransformerDecoder`` (also on the meta device), as
    a function of the sequence length."""
    n = sum(p.numel() for p in model.parameters()) - model.tok_embeddings.weight.numel()
    return partial(flops_per_token, n, len(model.layers), model.tok_embeddings.embedding_dim)


def mfu(tokens_per_second_per_gpu: float, flops_per_tok: float, peak: float) -> float:
    """Fraction of the peak (``peak`` in TFLOP/s) that the model's FLOPs use."""
    return tokens_per_second_per_gpu * flops_per_tok / (peak * 1e12)

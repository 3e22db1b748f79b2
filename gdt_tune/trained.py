"""A trained model for the tools (``gdt-tune evaluate``, ``export``): the model, tokenizer and
training system prompt of a final Hugging Face ``epoch_N`` folder, or of an interim ``step_N`` with
the training config::

    model, tokenizer, prompt = load_model_and_tokenizer(Path("RUN/step_500"), cfg, torch.device("cpu"), torch.float32)
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from gdt_tune.data.layout import trained_with
from gdt_tune.prompting import load_tokenizer, tokenizer_file_in, tokenizer_from_config
from gdt_tune.training.checkpointing import is_interim_checkpoint, load_model_weights, refuse_other_model
from gdt_tune.training.hf_weights import init_rope_buffers


def load_model_and_tokenizer(checkpoint: Path, cfg, device: torch.device, dtype: torch.dtype):
    """(model, tokenizer, system prompt) from a final HF folder (``epoch_N``) or an interim
    ``step_N`` (which needs the training config for the model and tokenizer)."""
    from torchtune import config as tt_config

    if not checkpoint.is_dir():
        raise ValueError(f"--checkpoint {checkpoint} is not a folder; pass a step_N or epoch_N folder of a run")
    is_interim = is_interim_checkpoint(checkpoint)
    if cfg is None and is_interim:
        raise ValueError(f"--checkpoint {checkpoint} is an interim step_N checkpoint; pass the training --config too")
    if cfg is not None:
        with torch.device("meta"):
            model = tt_config.instantiate(cfg.model)
        tokenizer = tokenizer_from_config(cfg.tokenizer)
        prompt, _ = trained_with(cfg.dataset)
    else:
        model, tokenizer = _from_hf_folder(checkpoint)
        prompt, _ = trained_with(None)
    model = model.to_empty(device=device).to(dtype)
    if is_interim:
        load_model_weights(checkpoint, model, "pass the --config it was trained with")
    else:
        state = _hf_weights(checkpoint)
        refuse_other_model(f"--checkpoint {checkpoint}", {k: tuple(v.shape) for k, v in state.items()},
                           model.state_dict(), "pass the --config it was trained with")
        model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True)
    init_rope_buffers(model, device, dtype)
    return model.eval(), tokenizer, prompt


def _from_hf_folder(folder: Path):
    from torchtune.models.llama3 import llama3
    from torchtune.models.llama3_1 import llama3_1

    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ValueError(f"--checkpoint {folder} has no config.json; pass a final epoch_N folder or --config")
    c = json.loads(config_file.read_text())
    dims = dict(vocab_size=c["vocab_size"], num_layers=c["num_hidden_layers"], num_heads=c["num_attention_heads"],
                num_kv_heads=c.get("num_key_value_heads", c["num_attention_heads"]), embed_dim=c["hidden_size"],
                max_seq_len=c["max_position_embeddings"], intermediate_dim=c["intermediate_size"],
                norm_eps=c["rms_norm_eps"], rope_base=c.get("rope_theta", 500000.0))
    scaling = c.get("rope_scaling") or {}
    with torch.device("meta"):
        model = (llama3_1(**dims, scale_factor=scaling.get("factor", 8)) if scaling.get("rope_type") == "llama3"
                 else llama3(**dims))
    return model, load_tokenizer(tokenizer_file_in(folder))


def _hf_weights(folder: Path) -> dict:
    from torchtune.training import FullModelHFCheckpointer

    files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"--checkpoint {folder} holds no *.safetensors weights")
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = FullModelHFCheckpointer(checkpoint_dir=str(folder), checkpoint_files=files, model_type="LLAMA3",
                                       output_dir=tmp)
        return ckpt.load_checkpoint()["model"]

"""A model folder laid out exactly like the ``meta-llama/Llama-3.1-8B-Instruct`` snapshot, at toy
width: ``config.json`` with ``rope_scaling`` ``llama3`` (factor 8), the real 128,256-token
vocabulary, four bf16 shards ``model-0000K-of-00004.safetensors`` with
``model.safetensors.index.json``, Meta's ``original/tokenizer.model``, and the stock HF files a
snapshot carries (a chat template with the "Cutting Knowledge Date" lines that gdt_tune must
replace)::

    write_snapshot(folder, meta_assets / TOKENIZER)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

VOCAB = 128_256
DIMS = dict(vocab_size=VOCAB, num_layers=4, num_heads=4, num_kv_heads=2, embed_dim=64, max_seq_len=131072,
            intermediate_dim=128, norm_eps=1e-5, rope_base=500000.0, scale_factor=8)
#: the config overrides that give the shipped 8B config this size
MODEL_OVERRIDES = ["model._component_=torchtune.models.llama3_1.llama3_1"] + [
    f"model.{k}={v}" for k, v in DIMS.items()]
ROPE_SCALING = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192, "rope_type": "llama3"}


def hf_config() -> dict:
    """The real snapshot's config.json with the toy sizes."""
    return {"architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
            "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "head_dim": 16, "hidden_act": "silu",
            "hidden_size": DIMS["embed_dim"], "initializer_range": 0.02, "intermediate_size": DIMS["intermediate_dim"],
            "max_position_embeddings": DIMS["max_seq_len"], "mlp_bias": False, "model_type": "llama",
            "num_attention_heads": DIMS["num_heads"], "num_hidden_layers": DIMS["num_layers"],
            "num_key_value_heads": DIMS["num_kv_heads"], "pretraining_tp": 1, "rms_norm_eps": DIMS["norm_eps"],
            "rope_scaling": ROPE_SCALING, "rope_theta": DIMS["rope_base"], "tie_word_embeddings": False,
            "torch_dtype": "bfloat16", "transformers_version": "4.43.0.dev0", "use_cache": True, "vocab_size": VOCAB}


def _shard_of(name: str) -> int:
    """Shard 1: embeddings and layer 0; 2, 3: layers 1, 2; 4: layer 3, the final norm and lm_head."""
    if name.startswith("model.layers."):
        return int(name.split(".")[2]) + 1
    return 1 if name.startswith("model.embed_tokens") else 4


def write_snapshot(folder: Path, tokenizer_model: Path, seed: int = 0) -> Path:
    from torchtune.models.convert_weights import tune_to_hf
    from torchtune.models.llama3_1 import llama3_1

    torch.manual_seed(seed)
    model = llama3_1(**DIMS)
    state = tune_to_hf(model.state_dict(), num_heads=DIMS["num_heads"], num_kv_heads=DIMS["num_kv_heads"],
                       dim=DIMS["embed_dim"])
    folder.mkdir(parents=True)
    shards: dict[int, dict] = {}
    for name, tensor in state.items():
        shards.setdefault(_shard_of(name), {})[name] = tensor.to(torch.bfloat16).contiguous()
    weight_map, total = {}, 0
    for k, tensors in sorted(shards.items()):
        file = f"model-{k:05d}-of-00004.safetensors"
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        weight_map.update({name: file for name in tensors})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    (folder / "config.json").write_text(json.dumps(hf_config(), indent=2))
    (folder / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 128000, "do_sample": True, "eos_token_id": [128001, 128008, 128009], "temperature": 0.6,
         "top_p": 0.9}, indent=2))
    stock_template = ("{{- bos_token }}{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
                      "{{- 'Cutting Knowledge Date: December 2023\\n' }}{{- 'Today Date: 26 Jul 2024\\n\\n' }}")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": stock_template,
         "model_max_length": 131072, "tokenizer_class": "PreTrainedTokenizerFast"}, indent=2))
    (folder / "original").mkdir()
    shutil.copy(tokenizer_model, folder / "original" / "tokenizer.model")
    return folder

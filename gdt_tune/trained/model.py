"""A trained model for the tools (``gdt-tune evaluate``, ``export``): a final Hugging Face ``epoch_N``
folder (or any HF Llama 3 folder), or an interim ``step_N`` with its training config. Opening reads
no weights, so a tool checks everything it needs (the tokenizer, the serving files, the output folder)
before the slow part::

    trained = open_trained(Path("RUN/step_500"), cfg)     # cfg: needed for a step_N
    trained.tokenizer, trained.system_prompt, trained.max_seq_len, trained.vocab_size
    model = trained.load(torch.device("cpu"), torch.float32)
"""

from __future__ import annotations

import copy
import json
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from gdt_tune.data.layout import trained_with
from gdt_tune.trained.prompting import load_tokenizer, tokenizer_file_in, tokenizer_from_config
from gdt_tune.training.checkpointing import model_only_state, saved_model_shapes
from gdt_tune.training.hf_weights import init_rope_buffers
from gdt_tune.training.model_shapes import meta_model, refuse_other_model
from gdt_tune.training.step_dirs import checkpoint_problem, is_interim_checkpoint

FIX = "pass the --config it was trained with"


@dataclass
class TrainedModel:
    folder: Path
    interim: bool  # a step_N (DCP), else an HF folder
    tokenizer: object  # the torchtune Llama 3 tokenizer trained with
    tokenizer_file: Path  # its tokenizer.model (the serving files are made from it)
    system_prompt: str
    max_seq_len: int  # the training cap
    meta: torch.nn.Module  # the model on the meta device

    @property
    def vocab_size(self) -> int:
        return self.meta.tok_embeddings.num_embeddings

    def load(self, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
        """The model with its trained weights, in eval mode. Another model's weights (a config that
        does not fit) are a ValueError naming the first tensor."""
        model = copy.deepcopy(self.meta).to_empty(device=device).to(dtype)  # self.meta stays on meta
        if self.interim:
            _load_step(self.folder, model)
        else:
            state = _hf_weights(self.folder)
            refuse_other_model(f"--checkpoint {self.folder}", {k: tuple(v.shape) for k, v in state.items()},
                               model.state_dict(), FIX)
            model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True)
        init_rope_buffers(model, device, dtype)
        return model.eval()


def open_trained(checkpoint, cfg=None) -> TrainedModel:
    """A ``step_N`` (needs the training ``cfg``: model, tokenizer, dataset prompt) or an HF folder
    (its config.json and tokenizer.model; ``cfg`` when given says the model, tokenizer and prompt)."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        raise ValueError(f"--checkpoint {checkpoint} is not a folder; give a run's step_N or epoch_N")
    interim = is_interim_checkpoint(checkpoint)
    if interim and cfg is None:
        raise ValueError(f"--checkpoint {checkpoint} is an interim step_N checkpoint; pass the training --config too")
    if not interim and not (checkpoint / "config.json").is_file():
        raise ValueError(f"--checkpoint {checkpoint} is neither an interim step_N nor a final epoch_N folder")
    if cfg is not None:
        system_prompt, max_seq_len = trained_with(cfg.dataset)
        return TrainedModel(checkpoint, interim, tokenizer_from_config(cfg.tokenizer), Path(cfg.tokenizer.path),
                            system_prompt, max_seq_len, meta_model(cfg.model))
    system_prompt, max_seq_len = trained_with(None)
    tokenizer_file = tokenizer_file_in(checkpoint)
    return TrainedModel(checkpoint, interim, load_tokenizer(tokenizer_file), tokenizer_file, system_prompt, max_seq_len,
                        _meta_model_of_hf_folder(checkpoint))


def checkpoint_holding(path) -> Path | None:
    """The checkpoint folder (a ``step_N``, or an HF folder with weights) that is ``path`` or holds it."""
    path = Path(path).resolve()
    for folder in (path, *path.parents):
        if is_interim_checkpoint(folder) or ((folder / "config.json").is_file() and any(folder.glob("*.safetensors"))):
            return folder
    return None


def _load_step(path: Path, model: torch.nn.Module) -> None:
    """The model weights of a ``step_N`` into an unsharded ``model`` (one process reads it all)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    problem = checkpoint_problem(path)
    if problem:
        raise ValueError(f"checkpoint {path} is not usable ({problem})")
    refuse_other_model(f"checkpoint {path}", saved_model_shapes(path), model.state_dict(), FIX)
    state = model_only_state(model.state_dict())
    with warnings.catch_warnings():  # one process (evaluate, export) reads it all: DCP warns that it assumes so
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        dcp.load(state, checkpoint_id=str(path), planner=DefaultLoadPlanner(allow_partial_load=True))
    model.load_state_dict(next(iter(state.values()))["model"])


def _meta_model_of_hf_folder(folder: Path) -> torch.nn.Module:
    """torchtune's Llama 3 (or 3.1, by its rope scaling) of an HF folder's config.json, on meta."""
    from torchtune.models.llama3 import llama3
    from torchtune.models.llama3_1 import llama3_1

    try:
        c = json.loads((folder / "config.json").read_text())
        dims = dict(vocab_size=c["vocab_size"], num_layers=c["num_hidden_layers"], num_heads=c["num_attention_heads"],
                    num_kv_heads=c.get("num_key_value_heads", c["num_attention_heads"]), embed_dim=c["hidden_size"],
                    max_seq_len=c["max_position_embeddings"], intermediate_dim=c["intermediate_size"],
                    norm_eps=c["rms_norm_eps"], rope_base=c.get("rope_theta", 500000.0))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"--checkpoint {folder}/config.json is not a Llama config ({type(e).__name__}: {e}); "
                         f"{FIX}") from None
    scaling = c.get("rope_scaling") or {}
    with torch.device("meta"):
        return (llama3_1(**dims, scale_factor=scaling.get("factor", 8)) if scaling.get("rope_type") == "llama3"
                else llama3(**dims))


def _hf_weights(folder: Path) -> dict:
    from torchtune.training import FullModelHFCheckpointer

    files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"--checkpoint {folder} holds no *.safetensors weights")
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = FullModelHFCheckpointer(checkpoint_dir=str(folder), checkpoint_files=files, model_type="LLAMA3",
                                       output_dir=tmp)
        return ckpt.load_checkpoint()["model"]

"""The exact prompt a GDT model was trained with, for callers without a chat template::

    import gdt_tune
    p = gdt_tune.prompt(instruction, tokenizer="RUN/epoch_0/tokenizer.model")
    p.text   # '<|begin_of_text|><|start_header_id|>system<|end_header_id|>\\n\\n...<|end_header_id|>\\n\\n'
    p.ids    # the token ids training used, up to and including the assistant header

The model's answer follows and ends with ``<|eot_id|>``. ``system_prompt``: the one the model was
trained with (``dataset.system_prompt``; None: gdt_tune's default).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gdt_tune.data.layout import Layout, system_prompt_or_default


@dataclass(frozen=True)
class Prompt:
    text: str
    ids: list[int] | None  # None without a tokenizer


def load_tokenizer(path, special_tokens=None):
    """torchtune's Llama 3 tokenizer from a ``tokenizer.model``, with ``special_tokens`` (a
    ``special_tokens.json``; default: the one beside it when there is one, as the demo's; a Llama
    3.1 snapshot has none)."""
    from torchtune.models.llama3 import llama3_tokenizer

    special = Path(special_tokens) if special_tokens else Path(path).with_name("special_tokens.json")
    try:
        return llama3_tokenizer(str(path), special_tokens_path=str(special) if special.is_file() else None)
    except Exception as e:
        raise ValueError(f"{path} is not a tiktoken tokenizer.model ({type(e).__name__}); use the model's "
                         "original/tokenizer.model") from None


def tokenizer_from_config(node):
    """The config's ``tokenizer`` component; a file of another format (an HF tokenizer.json, a
    SentencePiece model) is one line naming the key."""
    from torchtune import config

    try:
        return config.instantiate(node)
    except Exception as e:
        raise ValueError(f"config key 'tokenizer.path': {node.get('path')} is not a {node._component_} "
                         f"tokenizer file ({type(e).__name__}); point it at the model's original/tokenizer.model"
                         ) from None


def tokenizer_file_in(folder: Path) -> Path:
    """The ``tokenizer.model`` of an HF model folder (at its top or under ``original/``)."""
    found = [p for p in (folder / "tokenizer.model", folder / "original" / "tokenizer.model") if p.is_file()]
    if not found:
        raise ValueError(f"--checkpoint {folder} holds no tokenizer.model; pass the training --config")
    return found[0]


def _header(role: str) -> str:
    return f"<|start_header_id|>{role}<|end_header_id|>\n\n"


def prompt(instruction: str, system_prompt: str | None = None, tokenizer=None) -> Prompt:
    """The training prompt of ``instruction`` as text and, given a tokenizer (a torchtune Llama 3
    tokenizer, or the path of a ``tokenizer.model``; a ``special_tokens.json`` beside it is used),
    as ids."""
    system = system_prompt_or_default(system_prompt).strip()
    text = (f"<|begin_of_text|>{_header('system')}{system}<|eot_id|>{_header('user')}{instruction.strip()}"
            f"<|eot_id|>{_header('assistant')}")
    if tokenizer is None:
        return Prompt(text, None)
    if isinstance(tokenizer, (str, Path)):
        tokenizer = load_tokenizer(tokenizer)
    layout = Layout.build(tokenizer, system)
    return Prompt(text, [*layout.prompt_tokens(instruction), *layout.assistant_header])

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

from gdt_tune.datasets._layout import DEFAULT_SYSTEM_PROMPT, Layout


@dataclass(frozen=True)
class Prompt:
    text: str
    ids: list[int] | None  # None without a tokenizer


def _header(role: str) -> str:
    return f"<|start_header_id|>{role}<|end_header_id|>\n\n"


def prompt(instruction: str, system_prompt: str | None = None, tokenizer=None) -> Prompt:
    """The training prompt of ``instruction`` as text and, given a tokenizer (a torchtune Llama 3
    tokenizer, or the path of a ``tokenizer.model``; a ``special_tokens.json`` beside it is used),
    as ids."""
    system = (DEFAULT_SYSTEM_PROMPT if system_prompt is None else system_prompt).strip()
    text = (f"<|begin_of_text|>{_header('system')}{system}<|eot_id|>{_header('user')}{instruction.strip()}"
            f"<|eot_id|>{_header('assistant')}")
    if tokenizer is None:
        return Prompt(text, None)
    if isinstance(tokenizer, (str, Path)):
        from torchtune.models.llama3 import llama3_tokenizer

        special = Path(tokenizer).with_name("special_tokens.json")
        tokenizer = llama3_tokenizer(str(tokenizer), special_tokens_path=str(special) if special.is_file() else None)
    layout = Layout.build(tokenizer, system)
    return Prompt(text, [*layout.prompt_tokens(instruction), *layout.assistant_header])

"""Serving files for a trained model: a Hugging Face folder whose tokenizer and chat template give
exactly the token layout GDT trained on (docs/data-format.md §4), and GDT's sampling defaults
(``GENERATION``, also what ``gdt-tune evaluate`` samples forecasts with).

Written into every final ``epoch_N/`` by the recipe, and by ``gdt-tune export`` for any checkpoint
(``gdt_tune.cli.export``)::

    write_serving_files(folder, "model/original/tokenizer.model", tokenizer, system_prompt, max_seq_len, vocab_size)

Files: ``tokenizer.json`` (the tiktoken BPE as a Hugging Face fast tokenizer, every special token
at its training id; see :func:`serving_special_tokens` for torchtune's built-in Llama 3 set, which
leaves id 128011 empty and puts ``<|image|>`` at 128256, past the model's vocabulary),
``tokenizer_config.json`` with a ``chat_template`` that renders
``<|begin_of_text|>`` then each turn as ``<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>``
(content stripped; the training system prompt when none is given; no "Cutting Knowledge Date"
lines), ``special_tokens_map.json`` and ``generation_config.json`` (GDT's sampling, ``GENERATION``;
stop at ``<|eot_id|>``).
"""

from __future__ import annotations

import json
from pathlib import Path

#: torchtune's Llama 3 pre-tokenizer pattern (tiktoken cl100k); the demo tokenizer is trained with it too.
PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
           r"\s*[\r\n]+|\s+(?!\S)|\s+")
#: GDT's sampling settings for forecasts.
TEMPERATURE, TOP_P = 0.9, 0.85
GENERATION = {"do_sample": True, "temperature": TEMPERATURE, "top_p": TOP_P}


def _byte_level_alphabet() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (what ByteLevel BPE vocabularies use)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


def serving_special_tokens(base_vocab_size: int, special_tokens: dict[str, int], vocab_size: int) -> dict[int, str]:
    """``{id: name}`` of the added tokens of ``tokenizer.json``, in id order from ``base_vocab_size``
    (the BPE ranks) on: every special token at the id training used. A gap between them (torchtune's
    built-in Llama 3 set has none at 128011) is filled with a placeholder ``<|unused_id_N|>`` that no
    text contains, because Hugging Face numbers added tokens consecutively. A special token at
    ``vocab_size`` or above is left out: the model has no embedding row for it, so training never
    used it (torchtune's ``<|image|>`` at 128256). Checked in the recipe's setup, before the first step."""
    by_id: dict[int, str] = {}
    for name, token_id in special_tokens.items():
        if token_id < base_vocab_size:
            raise ValueError(f"special token {name} has id {token_id}, inside the tokenizer's {base_vocab_size} BPE "
                             "ranks; give tokenizer.special_tokens_path a file whose special ids follow the ranks")
        if token_id in by_id:
            raise ValueError(f"special tokens {by_id[token_id]} and {name} share id {token_id}; fix "
                             "tokenizer.special_tokens_path")
        by_id[token_id] = name
    kept = [i for i in by_id if i < vocab_size]
    if not kept:
        raise ValueError(f"no special token has an id below the model's vocab_size {vocab_size}; the tokenizer does "
                         "not belong to this model (check tokenizer.path and the model config)")
    return {i: by_id.get(i, f"<|unused_id_{i}|>") for i in range(base_vocab_size, max(kept) + 1)}


def hf_tokenizer(ranks: dict[bytes, int], added: dict[int, str], bos_id: int):
    """A ``tokenizers.Tokenizer`` that encodes like torchtune's tiktoken Llama 3 tokenizer; ``added``:
    :func:`serving_special_tokens`."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE

    alphabet = _byte_level_alphabet()

    def text(token: bytes) -> str:
        return "".join(alphabet[b] for b in token)

    vocab = {text(token): rank for token, rank in ranks.items()}
    # tiktoken merges the adjacent pair whose concatenation has the lowest rank: every split of a
    # token into two tokens is a merge, ordered by the rank of the result
    merges = sorted((rank, ranks[token[:i]], ranks[token[i:]], text(token[:i]), text(token[i:]))
                    for token, rank in ranks.items() for i in range(1, len(token))
                    if token[:i] in ranks and token[i:] in ranks)
    bpe = BPE(vocab, [(a, b) for *_, a, b in merges], fuse_unk=False, ignore_merges=True)
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    if tok.get_vocab_size() != min(added):
        raise ValueError(f"the tokenizer's BPE ranks are not 0..{min(added) - 1}; is it a Llama 3 tokenizer.model?")
    tok.add_special_tokens([AddedToken(added[i], special=True, normalized=False) for i in sorted(added)])
    bos = added[bos_id]
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                      special_tokens=[(bos, bos_id)])
    return tok


def chat_template(system_prompt: str) -> str:
    """Jinja chat template of the training layout; without a system message, the training one."""
    default = json.dumps(system_prompt.strip())  # a JSON string is a valid Jinja string literal
    return ("{{- bos_token }}"
            "{%- if messages[0]['role'] != 'system' %}"
            "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' + " + default + " + '<|eot_id|>' }}"
            "{%- endif %}"
            "{%- for message in messages %}"
            "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
            " + '<|eot_id|>' }}"
            "{%- endfor %}"
            "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}")


def check_serving(tokenizer, vocab_size: int) -> dict[int, str]:
    """What :func:`write_serving_files` needs of the torchtune ``tokenizer`` trained with, checked
    without writing anything (the recipe's setup and ``gdt-tune export`` call it before any work):
    the added tokens of ``tokenizer.json`` and the ids the serving files name."""
    added = serving_special_tokens(tokenizer.tt_model.base_vocab_size, dict(tokenizer.special_tokens), vocab_size)
    needed = ("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|finetune_right_pad_id|>",
              "<|start_header_id|>", "<|end_header_id|>")
    missing = [n for n in needed if tokenizer.special_tokens.get(n) not in added]
    if missing:
        raise ValueError(f"the tokenizer has no {', '.join(missing)} below the model's vocab_size {vocab_size}; "
                         "a Llama 3 tokenizer is needed to serve the model")
    return added


def write_serving_files(folder, tokenizer_model: str | Path, tokenizer, system_prompt: str, max_seq_len: int,
                        vocab_size: int) -> None:
    """Write the serving files into ``folder`` (an HF model folder), replacing any stock ones.
    ``tokenizer`` is the torchtune tokenizer trained with (its special tokens and ids);
    ``vocab_size`` the model's (its embedding rows)."""
    from tiktoken.load import load_tiktoken_bpe

    folder = Path(folder)
    added = check_serving(tokenizer, vocab_size)
    specials = dict(tokenizer.special_tokens)
    hf_tokenizer(load_tiktoken_bpe(str(tokenizer_model)), added, specials["<|begin_of_text|>"]).save(
        str(folder / "tokenizer.json"))
    names = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "pad_token": "<|finetune_right_pad_id|>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(names, indent=1))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", **names, "model_max_length": max_seq_len,
        "clean_up_tokenization_spaces": False, "chat_template": chat_template(system_prompt),
        "added_tokens_decoder": {str(i): {"content": n, "special": True, "normalized": False, "lstrip": False,
                                          "rstrip": False, "single_word": False} for i, n in added.items()},
    }, indent=1))
    (folder / "generation_config.json").write_text(json.dumps({
        "bos_token_id": specials["<|begin_of_text|>"], "eos_token_id": [specials["<|eot_id|>"],
                                                                         specials["<|end_of_text|>"]],
        "pad_token_id": specials["<|finetune_right_pad_id|>"], **GENERATION}, indent=1))

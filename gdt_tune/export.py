"""Serving files for a trained model: a Hugging Face folder whose tokenizer and chat template give
exactly the token layout GDT trained on (docs/data-format.md §4), and GDT's sampling defaults.

Written into every final ``epoch_N/`` by the recipe, and by ``gdt-tune export`` for any checkpoint::

    gdt-tune export --checkpoint RUN/epoch_0 --out serve/            # a final checkpoint
    gdt-tune export --checkpoint RUN/step_5000 --config my.yaml --out serve/   # an interim one

Files: ``tokenizer.json`` (the tiktoken BPE as a Hugging Face fast tokenizer, every special token
at its training id), ``tokenizer_config.json`` with a ``chat_template`` that renders
``<|begin_of_text|>`` then each turn as ``<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>``
(content stripped; the training system prompt when none is given; no "Cutting Knowledge Date"
lines), ``special_tokens_map.json`` and ``generation_config.json`` (temperature 0.9, top-p 0.85,
stop at ``<|eot_id|>``).
"""

from __future__ import annotations

import json
from pathlib import Path

#: torchtune's Llama 3 pre-tokenizer pattern (tiktoken cl100k).
PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
           r"\s*[\r\n]+|\s+(?!\S)|\s+")
#: GDT's sampling settings for forecasts.
GENERATION = {"do_sample": True, "temperature": 0.9, "top_p": 0.85}


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


def hf_tokenizer(ranks: dict[bytes, int], special_tokens: dict[str, int]):
    """A ``tokenizers.Tokenizer`` that encodes like torchtune's tiktoken Llama 3 tokenizer."""
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
    for name, token_id in sorted(special_tokens.items(), key=lambda kv: kv[1]):
        if tok.get_vocab_size() != token_id:
            raise ValueError(f"special token {name} has id {token_id} but would get {tok.get_vocab_size()}; "
                             "the tokenizer's special tokens must follow its ranks")
        tok.add_special_tokens([AddedToken(name, special=True, normalized=False)])
    bos = "<|begin_of_text|>"
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                      special_tokens=[(bos, special_tokens[bos])])
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


def write_serving_files(folder, tokenizer_model: str | Path, tokenizer, system_prompt: str, max_seq_len: int) -> None:
    """Write the serving files into ``folder`` (an HF model folder), replacing any stock ones.
    ``tokenizer`` is the torchtune tokenizer trained with (its special tokens and ids)."""
    from tiktoken.load import load_tiktoken_bpe

    folder = Path(folder)
    specials = dict(tokenizer.special_tokens)
    hf_tokenizer(load_tiktoken_bpe(str(tokenizer_model)), specials).save(str(folder / "tokenizer.json"))
    names = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "pad_token": "<|finetune_right_pad_id|>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(names, indent=1))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", **names, "model_max_length": max_seq_len,
        "clean_up_tokenization_spaces": False, "chat_template": chat_template(system_prompt),
        "added_tokens_decoder": {str(i): {"content": n, "special": True, "normalized": False, "lstrip": False,
                                          "rstrip": False, "single_word": False} for n, i in specials.items()},
    }, indent=1))
    (folder / "generation_config.json").write_text(json.dumps({
        "bos_token_id": specials["<|begin_of_text|>"], "eos_token_id": [specials["<|eot_id|>"],
                                                                         specials["<|end_of_text|>"]],
        "pad_token_id": specials["<|finetune_right_pad_id|>"], **GENERATION}, indent=1))


#: Written into every export: only a folder holding it may be replaced (``--replace``).
EXPORT_MARKER = "gdt_export.json"


def check_export_target(checkpoint: Path, out: Path, replace: bool) -> None:
    """An export goes into a new or empty folder, or (``replace``) over an earlier export; anything
    else (a run's epoch_N, a base model's snapshot, a folder of the user's files) is refused in one
    line before any work, and nothing is touched."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a new or empty folder")
    here, source = out.resolve(), checkpoint.resolve()
    if here == source or source in here.parents or here in source.parents:
        raise ValueError(f"--out {out} is or overlaps the checkpoint {checkpoint}; give a new or empty folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if (out / EXPORT_MARKER).is_file():
        if not replace:
            raise ValueError(f"--out {out} holds an earlier export; pass --replace to replace it, or give a new folder")
        return
    names = sorted(p.name for p in out.iterdir())
    raise ValueError(f"--out {out} is not empty ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}) and "
                     "holds no earlier export; give a new or empty folder (nothing was written)")


def export_checkpoint(checkpoint, out, cfg=None, replace: bool = False) -> Path:
    """``gdt-tune export``: an HF folder in ``out`` that serves like training, from a final
    ``epoch_N`` (copied; ``cfg`` gives the system prompt when it was not the default) or an
    interim ``step_N`` (needs the training ``cfg``: model, tokenizer, base checkpoint). ``out`` is
    new or empty, or an earlier export with ``replace``: the export is written beside it and swapped
    in at the end, so a failed export leaves ``out`` as it was."""
    import shutil
    import tempfile

    from gdt_tune.data.layout import DEFAULT_SYSTEM_PROMPT
    from gdt_tune.training.checkpointing import is_interim_checkpoint

    checkpoint, out = Path(checkpoint), Path(out)
    if not checkpoint.is_dir():
        raise ValueError(f"--checkpoint {checkpoint} is not a folder; give a run's epoch_N or step_N")
    interim = is_interim_checkpoint(checkpoint)
    if interim and cfg is None:
        raise ValueError(f"--checkpoint {checkpoint} is an interim step_N checkpoint; pass the training --config too")
    if not interim and not (checkpoint / "config.json").is_file():
        raise ValueError(f"--checkpoint {checkpoint} is neither an interim step_N nor a final epoch_N folder")
    check_export_target(checkpoint, out, replace)
    prompt = (cfg.dataset.get("system_prompt") if cfg is not None else None) or DEFAULT_SYSTEM_PROMPT
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    try:
        if interim:  # load it, write HF weights
            import torch
            from torchtune import config as tt_config
            from torchtune.training import FullModelHFCheckpointer

            from gdt_tune.eval.evaluate import load_model_and_tokenizer
            from gdt_tune.training.hf_weights import prepare_for_save

            dtype = torch.bfloat16 if cfg.get("dtype", "bf16") == "bf16" else torch.float32
            model, tokenizer, _ = load_model_and_tokenizer(checkpoint, cfg, torch.device("cpu"), dtype)
            with tempfile.TemporaryDirectory() as tmp:
                hf = tt_config.instantiate(cfg.checkpointer, output_dir=tmp)
                if not isinstance(hf, FullModelHFCheckpointer):
                    raise ValueError("config key 'checkpointer': export needs torchtune.training.FullModelHFCheckpointer")
                prepare_for_save(hf)
                hf.save_checkpoint({"model": {k: v.detach() for k, v in model.state_dict().items()}}, epoch=0)
                for item in (Path(tmp) / "epoch_0").iterdir():
                    shutil.move(str(item), staging / item.name)
            tokenizer_model = Path(cfg.tokenizer.path)
        else:
            shutil.copytree(checkpoint, staging, dirs_exist_ok=True)
            from gdt_tune.prompting import load_tokenizer, tokenizer_file_in

            tokenizer_model = Path(cfg.tokenizer.path) if cfg is not None else tokenizer_file_in(checkpoint)
            tokenizer = load_tokenizer(tokenizer_model)
        max_seq_len = cfg.dataset.get("max_seq_len", 8000) if cfg is not None else 8000
        write_serving_files(staging, tokenizer_model, tokenizer, prompt, max_seq_len)
        (staging / EXPORT_MARKER).write_text(json.dumps({"checkpoint": str(checkpoint.resolve())}, indent=1) + "\n")
        old = None
        if out.is_dir() and any(out.iterdir()):  # an earlier export (checked above): swap it out
            old = out.with_name(f".{out.name}.replaced-{staging.name.rsplit('-', 1)[-1]}")
            out.rename(old)
        elif out.is_dir():
            out.rmdir()
        staging.rename(out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out

"""``gdt-tune export``: a Hugging Face folder that serves like training (``gdt_tune.trained.serving``) from
a final ``epoch_N`` or an interim ``step_N``::

    gdt-tune export --checkpoint RUN/epoch_0 --out serve/            # a final checkpoint
    gdt-tune export --checkpoint RUN/step_5000 --config my.yaml --out serve/   # an interim one
    gdt-tune export --checkpoint RUN/step_6000 --config my.yaml --out serve/ --replace   # over an earlier export
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from gdt_tune.runtime.files import check_output_folder
from gdt_tune.trained.serving import check_serving, write_serving_files
from gdt_tune.training.step_dirs import MARKER, final_dir

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

    from gdt_tune.trained.model import open_trained

    checkpoint, out = Path(checkpoint), Path(out)
    trained = open_trained(checkpoint, cfg)
    if (found := next(checkpoint.rglob("predictions.jsonl"), None)) is not None:
        raise ValueError(f"--checkpoint {checkpoint} holds evaluate's {found} (per-sample truths, file:line), which must "
                         "not reach a serving folder; move it out of the checkpoint, then export")
    check_export_target(checkpoint, out, replace)
    check_output_folder(out)
    check_serving(trained.tokenizer, trained.vocab_size)  # before any weights are read or anything is written
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    try:
        if trained.interim:  # load it, write HF weights
            import torch
            from torchtune import config as tt_config
            from torchtune.training import FullModelHFCheckpointer

            from gdt_tune.runtime.torch_env import torch_dtype
            from gdt_tune.training.config import parse
            from gdt_tune.training.hf_weights import prepare_for_save

            # the recipe's typed config: same keys, same defaults
            dtype = torch_dtype(parse(cfg, cuda_available=True).training.dtype)
            model = trained.load(torch.device("cpu"), dtype)
            with tempfile.TemporaryDirectory() as tmp:
                hf = tt_config.instantiate(cfg.checkpointer, output_dir=tmp)
                if not isinstance(hf, FullModelHFCheckpointer):
                    raise ValueError("config key 'checkpointer': export needs torchtune.training.FullModelHFCheckpointer")
                prepare_for_save(hf)
                # torchtune's own lines name a temporary folder and suggest "further training": not
                # true of this export, whose one line cli prints
                tt_log = logging.getLogger("torchtune.utils._logging")
                level = tt_log.level
                tt_log.setLevel(logging.WARNING)
                try:
                    hf.save_checkpoint({"model": {k: v.detach() for k, v in model.state_dict().items()}}, epoch=0)
                finally:
                    tt_log.setLevel(level)
                for item in final_dir(tmp, 0).iterdir():
                    shutil.move(str(item), staging / item.name)
        else:
            shutil.copytree(checkpoint, staging, dirs_exist_ok=True, ignore=shutil.ignore_patterns(MARKER))
        write_serving_files(staging, trained.tokenizer_file, trained.tokenizer, trained.system_prompt,
                            trained.max_seq_len, trained.vocab_size)
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

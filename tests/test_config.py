"""The typed config layer: every key has one home (a dataclass field with its default, check and
doc); unknown keys, hints, type and range errors and the values the recipe reads come from it."""

from dataclasses import fields

import pytest
from omegaconf import OmegaConf
from recipe_utils import REPO, load_config

from gdt_tune.training.config import COMPONENTS, SECTIONS, known_keys, parse


def test_every_field_has_a_doc_and_a_check():
    for section in SECTIONS:
        assert section.__doc__
        for f in fields(section):
            assert len(f.metadata["doc"]) > 10 and callable(f.metadata["ok"]) and f.metadata["expected"], f.name


def test_keys_are_unique_across_sections_and_components():
    names = [f.name for s in SECTIONS for f in fields(s)] + list(COMPONENTS)
    assert len(names) == len(set(names))


def test_typed_values_and_defaults_from_the_tiny_config():
    rc = parse(load_config("batch_size=3", "keep_last_n_checkpoints=5", "shuffle=false"), cuda_available=False)
    assert (rc.training.batch_size, rc.training.device, rc.training.dtype) == (3, "cpu", "fp32")
    assert (rc.checkpoints.keep_last_n_checkpoints, rc.data.shuffle) == (5, False)
    # keys absent from the YAML take the dataclass defaults
    cfg = load_config()
    for key in ("clip_grad_norm", "float8", "custom_sharded_layers"):
        cfg.pop(key, None)
    rc = parse(cfg, cuda_available=False)
    assert (rc.training.clip_grad_norm, rc.training.float8, rc.training.custom_sharded_layers) == (None, False, None)
    assert rc.training.fsdp_reshard_after_forward is True and rc.validation.batch_size_val == 4  # set in the YAML (its own section, the same key)


@pytest.mark.parametrize("override, message", [
    ("lerning_rate=1", "config key 'lerning_rate' is not known to this recipe; remove it"),
    ("log_every_n_step=5", "config key 'log_every_n_step' is not known to this recipe; did you mean 'log_every_n_steps'?"),
    ("bach_size_val=2", "config key 'bach_size_val' is not known to this recipe; did you mean 'batch_size_val'?"),
    ("num_workers=-1", "config key 'num_workers': got -1; expected an integer >= 0"),
    ("seed=-3", "config key 'seed': got -3; expected an integer >= 0 or null"),
    ("max_steps_per_epoch=0", "config key 'max_steps_per_epoch': got 0; expected an integer >= 1 or null"),
    ("shuffle=sometimes", "config key 'shuffle': got 'sometimes'; expected true or false"),
    ("custom_sharded_layers=output", "config key 'custom_sharded_layers': got 'output'; expected a list"),
    ("output_dir=''", "config key 'output_dir': got ''; expected a folder path"),
    ("batch_size=null", "config key 'batch_size' is missing"),
])
def test_errors_name_the_key_and_what_is_expected(override, message):
    with pytest.raises(ValueError) as e:
        parse(load_config(override), cuda_available=False)
    assert str(e.value).startswith(message), str(e.value)


def test_known_keys_cover_the_shipped_configs():
    for name in ("tiny_gdt_cpu.yaml", "llama3_1_8b_gdt_full.yaml", "llama3_1_8b_gdt_packed.yaml"):
        assert set(OmegaConf.load(REPO / "configs" / name)) <= set(known_keys())
    full, packed = (parse(OmegaConf.load(REPO / "configs" / f"llama3_1_8b_gdt_{n}.yaml"), cuda_available=True).data
                    for n in ("full", "packed"))
    assert (full.packing, full.balanced_steps) == (False, True) and (packed.packing, packed.balanced_steps) == (True, False)

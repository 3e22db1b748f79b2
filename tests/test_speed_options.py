"""Speed options that a CPU can check: MFU formula and GPU peak lookup, activation-checkpointing
modes (which layers, same gradients, fewer saved activations), float8 conversion and refusal, and
their config checks."""

import pytest
import torch
from omegaconf import OmegaConf
from recipe_utils import REPO, logged, train_in_process
from torchtune.models.llama3 import llama3

from gdt_tune.cli.demo_assets import TINY_MODEL
from gdt_tune.training.activation_checkpointing import apply_activation_checkpointing, layers_to_checkpoint
from gdt_tune.training.config import parse
from gdt_tune.training.float8 import convert_to_float8, float8_problem
from gdt_tune.training.mfu import decoder_flops_per_token, flops_per_token, mfu, peak_tflops


@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.5), ("NVIDIA H100 NVL", 835.5),
    ("NVIDIA H200", 989.4), ("NVIDIA GH200 480GB", 989.4), ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA L40S", 362.05), ("NVIDIA L40", 181.05), ("NVIDIA L4", 121.0), ("NVIDIA A10G", 70.0),
    ("NVIDIA B200", 2250.0), ("Some Future GPU", None)])
def test_peak_lookup_by_device_name(name, tflops):
    assert peak_tflops(name) == tflops


def test_flops_formula_is_palm_appendix_b():
    # Llama 3.1 8B: 8,030M parameters, 525M of them the input embedding, 32 layers, d=4096
    with torch.device("meta"):
        model = llama3(vocab_size=128_256, num_layers=32, num_heads=32, num_kv_heads=8, embed_dim=4096,
                       max_seq_len=8192, intermediate_dim=14336)
    n = sum(p.numel() for p in model.parameters()) - 128_256 * 4096
    assert decoder_flops_per_token(model)(8192) == 6 * n + 12 * 32 * 4096 * 8192 == flops_per_token(n, 32, 4096, 8192)
    # the measured row: 7,985 tokens/s/GPU on an H100 is 46.8% MFU
    assert mfu(7985, flops_per_token(n, 32, 4096, 8192), 989.4) == pytest.approx(0.468, abs=0.001)


def _tiny():
    torch.manual_seed(0)
    return llama3(**{**TINY_MODEL, "num_layers": 4})


@pytest.mark.parametrize("mode, option, expected", [
    ("full", None, [0, 1, 2, 3]), ("selective", 1, [0, 1, 2, 3]), ("selective", 2, [1, 3]),
    ("selective", 3, [2]), ("selective", "op", [0, 1, 2, 3])])
def test_which_layers_are_checkpointed(mode, option, expected):
    assert layers_to_checkpoint(4, mode, option) == expected
    model = _tiny()
    assert apply_activation_checkpointing(model, mode, option) == expected
    wrapped = [i for i, layer in enumerate(model.layers) if type(layer).__name__ == "CheckpointWrapper"]
    assert wrapped == expected
    assert set(model.state_dict()) == set(_tiny().state_dict())  # checkpoint keys unchanged


def _backward_ops_and_grads(model, tokens):
    """aten ops run during backward (recomputation included), and the gradients."""
    from torch.utils._python_dispatch import TorchDispatchMode

    counts = {}

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            counts[func.overloadpacket.__name__] = counts.get(func.overloadpacket.__name__, 0) + 1
            return func(*args, **(kwargs or {}))

    loss = model(tokens).float().logsumexp(-1).mean()
    with Count():
        loss.backward()
    grads = {n.replace("._checkpoint_wrapped_module", ""): p.grad.clone() for n, p in model.named_parameters()}
    return counts, grads


def test_checkpointing_modes_keep_gradients_and_recompute_what_they_say():
    """Every mode gives the gradients of no checkpointing. In backward, op-level selective
    recomputes the cheap ops but no matmul (it kept them); every 2nd layer recomputes half the
    layers' matmuls; full recomputes them all."""
    tokens = torch.randint(0, 1000, (2, 64))
    results = {}
    for name, mode, option in [("none", None, None), ("op", "selective", "op"), ("every2", "selective", 2),
                               ("full", "full", None)]:
        model = _tiny()
        if mode:
            apply_activation_checkpointing(model, mode, option)
        results[name] = _backward_ops_and_grads(model, tokens)
    base_ops, base_grads = results["none"]
    for name, (_, grads) in results.items():
        for key, grad in base_grads.items():
            torch.testing.assert_close(grads[key], grad, rtol=1e-5, atol=1e-6, msg=f"{name}: {key}")
    mm = {name: ops.get("mm", 0) for name, (ops, _) in results.items()}
    layer_mms = (mm["full"] - mm["none"]) / 4  # a layer's forward matmuls, recomputed by full
    assert layer_mms >= 6
    assert mm["op"] == mm["none"]
    assert mm["every2"] == mm["none"] + 2 * layer_mms
    assert results["op"][0]["silu"] == 4 and "silu" not in base_ops  # cheap ops are recomputed


def test_float8_converts_layer_linears_but_not_the_head():
    with torch.device("meta"):
        model = llama3(**TINY_MODEL)
    names = convert_to_float8(model)
    assert len(names) == 7 * TINY_MODEL["num_layers"]
    assert type(model.layers[0].mlp.w1).__name__ == "Float8Linear"
    assert type(model.output).__name__ == "Linear"


def test_float8_refused_without_a_capable_gpu():
    assert "not device cpu" in float8_problem(torch.device("cpu"))


def _cfg(**overrides):
    cfg = OmegaConf.load(REPO / "configs" / "tiny_gdt_cpu.yaml")
    return OmegaConf.merge(cfg, OmegaConf.from_dotlist([f"{k}={v}" for k, v in overrides.items()]))


@pytest.mark.parametrize("overrides, message", [
    (dict(ac_mode="selective", ac_option=2), "config key 'ac_mode' is set but enable_activation_checkpointing is false"),
    (dict(enable_activation_checkpointing=True, ac_mode="some"), "config key 'ac_mode': got 'some'"),
    (dict(enable_activation_checkpointing=True, ac_mode="selective"), "config key 'ac_option': got None"),
    (dict(enable_activation_checkpointing=True, ac_mode="selective", ac_option=0), "config key 'ac_option': got 0"),
    (dict(enable_activation_checkpointing=True, ac_mode="selective", ac_option="ops"), "config key 'ac_option': got 'ops'"),
    (dict(enable_activation_checkpointing=True, ac_mode="full", ac_option=2), "needs ac_mode=selective"),
    (dict(float8="maybe"), "config key 'float8': got 'maybe'"),
    (dict(mfu_peak_tflops=-1), "config key 'mfu_peak_tflops': got -1"),
])
def test_config_checks_of_speed_options(overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        parse(_cfg(**overrides), cuda_available=False)


@pytest.mark.parametrize("overrides", [dict(enable_activation_checkpointing=True),
                                       dict(enable_activation_checkpointing=True, ac_mode="selective", ac_option="op"),
                                       dict(enable_activation_checkpointing=True, ac_mode="selective", ac_option=2),
                                       dict(mfu_peak_tflops=989.4)])
def test_config_checks_accept_speed_options(overrides):
    parse(_cfg(**overrides), cuda_available=False)


def test_recipe_logs_mfu_and_first_step_and_trains_with_op_level_checkpointing(demo_dir, tmp_path):
    """With a peak set, MFU is logged on any device from the shared formula, and the first step's
    time once; op-level selective checkpointing trains to the same losses as none. (float8 on CPU
    is refused in the bad-input corpus.) One rank, in process."""
    common = ("max_steps_per_epoch=3", "dataset_val=null", "run_val_every_n_steps=null", "save_every_n_steps=null")
    train_in_process(demo_dir, tmp_path / "plain", *common, "mfu_peak_tflops=0.001")
    train_in_process(demo_dir, tmp_path / "op", *common, "enable_activation_checkpointing=true", "ac_mode=selective",
                     "ac_option=op")
    plain, op = logged(tmp_path / "plain"), logged(tmp_path / "op")
    assert sorted(plain) == [1, 2, 3] and all(op[s] == pytest.approx(plain[s], rel=1e-5) for s in plain)
    tps, mfus = logged(tmp_path / "plain", "tokens_per_second_per_device"), logged(tmp_path / "plain", "mfu")
    assert sorted(mfus) == [1, 2, 3]
    with torch.device("meta"):
        per_token = decoder_flops_per_token(llama3(**TINY_MODEL))
    for step, value in mfus.items():  # FLOPs per token implied by the logged MFU: 6N + 12 L d T, 0 < T <= 2048
        implied = value * 0.001e12 / tps[step]
        assert per_token(0) < implied <= per_token(2048) * 1.0001
    assert list(logged(tmp_path / "plain", "first_step_seconds")) == [1]

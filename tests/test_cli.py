"""`gdt-tune train` builds a torchrun command from any folder; bad arguments give one line."""

import sys

import pytest

from gdt_tune.cli import CONFIGS, RECIPE_MODULE, main, train_command


def test_train_command_single_node_and_multi_node(tmp_path):
    cmd = train_command(["--nproc_per_node", "8", "--config", "llama3_1_8b_gdt_full", "output_dir=/runs/x"])
    assert cmd == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "8", "-m",
                   RECIPE_MODULE, "--config", str(CONFIGS / "llama3_1_8b_gdt_full.yaml"), "output_dir=/runs/x"]
    own = tmp_path / "mine.yaml"
    own.write_text("x: 1\n")
    multi = train_command(["--nnodes", "2", "--nproc_per_node", "8", "--rdzv_backend", "c10d", "--rdzv_endpoint",
                           "head:29500", "--config", str(own)])
    assert "--standalone" not in multi and multi[-2:] == ["--config", str(own)]


@pytest.mark.parametrize("args, message", [
    (["--nproc_per_node", "2"], "train needs --config NAME|FILE (shipped: llama3_1_8b_gdt_full, tiny_gdt_cpu)"),
    (["--config", "llama3_8b"], "--config llama3_8b: no such file and no shipped config of that name"),
    (["--config", "tiny_gdt_cpu", "--nproc_per_node", "2"], "'--nproc_per_node' after --config is not a key=value"),
])
def test_train_refuses_bad_arguments(args, message, capsys):
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1

"""Helpers to launch the recipe through `tune run` in tests and read what it wrote."""

import os
import re
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
RECIPE = "gdt_tune/recipes/full_finetune_fsdp_ckpt.py"
TINY = str(REPO / "configs" / "tiny_gdt_cpu.yaml")
TUNE = str(Path(sys.executable).with_name("tune"))


def launch_cmd(demo_dir, output_dir, *overrides, nproc=2):
    """What ``gdt-tune train --nproc_per_node N --config TINY ...`` runs: torchrun with the recipe
    module (``tune run`` itself imports torchtune, 2.5 s a launch; a few tests use it)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            "-m", "gdt_tune.recipes.full_finetune_fsdp_ckpt", "--config", TINY,
            f"demo_dir={demo_dir}", f"output_dir={output_dir}", *overrides]


def run_recipe(demo_dir, output_dir, *overrides, nproc=2, check=True, timeout=300):
    env = dict(os.environ, TIKTOKEN_CACHE_DIR="")
    proc = subprocess.run(launch_cmd(demo_dir, output_dir, *overrides, nproc=nproc), cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"recipe failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def logged(output_dir, name="loss") -> dict[int, float]:
    """{step: value} of one metric from the DiskLogger files under output_dir/logs."""
    out = {}
    for path in sorted(Path(output_dir, "logs").glob("*.txt")):
        for line in path.read_text().splitlines():
            m = re.match(r"Step (\d+) \| (.*)", line)
            if m:
                for item in m.group(2).split():
                    key, _, value = item.partition(":")
                    if key == name:
                        out[int(m.group(1))] = float(value)
    return out


def final_weights(output_dir, epoch):
    files = sorted(Path(output_dir, f"epoch_{epoch}").glob("*.safetensors"))
    assert files, f"no final checkpoint in {output_dir}/epoch_{epoch}"
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def load_config(*overrides, config=TINY):
    """The DictConfig that ``tune run RECIPE --config CONFIG overrides...`` gives the recipe: what
    torchtune's public ``config.parse`` decorator hands a recipe's main for that command line."""
    from torchtune.config import parse

    parsed = []
    argv, sys.argv = sys.argv, ["recipe", "--config", str(config), *overrides]
    try:
        parse(parsed.append)()
    except SystemExit:  # the decorator exits with what the recipe's main returned
        pass
    finally:
        sys.argv = argv
    return parsed[0]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_in_process(cfg, train=False):
    """Run the recipe's ``setup()`` (and ``train()``) in this process as a world of one (gloo);
    returns the recipe, already cleaned up. Its errors propagate, as in ``recipe_main``."""
    import torch
    import torch.distributed as dist

    from gdt_tune.recipes.full_finetune_fsdp_ckpt import FullFinetuneRecipe

    saved, threads = dict(os.environ), torch.get_num_threads()
    os.environ["MASTER_PORT"] = str(_free_port())
    os.environ["LOCAL_WORLD_SIZE"] = str(os.cpu_count() or 1)  # >= available_cpus(): one CPU thread
    recipe = None
    try:
        recipe = FullFinetuneRecipe(cfg)
        recipe.setup()
        if train and not recipe.already_trained:
            recipe.train()
        return recipe
    finally:
        if recipe is not None and dist.is_initialized():
            recipe.cleanup()
        if dist.is_initialized():  # the constructor failed after starting the group
            dist.destroy_process_group()
        os.environ.clear()
        os.environ.update(saved)
        torch.set_num_threads(threads)


def train_in_process(demo_dir, output_dir, *overrides):
    """The tiny config trained in this process as a world of one (what ``run_recipe(..., nproc=1)``
    does, without starting torchrun and a rank); returns the recipe."""
    return setup_in_process(load_config(f"demo_dir={demo_dir}", f"output_dir={output_dir}", *overrides), train=True)


def load_trained(checkpoint, cfg, device, dtype):
    """(model, tokenizer, system prompt) of a trained folder, as the tools open it."""
    from gdt_tune.trained.model import open_trained

    trained = open_trained(checkpoint, cfg)
    return trained.load(device, dtype), trained.tokenizer, trained.system_prompt

"""torchtune's stock ``full_finetune_distributed`` recipe with the smallest CPU workarounds, for
the benchmarks only (the stock recipe crashes on CPU: CUDA memory stats,
``torch.cpu.empty_cache`` and ``torch.cpu.reset_peak_memory_stats``). Launch like any recipe, from the repository root::

    tune run --nproc_per_node 2 bench/stock_full_finetune_cpu.py --config CONFIG key=value ...
"""

import runpy
from pathlib import Path

import torch
import torchtune
from torchtune import training

if not torch.cuda.is_available():
    for name in ("empty_cache", "reset_peak_memory_stats"):
        if not hasattr(torch.cpu, name):
            setattr(torch.cpu, name, lambda *args, **kwargs: None)
    training.get_memory_stats = lambda device, reset_stats=True: {
        "peak_memory_active": 0.0, "peak_memory_alloc": 0.0, "peak_memory_reserved": 0.0}
    training.log_memory_stats = lambda *args, **kwargs: None

# torchtune installs its recipes beside the package; they are run as files, not imported.
STOCK_RECIPE = Path(torchtune.__file__).resolve().parents[1] / "recipes" / "full_finetune_distributed.py"

if __name__ == "__main__":
    runpy.run_path(str(STOCK_RECIPE), run_name="__main__")

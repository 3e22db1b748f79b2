"""The tools that read a run or a dataset: `gdt-tune evaluate` (clinical-task metrics of a checkpoint), `data-report`, `plot-run`, and their plots."""

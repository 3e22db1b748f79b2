"""Evaluation tools: clinical-task metrics of a checkpoint, plots, run reports."""

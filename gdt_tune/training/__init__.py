"""Training parts of the recipe: typed config, checkpoints, sampling, resume contract, speed options."""

"""Training: one loop for every objective, its optimizers, checkpoints and losses."""

"""Training: the DeepSpeed engine, the loop, checkpoints, metrics and the Ray Train wiring."""

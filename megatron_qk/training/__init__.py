"""Training: distributed setup, data, the loop, checkpoints, logging sinks."""

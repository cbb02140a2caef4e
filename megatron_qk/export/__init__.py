"""Export trained checkpoints to transformers and stock Megatron-Core formats."""

"""megatron_qk.training."""

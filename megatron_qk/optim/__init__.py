"""megatron_qk.optim."""

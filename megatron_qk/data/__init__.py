"""megatron_qk.data."""

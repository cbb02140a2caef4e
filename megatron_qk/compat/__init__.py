"""megatron_qk.compat."""

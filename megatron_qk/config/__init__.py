"""megatron_qk.config."""

"""megatron_qk.models."""

"""megatron_qk.analysis."""

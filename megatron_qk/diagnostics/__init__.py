"""megatron_qk.diagnostics."""

"""Stock Megatron-Core checkpoint export (fused ``linear_qkv``)."""

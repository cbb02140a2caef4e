"""GPT models from Megatron-Core layer specs: FFN/norm/bias variants and split Q/K/V."""

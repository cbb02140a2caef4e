"""Mechanism diagnostics: post-RoPE Q/K capture, attention probes, recorders."""

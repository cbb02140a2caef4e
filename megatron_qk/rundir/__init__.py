"""Torch-free run-directory helpers (config fingerprints, run state) for tools and launchers."""

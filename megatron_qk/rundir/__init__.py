"""Torch-free run-directory helpers: identity, lock, moving an old run aside, config hashes."""

"""Torch-free run-directory helpers: identity, the training lock, moving an old run aside."""

"""Torch-free run-directory helpers: the life-of-training lock and moving an old run aside."""

"""Torch-free run-directory helpers: file layout, atomic writes, the RunLog reader, the lock,
moving an old run aside, config hashes, and the parent-death signal of helper processes (stdlib
only)."""

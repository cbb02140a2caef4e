"""Torch-free run-directory helpers: file layout, atomic writes, the RunLog reader, the lock,
moving an old run aside and config hashes (stdlib only)."""

"""Run-directory helpers that need no torch (identity, layout, files)."""

"""Shared helpers: errors, the patch grid, checkpoints, metrics, run folders, signals."""

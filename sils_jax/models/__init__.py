"""Flax modules: architecture only (no losses, no data, no training)."""

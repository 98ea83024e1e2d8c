"""Data: renderers and input pipelines (numpy only; no models, no training)."""

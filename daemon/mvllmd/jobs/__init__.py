"""Rollout jobs: many prompts x N samples, parquet in, parquet out, across every READY server."""

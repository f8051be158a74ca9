"""Benchmarks that run the project's own train function on a GPU machine (no Ray there)."""

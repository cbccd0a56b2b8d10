"""Benchmarks of procflow against a thin raw-SDK baseline on the same Temporal server."""

"""Workflow code: deterministic, no I/O. One module per process plus shared building blocks."""

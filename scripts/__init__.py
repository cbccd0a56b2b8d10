"""Operational entry points: migrate, seed, mail sink (`python -m scripts.<name>`)."""

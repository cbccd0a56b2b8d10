"""HTTP API of procflow: starts, signals, updates and queries workflows; reads projections."""

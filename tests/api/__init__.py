"""API tests: httpx against the app, the real workflows and the local Temporal dev server."""

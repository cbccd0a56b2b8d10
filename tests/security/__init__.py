"""Security tests: fuzzing the API, the authorization matrix, limits, ownership."""

"""Settings, the Temporal client factory and the database schema. Imports nothing of ours."""

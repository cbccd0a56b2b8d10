"""Fixtures for the database suite: every test runs on SQLite and on PostgreSQL."""

from __future__ import annotations

import pytest


@pytest.fixture
def db_url(any_db_url: str) -> str:
    """A fresh migrated database, SQLite and PostgreSQL in turn."""
    return any_db_url

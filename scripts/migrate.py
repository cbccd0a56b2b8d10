"""Bring the database schema to the newest Alembic revision: `python -m scripts.migrate`."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy.engine import make_url

from core.settings import get_settings

ROOT = Path(__file__).resolve().parent.parent


def alembic_config(url: str, *, configure_logger: bool = False) -> Config:
    """An Alembic Config for this project with sqlalchemy.url set programmatically."""
    cfg = Config(str(ROOT / "alembic.ini"))
    cfg.set_main_option("script_location", str(ROOT / "migrations"))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    cfg.attributes["configure_logger"] = configure_logger
    return cfg


def ensure_sqlite_dir(url: str) -> None:
    """Create the directory of a file-based SQLite database."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)


def upgrade(url: str, *, configure_logger: bool = False) -> None:
    """Run `alembic upgrade head` against url. Call from sync code (env.py uses asyncio.run)."""
    ensure_sqlite_dir(url)
    command.upgrade(alembic_config(url, configure_logger=configure_logger), "head")


def main() -> int:
    url = get_settings().database_url
    upgrade(url, configure_logger=True)
    logging.getLogger("alembic").info("database at %s is up to date", make_url(url))
    return 0


if __name__ == "__main__":
    sys.exit(main())

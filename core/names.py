"""The shapes of names that published documents (blueprints) and the activities they call share:
a snake_case name (stages, steps, fields, templates) and a kebab-case role name."""

from __future__ import annotations

NAME_PATTERN = r"[a-z][a-z0-9_]{0,62}"
ROLE_PATTERN = r"[a-z][a-z0-9]*(?:-[a-z0-9]+)*"
MAX_NAME = 63
MAX_TEXT = 4000

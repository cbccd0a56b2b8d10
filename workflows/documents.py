"""Validation errors of published documents (policies, calendars, blueprints): each at the path
of the value it is about, with the message as written, so that the API's 422 names the field."""

from __future__ import annotations

from pydantic import ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError

Loc = tuple[str | int, ...]


def document_error(loc: Loc, kind: str, message: str, value: object) -> InitErrorDetails:
    """One error at loc, relative to the value being validated."""
    # no context: the message is used as it is (a role or tier name may contain braces)
    return InitErrorDetails(type=PydanticCustomError(kind, message), loc=loc, input=value)


def document_refusal(title: str, errors: list[InitErrorDetails]) -> ValidationError:
    """Errors at locations relative to the value being validated (pydantic prefixes the rest)."""
    return ValidationError.from_exception_data(title, errors)


def show_value(value: object) -> str:
    """A value as an error message quotes it: its repr, cut at 60 characters."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."

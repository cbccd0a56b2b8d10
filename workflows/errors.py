"""Error types (`ApplicationError.type`) that the kernel, its blocks and the processes raise,
and that the API maps to HTTP status codes: one place, for every process type."""

from __future__ import annotations

from temporalio.exceptions import ApplicationError

TASK_NOT_FOUND = "TaskNotFound"  # 404
TASK_CLOSED = "TaskClosed"  # 409
NOT_PERMITTED = "NotPermitted"  # 403
FOUR_EYES = "FourEyesViolation"  # 403
INVALID_DECISION = "InvalidDecision"  # 422
CONFLICT = "Conflict"  # 409
NOT_CANCELLABLE = "NotCancellable"  # 409
# an external event reported again as it was: nothing to do (the API answers 202)
DUPLICATE_EVENT = "DuplicateEvent"


def refuse(type_: str, message: str) -> ApplicationError:
    """A business refusal: validators raise it (nothing enters history), handlers too."""
    return ApplicationError(message, type=type_, non_retryable=True)

"""The one place that maps exceptions to HTTP responses.

Error bodies are {"detail": "..."}; 422s keep FastAPI's list format with `loc` naming the field.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from fastapi import FastAPI, HTTPException, Request, status
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from sqlalchemy.exc import InterfaceError, OperationalError
from temporalio.client import (
    RPCError,
    RPCTimeoutOrCancelledError,
    WorkflowQueryFailedError,
    WorkflowQueryRejectedError,
    WorkflowUpdateFailedError,
    WorkflowUpdateRPCTimeoutOrCancelledError,
)
from temporalio.exceptions import ApplicationError, FailureError
from temporalio.service import RPCStatusCode

from api.limits import TemporalBusy
from api.schemas import ErrorOut
from workflows.errors import (
    CONFLICT,
    FOUR_EYES,
    INVALID_DECISION,
    NOT_CANCELLABLE,
    NOT_PERMITTED,
    TASK_CLOSED,
    TASK_NOT_FOUND,
)

log = logging.getLogger("procflow.api")

RETRY_AFTER_S = "5"
PROCESS_ENDED = "the process has already ended"
# answers that stand for a backend's message (logged, never echoed: it may name tables, SQL,
# hosts or internals)
PROCESS_REFUSED = "the process could not carry out the request"
STATE_CONFLICT = "conflicts with the current state of the process"
QUERY_FAILED = "the process could not report its status"

# ApplicationError.type raised by workflow validators/handlers -> HTTP status
APPLICATION_ERROR_STATUS: dict[str, int] = {
    TASK_NOT_FOUND: status.HTTP_404_NOT_FOUND,
    TASK_CLOSED: status.HTTP_409_CONFLICT,
    CONFLICT: status.HTTP_409_CONFLICT,
    NOT_CANCELLABLE: status.HTTP_409_CONFLICT,
    NOT_PERMITTED: status.HTTP_403_FORBIDDEN,
    FOUR_EYES: status.HTTP_403_FORBIDDEN,
    INVALID_DECISION: status.HTTP_422_UNPROCESSABLE_CONTENT,
}

_DESCRIPTIONS = {
    400: "The request body could not be parsed (not UTF-8, JSON or form data)",
    401: "Missing, invalid or expired bearer token",
    403: "The caller lacks a role or may not act on this item",
    404: "No such item",
    409: "Conflicts with the current state of the process",
    413: "The request body is larger than the limit (PROCFLOW_API_MAX_BODY_BYTES)",
    422: "The request or decision is invalid; `loc` names the field",
    429: "Too many requests from this user (or sign-ins from this address); see Retry-After",
    503: "Temporal or the database is unreachable or busy; retry after Retry-After seconds",
}

RETRY_AFTER_HEADER = {
    "Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}
}


def responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI documentation of the error responses of an endpoint."""
    out: dict[int | str, dict[str, Any]] = {}
    for code in codes:
        entry: dict[str, Any] = {"description": _DESCRIPTIONS[code]}
        if code != 422:
            entry["model"] = ErrorOut
        if code in (429, 503):
            entry["headers"] = RETRY_AFTER_HEADER
        out[code] = entry
    return out


class TemporalUnavailable(Exception):
    """No connection to Temporal could be made (the app keeps trying on later requests)."""


def unauthorized(detail: str) -> HTTPException:
    return HTTPException(
        status.HTTP_401_UNAUTHORIZED, detail, headers={"WWW-Authenticate": "Bearer"}
    )


def field_error(field: str, msg: str, type_: str = "value_error") -> HTTPException:
    """A 422 in FastAPI's list format for one body field."""
    return HTTPException(
        status.HTTP_422_UNPROCESSABLE_CONTENT,
        [{"type": type_, "loc": ["body", *field.split(".")], "msg": msg}],
    )


def param_error(where: str, name: str, msg: str, type_: str = "value_error") -> HTTPException:
    """A 422 in FastAPI's list format for one query or path parameter (where: "query")."""
    return HTTPException(
        status.HTTP_422_UNPROCESSABLE_CONTENT, [{"type": type_, "loc": [where, name], "msg": msg}]
    )


def body_errors(err: ValidationError) -> HTTPException:
    """A 422 in FastAPI's list format for a body model validated in a handler (loc from "body";
    the input is not echoed)."""
    return HTTPException(
        status.HTTP_422_UNPROCESSABLE_CONTENT,
        [
            {"type": e["type"], "loc": ["body", *e["loc"]], "msg": e["msg"]}
            for e in err.errors(include_url=False)
        ],
    )


def _unavailable(detail: str) -> JSONResponse:
    return JSONResponse(
        {"detail": detail},
        status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
        headers={"Retry-After": RETRY_AFTER_S},
    )


# Temporal's NOT_FOUND messages for an update or signal that reached an instance as it closed:
# sent to a closed execution, or admitted while the task that completes it was running.
_ENDED_MESSAGES = ("already completed", "aborted by closing workflow")


def is_process_ended(err: BaseException) -> bool:
    """Temporal's answer to an update or signal sent to a closed (or closing) execution."""
    return (
        isinstance(err, RPCError)
        and err.status == RPCStatusCode.NOT_FOUND
        and any(m in err.message.lower() for m in _ENDED_MESSAGES)
    )


def is_not_found(err: BaseException) -> bool:
    return (
        isinstance(err, RPCError)
        and err.status == RPCStatusCode.NOT_FOUND
        and not is_process_ended(err)
    )


@contextmanager
def not_found_as(detail: str) -> Iterator[None]:
    """Turn Temporal's NOT_FOUND for an unknown workflow id into a 404 with detail."""
    try:
        yield
    except RPCError as err:
        if is_not_found(err):
            raise HTTPException(status.HTTP_404_NOT_FOUND, detail) from err
        raise


_FIELD_PREFIX = re.compile(r"^([A-Za-z_][A-Za-z0-9_.]*): (.+)$", re.S)


def _application_error(err: ApplicationError) -> JSONResponse:
    code = APPLICATION_ERROR_STATUS.get(err.type or "", status.HTTP_409_CONFLICT)
    if not err.non_retryable and err.type not in APPLICATION_ERROR_STATUS:
        # not a business refusal but an exception the SDK wrapped (its text is internal)
        log.error("unexpected process error %s: %s", err.type, err.message)
        return JSONResponse({"detail": PROCESS_REFUSED}, status_code=code)
    if code == status.HTTP_422_UNPROCESSABLE_CONTENT:
        m = _FIELD_PREFIX.match(err.message)
        loc = ["body", *m.group(1).split(".")] if m else ["body"]
        msg = m.group(2) if m else err.message
        return JSONResponse(
            {"detail": [{"type": err.type, "loc": loc, "msg": msg}]}, status_code=code
        )
    return JSONResponse({"detail": err.message}, status_code=code)


def _root_cause(err: BaseException) -> BaseException:
    cause = err.cause if isinstance(err, WorkflowUpdateFailedError) else err
    while isinstance(cause, FailureError) and not isinstance(cause, ApplicationError):
        if cause.cause is None:
            break
        cause = cause.cause
    return cause


def application_error_of(err: BaseException) -> ApplicationError | None:
    """The business error a workflow validator or handler refused with, if any."""
    cause = _root_cause(err)
    return cause if isinstance(cause, ApplicationError) else None


def _failure(err: BaseException) -> JSONResponse:
    cause = _root_cause(err)
    if isinstance(cause, ApplicationError):
        return _application_error(cause)
    log.error("process failure %s: %s", type(cause).__name__, cause)
    return JSONResponse({"detail": PROCESS_REFUSED}, status_code=status.HTTP_409_CONFLICT)


def _rpc_error(err: RPCError) -> JSONResponse:
    if is_process_ended(err):
        return JSONResponse({"detail": PROCESS_ENDED}, status_code=status.HTTP_409_CONFLICT)
    if err.status == RPCStatusCode.NOT_FOUND:
        return JSONResponse(
            {"detail": "process instance not found"}, status_code=status.HTTP_404_NOT_FOUND
        )
    if err.status in (
        RPCStatusCode.UNAVAILABLE,
        RPCStatusCode.DEADLINE_EXCEEDED,
        RPCStatusCode.RESOURCE_EXHAUSTED,
        RPCStatusCode.CANCELLED,
    ):
        log.warning("Temporal did not answer (%s): %s", err.status, err.message)
        return _unavailable("Temporal did not answer")
    if err.status in (RPCStatusCode.ALREADY_EXISTS, RPCStatusCode.FAILED_PRECONDITION):
        log.info("Temporal refused (%s): %s", err.status, err.message)
        return JSONResponse({"detail": STATE_CONFLICT}, status_code=status.HTTP_409_CONFLICT)
    log.error("unexpected Temporal error %s: %s", err.status, err.message)
    return JSONResponse(
        {"detail": "unexpected answer from Temporal"}, status_code=status.HTTP_502_BAD_GATEWAY
    )


def install(app: FastAPI) -> None:
    """Register the exception handlers on app."""

    @app.exception_handler(WorkflowUpdateFailedError)
    async def _update_failed(_: Request, err: WorkflowUpdateFailedError) -> JSONResponse:
        return _failure(err)

    @app.exception_handler(ApplicationError)
    async def _app_error(_: Request, err: ApplicationError) -> JSONResponse:
        return _application_error(err)

    @app.exception_handler(WorkflowQueryFailedError)
    async def _query_failed(_: Request, err: WorkflowQueryFailedError) -> JSONResponse:
        log.error("status query failed: %s", err.message)
        return JSONResponse({"detail": QUERY_FAILED}, status_code=status.HTTP_409_CONFLICT)

    @app.exception_handler(WorkflowQueryRejectedError)
    async def _query_rejected(_: Request, err: WorkflowQueryRejectedError) -> JSONResponse:
        return JSONResponse({"detail": PROCESS_ENDED}, status_code=status.HTTP_409_CONFLICT)

    @app.exception_handler(RPCError)
    async def _rpc(_: Request, err: RPCError) -> JSONResponse:
        return _rpc_error(err)

    @app.exception_handler(RPCTimeoutOrCancelledError)
    async def _rpc_timeout(_: Request, err: RPCTimeoutOrCancelledError) -> JSONResponse:
        return _unavailable("Temporal did not answer in time")

    @app.exception_handler(WorkflowUpdateRPCTimeoutOrCancelledError)
    async def _update_timeout(
        _: Request, err: WorkflowUpdateRPCTimeoutOrCancelledError
    ) -> JSONResponse:
        return _unavailable("the process did not answer in time (is a worker running?)")

    @app.exception_handler(TemporalUnavailable)
    async def _no_temporal(_: Request, err: TemporalUnavailable) -> JSONResponse:
        return _unavailable("Temporal is unreachable")

    @app.exception_handler(TemporalBusy)
    async def _busy(_: Request, err: TemporalBusy) -> JSONResponse:
        log.warning("Temporal slots exhausted: %s", err)
        return _unavailable(f"too many requests in flight to Temporal: {err}")

    @app.exception_handler(OperationalError)
    async def _db_down(_: Request, err: OperationalError) -> JSONResponse:
        log.warning("database error: %s", err)
        return _unavailable("the database is unavailable")

    @app.exception_handler(InterfaceError)
    async def _db_iface(_: Request, err: InterfaceError) -> JSONResponse:
        log.warning("database error: %s", err)
        return _unavailable("the database is unavailable")

    @app.exception_handler(ConnectionError)
    async def _conn(_: Request, err: ConnectionError) -> JSONResponse:
        log.warning("connection error: %s", err)
        return _unavailable("a backend is unreachable")

    @app.exception_handler(TimeoutError)
    async def _timeout(_: Request, err: TimeoutError) -> JSONResponse:
        return _unavailable("a backend did not answer in time")

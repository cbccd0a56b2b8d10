"""Logging for every procflow process: `configure(settings)` at start.

One handler on the root logger, writing to stderr: readable text lines (PROCFLOW_LOG_FORMAT=text,
the default) or one JSON object per line (json). Each line carries the context that exists
where it was written:

- in an API request: `request_id` and the acting `user` (api/logcontext.py opens the request's
  context, api/deps.py names the user once the token is verified);
- in an activity: `workflow_id`, `run_id`, `workflow_type`, `process_type`, `activity_type` and
  `task_queue`, read from `temporalio.activity.info()`;
- in workflow code, which logs through `workflow.logger` only (the SDK drops its lines during
  replay): the same fields, lifted from the `temporal_workflow` extra the SDK adds;
- `task_id` when the call passes `extra={"task_id": ...}`.

What a line must never carry (passwords, tokens, e-mail addresses) is the callers' to leave
out: tests/test_logs.py greps a run's logs for them.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol, TextIO

from temporalio import activity
from temporalio import workflow as temporal_workflow

# the context keys of a line, in the order they are written
CONTEXT_KEYS = (
    "request_id",
    "user",
    "workflow_id",
    "run_id",
    "workflow_type",
    "process_type",
    "activity_type",
    "task_queue",
    "task_id",
)
# uvicorn's loggers: their lines go through the same handler (the app writes its own access
# line, with the user and without the query string, so uvicorn's is left out)
_UVICORN_LOGGERS = ("uvicorn", "uvicorn.error")
_UVICORN_ACCESS = "uvicorn.access"
# libraries whose DEBUG lines carry query parameters (customer e-mail addresses, names): held
# at INFO even when PROCFLOW_LOG_LEVEL=DEBUG
_QUERY_LOGGERS = ("aiosqlite",)


class LogSettings(Protocol):
    @property
    def log_format(self) -> str: ...

    @property
    def log_level(self) -> str: ...


@dataclass
class RequestContext:
    """What an API request's lines carry; the user is filled in once the token is verified
    (a mutable holder: code that runs in a copy of the context still names the user)."""

    request_id: str
    user: str | None = None


_request: contextvars.ContextVar[RequestContext | None] = contextvars.ContextVar(
    "procflow_request", default=None
)


@contextmanager
def request_context(request_id: str) -> Iterator[RequestContext]:
    """The lines written inside carry request_id (and the user, once set_user names one)."""
    context = RequestContext(request_id)
    token = _request.set(context)
    try:
        yield context
    finally:
        _request.reset(token)


def set_user(username: str) -> None:
    """Name the acting user on the lines of the current request (nothing outside one)."""
    context = _request.get()
    if context is not None:
        context.user = username


# how a workflow type maps to its process type: given by whoever knows the processes (the worker
# and the API pass workflows.registry.process_type_of to `configure`; core imports none of ours)
_process_type_of: Callable[[str], str | None] | None = None


def process_type_of(workflow_type: str | None) -> str | None:
    """The process type that runs as this workflow type, when `configure` was told how."""
    if _process_type_of is None or not workflow_type:
        return None
    return _process_type_of(workflow_type)


def context_of(record: logging.LogRecord) -> dict[str, Any]:
    """The context keys of a record that have a value (read in the thread that logs it)."""
    fields: dict[str, Any] = {}
    request = _request.get()
    if request is not None:
        fields["request_id"] = request.request_id
        if request.user:
            fields["user"] = request.user
    in_workflow = getattr(record, "temporal_workflow", None)
    if isinstance(in_workflow, dict):
        for key in ("workflow_id", "run_id", "workflow_type", "task_queue"):
            if in_workflow.get(key):
                fields[key] = in_workflow[key]
    elif activity.in_activity():
        info = activity.info()
        fields.update(
            workflow_id=info.workflow_id,
            run_id=info.workflow_run_id,
            workflow_type=info.workflow_type,
            activity_type=info.activity_type,
            task_queue=info.task_queue,
        )
    process_type = process_type_of(fields.get("workflow_type"))
    if process_type:
        fields["process_type"] = process_type
    for key in CONTEXT_KEYS:  # extra={...} given by the call
        value = record.__dict__.get(key)
        if value is not None:
            fields[key] = value
    return {key: fields[key] for key in CONTEXT_KEYS if fields.get(key) is not None}


def _timestamp(record: logging.LogRecord) -> str:
    return datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")


def _exception_text(record: logging.LogRecord) -> str | None:
    if record.exc_info:
        return "".join(traceback.format_exception(*record.exc_info)).rstrip()
    if record.exc_text:
        return record.exc_text
    return None


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, the context keys, exc_info."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **context_of(record),
        }
        exception = _exception_text(record)
        if exception:
            line["exc_info"] = exception
        if record.stack_info:
            line["stack_info"] = record.stack_info
        return json.dumps(line, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """`<ts> <LEVEL> <logger>: <message> [key=value ...]`, then the traceback if any."""

    def format(self, record: logging.LogRecord) -> str:
        text = f"{_timestamp(record)} {record.levelname} {record.name}: {record.getMessage()}"
        context = context_of(record)
        if context:
            text += " [" + " ".join(f"{key}={value}" for key, value in context.items()) + "]"
        exception = _exception_text(record)
        if exception:
            text += "\n" + exception
        if record.stack_info:
            text += "\n" + record.stack_info
        return text


class _StderrHandler(logging.StreamHandler):
    """Writes to sys.stderr as it is when a line is written (tests swap it)."""

    def __init__(self) -> None:
        super().__init__()

    @property  # type: ignore[override]
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, _value: TextIO) -> None:
        pass


def formatter(log_format: str) -> logging.Formatter:
    return JsonFormatter() if log_format == "json" else TextFormatter()


def configure(
    settings: LogSettings, process_type_of: Callable[[str], str | None] | None = None
) -> logging.Handler:
    """Install procflow's handler on the root logger (replacing one installed before: calling
    it again changes the format and level, never adds a second handler); the handler.
    `process_type_of` names the process type of a workflow type on workflow lines."""
    global _process_type_of
    if process_type_of is not None:
        _process_type_of = process_type_of
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _StderrHandler)]:
        root.removeHandler(old)
    handler = _StderrHandler()
    handler.setFormatter(formatter(settings.log_format))
    root.addHandler(handler)
    root.setLevel(settings.log_level)
    # the context is a key of each line: not appended to the message as well
    temporal_workflow.logger.workflow_info_on_message = False
    activity.logger.activity_info_on_message = False
    for name in _UVICORN_LOGGERS:
        uvicorn_logger = logging.getLogger(name)
        uvicorn_logger.handlers.clear()
        uvicorn_logger.propagate = True
    logging.getLogger(_UVICORN_ACCESS).setLevel(logging.WARNING)
    for name in _QUERY_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO)
    return handler

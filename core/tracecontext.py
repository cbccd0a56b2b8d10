"""The trace a piece of work belongs to, carried across a queue (issue 14).

Work that is queued in the database and done later by a background loop (the outbox's mail)
would start a trace of its own. `carrier()` takes the current span's context as W3C
trace-context headers, to be stored with the queued row; `continued(name, carrier)` opens the
span of the later work as a child of it, so the mail a decision queued is in the decision's
trace. With tracing off (no TracerProvider set) there is no current span: `carrier()` is None
and `continued` makes a no-op span.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import opentelemetry.propagate
import opentelemetry.trace
from opentelemetry.trace import Span, SpanKind
from opentelemetry.util.types import AttributeValue

# W3C trace-context headers are short (traceparent 55 characters, tracestate at most 512)
MAX_CARRIER_CHARS = 1024


def carrier() -> dict[str, str] | None:
    """The current span's context as trace-context headers; None without a recording span."""
    if not opentelemetry.trace.get_current_span().get_span_context().is_valid:
        return None
    headers: dict[str, str] = {}
    opentelemetry.propagate.inject(headers)
    if not headers or sum(len(k) + len(v) for k, v in headers.items()) > MAX_CARRIER_CHARS:
        return None
    return headers


@contextmanager
def continued(
    name: str,
    headers: Mapping[str, str] | None,
    attributes: Mapping[str, AttributeValue] | None = None,
    kind: SpanKind = SpanKind.CLIENT,
) -> Iterator[Span]:
    """A span `name`, the child of the context in `headers` (a new trace without them)."""
    context = opentelemetry.propagate.extract(dict(headers)) if headers else None
    tracer = opentelemetry.trace.get_tracer("procflow")
    with tracer.start_as_current_span(
        name, context=context, kind=kind, attributes=dict(attributes or {})
    ) as span:
        yield span

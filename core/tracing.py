"""OpenTelemetry traces (issue 14): one decision is one trace.

Off by default (PROCFLOW_TRACING_ENABLED). When on, `configure_tracing` sets the process's
TracerProvider once (spans go to PROCFLOW_OTLP_ENDPOINT over OTLP/HTTP when it is set, else
nowhere; tests add an in-memory exporter), `interceptors` gives the Temporal client its tracing
interceptor (a worker built from that client inherits it: it is a worker interceptor too) and
the API instruments FastAPI. A decision then reads, in one trace:

    POST /tasks/{id}/decision (FastAPI server span)
      StartWorkflowUpdate:decide (client)
        ValidateUpdate:decide, HandleUpdate:decide (workflow)
          StartActivity:project (workflow, the local projection the decision causes)
            RunActivity:project (the activity itself)

The SDK's TracingInterceptor alone parents every workflow-side span to the span that *started*
the workflow (the POST /orders request) and only links the update: the decision's projection
would sit in the order's trace. `DecisionTracingInterceptor` parents an update's spans to the
client's update span instead, and the activities the workflow starts while that update is being
handled (its handler's and the main loop's step it causes) to the update's span. Workflow spans
are, as with the SDK's interceptor, zero-length marks made outside the sandbox and never on
replay; they are not part of the history.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import opentelemetry.context
import opentelemetry.trace
import temporalio.api.common.v1
import temporalio.client
import temporalio.worker
import temporalio.workflow
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from temporalio.contrib.opentelemetry import TracingInterceptor, TracingWorkflowInboundInterceptor

# private parts of the SDK's interceptor (temporalio is pinned <2): its outbound workflow
# interceptor (StartActivity spans) and the attach/detach that survives workflow eviction
from temporalio.contrib.opentelemetry._context import attached_context
from temporalio.contrib.opentelemetry._interceptor import _TracingWorkflowOutboundInterceptor

from core.settings import Settings

log = logging.getLogger("procflow.tracing")

# the modules the workflow sandbox passes through when tracing is on (the SDK's note: the
# workflow side of the interceptor uses opentelemetry, which must not be re-imported there)
PASSTHROUGH_MODULES = ("opentelemetry",)

_provider: TracerProvider | None = None


def configure_tracing(
    settings: Settings, service_name: str, *, exporter: SpanExporter | None = None
) -> TracerProvider | None:
    """Set the global TracerProvider once (None and nothing done when tracing is off).

    With settings.otlp_endpoint its spans are exported there over OTLP/HTTP (batched);
    `exporter` (tests: an InMemorySpanExporter) is added, synchronously, on every call, also
    to a provider set before: OpenTelemetry lets a process set its provider only once."""
    global _provider
    if not settings.tracing_enabled:
        return None
    if _provider is None:
        provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        if settings.otlp_endpoint:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            provider.add_span_processor(
                BatchSpanProcessor(OTLPSpanExporter(endpoint=settings.otlp_endpoint))
            )
        opentelemetry.trace.set_tracer_provider(provider)
        _provider = provider
        log.info(
            "tracing on (%s), exporting to %s",
            service_name,
            settings.otlp_endpoint or "nowhere (no PROCFLOW_OTLP_ENDPOINT)",
        )
    if exporter is not None:
        _provider.add_span_processor(SimpleSpanProcessor(exporter))
    return _provider


def interceptors(settings: Settings) -> list[Any]:
    """The Temporal client's interceptors: [DecisionTracingInterceptor()] when tracing is on.
    Put them on the client only: a Worker built from it takes them over."""
    if not settings.tracing_enabled:
        return []
    return [DecisionTracingInterceptor()]


def passthrough_modules(settings: Settings) -> tuple[str, ...]:
    """What the workflow sandbox must pass through for the interceptors of `settings`."""
    return PASSTHROUGH_MODULES if settings.tracing_enabled else ()


class DecisionTracingInterceptor(TracingInterceptor):
    """The SDK's TracingInterceptor (client, activity and workflow spans) with the workflow side
    of `DecisionWorkflowInterceptor`: an update's spans are in the update's trace."""

    def intercept_client(
        self, next: temporalio.client.OutboundInterceptor
    ) -> temporalio.client.OutboundInterceptor:
        return _UntracedQueries(super().intercept_client(next), next)

    def workflow_interceptor_class(
        self, input: temporalio.worker.WorkflowInterceptorClassInput
    ) -> type[TracingWorkflowInboundInterceptor]:
        super().workflow_interceptor_class(input)  # registers the span extern function
        return DecisionWorkflowInterceptor


class _UntracedQueries(temporalio.client.OutboundInterceptor):
    """The traced client, but queries go out untraced (no QueryWorkflow span and no header,
    so the worker makes no HandleQuery span either). A query changes nothing and is what
    status pages poll: traced, it was a third of all spans of the sales-order benchmark
    (bench/README.md, phase observe); the HTTP request's span still covers it."""

    def __init__(
        self,
        traced: temporalio.client.OutboundInterceptor,
        plain: temporalio.client.OutboundInterceptor,
    ) -> None:
        super().__init__(traced)
        self._plain = plain

    async def query_workflow(self, input: temporalio.client.QueryWorkflowInput) -> Any:
        return await self._plain.query_workflow(input)


class _Headers:
    """What `_completed_span` writes the new span's context into."""

    def __init__(self) -> None:
        self.headers: Mapping[str, temporalio.api.common.v1.Payload] = {}


class DecisionWorkflowInterceptor(TracingWorkflowInboundInterceptor):
    """Updates (decisions, task actions, cancellations) traced as their caller's trace: the
    validator's and handler's spans are children of the client's StartWorkflowUpdate span, and
    each activity the workflow starts while an update is being handled is a child of that
    update's HandleUpdate span. Without an update in flight (the start, timers) activities stay
    under the workflow's start, as with the SDK's interceptor."""

    def __init__(self, next: temporalio.worker.WorkflowInboundInterceptor) -> None:
        super().__init__(next)
        # the carriers of the updates being handled, newest last: the cause of what starts now
        self._causes: list[dict[str, Any]] = []

    def init(self, outbound: temporalio.worker.WorkflowOutboundInterceptor) -> None:
        temporalio.worker.WorkflowInboundInterceptor.init(
            self, _CausedOutbound(_TracingWorkflowOutboundInterceptor(outbound, self), self)
        )

    def _update_carrier(self, input: temporalio.worker.HandleUpdateInput) -> dict | None:
        header = input.headers.get(self.header_key)
        if not header:
            return None
        carrier = self.payload_converter.from_payloads([header])[0]
        return carrier or None

    def _context_of(self, carrier: dict) -> opentelemetry.context.Context:
        return self._set_on_context(self.text_map_propagator.extract(carrier))

    def handle_update_validator(self, input: temporalio.worker.HandleUpdateInput) -> None:
        carrier = self._update_carrier(input)
        if carrier is None:
            return super().handle_update_validator(input)
        with attached_context(self._context_of(carrier)):
            self._completed_span(
                f"ValidateUpdate:{input.update}",
                link_context_carrier=self._load_workflow_context_carrier(),
                kind=opentelemetry.trace.SpanKind.SERVER,
            )
            temporalio.worker.WorkflowInboundInterceptor.handle_update_validator(self, input)

    async def handle_update_handler(self, input: temporalio.worker.HandleUpdateInput) -> Any:
        carrier = self._update_carrier(input)
        if carrier is None:
            return await super().handle_update_handler(input)
        span = _Headers()
        with attached_context(self._context_of(carrier)):
            self._completed_span(
                f"HandleUpdate:{input.update}",
                link_context_carrier=self._load_workflow_context_carrier(),
                add_to_outbound=span,
                kind=opentelemetry.trace.SpanKind.SERVER,
            )
        span_header = span.headers.get(self.header_key)
        # on replay no span is made: what the update causes then hangs on the client's span
        cause = self.payload_converter.from_payloads([span_header])[0] if span_header else carrier
        self._causes.append(cause)
        try:
            with attached_context(self._context_of(cause)):
                return await temporalio.worker.WorkflowInboundInterceptor.handle_update_handler(
                    self, input
                )
        finally:
            self._causes.remove(cause)

    @contextmanager
    def caused(self) -> Iterator[None]:
        """The newest update in flight as the current context (nothing without one)."""
        cause = self._causes[-1] if self._causes else None
        with attached_context(self._context_of(cause) if cause else None):
            yield


class _CausedOutbound(temporalio.worker.WorkflowOutboundInterceptor):
    """Outside the SDK's outbound interceptor: an activity started while an update is handled
    (by the handler or by the main loop's step it wakes) gets its StartActivity span there."""

    def __init__(
        self,
        next: temporalio.worker.WorkflowOutboundInterceptor,
        root: DecisionWorkflowInterceptor,
    ) -> None:
        super().__init__(next)
        self.root = root

    def start_activity(
        self, input: temporalio.worker.StartActivityInput
    ) -> temporalio.workflow.ActivityHandle:
        with self.root.caused():
            return super().start_activity(input)

    def start_local_activity(
        self, input: temporalio.worker.StartLocalActivityInput
    ) -> temporalio.workflow.ActivityHandle:
        with self.root.caused():
            return super().start_local_activity(input)

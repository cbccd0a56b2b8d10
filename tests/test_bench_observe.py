"""The benchmark's phase 8 pieces that need no stack: the OTLP sink (fed by the real OTLP/HTTP
exporter), the environments of the off and on stacks, the summary of the rounds, the sizes."""

from __future__ import annotations

import gzip
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from bench import run
from scripts.otlp_sink import SinkServer


@pytest.fixture
def sink() -> Iterator[str]:
    server = SinkServer(("127.0.0.1", 0))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def counts(base: str) -> dict:
    with urllib.request.urlopen(f"{base}/counts", timeout=5) as r:
        return json.loads(r.read())


def spans_from(base: str, service: str, names: list[str]) -> None:
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(f"{base}/v1/traces")))
    tracer = provider.get_tracer("bench-test")
    for name in names:
        with tracer.start_as_current_span(name):
            pass
    provider.shutdown()


def test_sink_counts_spans_by_service_and_name(sink: str) -> None:
    spans_from(sink, "procflow-api", ["POST /orders", "POST /orders", "GET /orders/{no}"])
    spans_from(sink, "procflow-worker", ["RunActivity:project"])
    got = counts(sink)
    assert got["total"] == 4
    assert got["by_service"] == {"procflow-api": 3, "procflow-worker": 1}
    assert got["by_name"]["procflow-api"] == {"POST /orders": 2, "GET /orders/{no}": 1}
    assert got["requests"] == 4 and got["rejected"] == 0  # one export per span (Simple...)


def test_sink_answers_an_empty_protobuf_response_and_takes_gzip(sink: str) -> None:
    body = gzip.compress(ExportTraceServiceRequest().SerializeToString())
    req = urllib.request.Request(
        f"{sink}/v1/traces",
        data=body,
        headers={"Content-Type": "application/x-protobuf", "Content-Encoding": "gzip"},
    )
    with urllib.request.urlopen(req, timeout=5) as r:
        assert r.status == 200
        assert r.headers["Content-Type"] == "application/x-protobuf"
        ExportTraceServiceResponse().ParseFromString(r.read())
    assert counts(sink)["requests"] == 1


@pytest.mark.parametrize(
    ("content_type", "body", "code"),
    [("application/json", b"{}", 415), ("application/x-protobuf", b"\xff\xff\xff", 400)],
)
def test_sink_refuses_what_it_cannot_decode(
    sink: str, content_type: str, body: bytes, code: int
) -> None:
    req = urllib.request.Request(
        f"{sink}/v1/traces", data=body, headers={"Content-Type": content_type}
    )
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=5)
    assert err.value.code == code
    assert counts(sink)["rejected"] == 1


def test_observe_env_off_and_on() -> None:
    off = run.observe_env(False)
    assert off == {
        "PROCFLOW_METRICS_ENABLED": "false",
        "PROCFLOW_WORKER_METRICS_ADDRESS": "",
        "PROCFLOW_TRACING_ENABLED": "false",
    }
    on = run.observe_env(True, 9100, 4318)
    assert on["PROCFLOW_WORKER_METRICS_ADDRESS"] == "127.0.0.1:9100"
    assert on["PROCFLOW_OTLP_ENDPOINT"] == "http://127.0.0.1:4318/v1/traces"
    assert on["PROCFLOW_METRICS_ENABLED"] == on["PROCFLOW_TRACING_ENABLED"] == "true"


def batch(orders: int, wall_s: float, worker_s: float) -> dict:
    cpu = {"temporal": 1.0, "worker": worker_s, "api": 0.5, "bench_process": 0.5}
    return {"orders": orders, "wall_s": wall_s, "orders_per_s": orders / wall_s, "cpu_s": cpu}


def test_observe_summary() -> None:
    rounds = [
        {"off": batch(10, 5.0, 2.0), "on": batch(10, 5.5, 2.5)},
        {"off": batch(10, 5.0, 2.0), "on": batch(10, 4.5, 2.5)},
    ]
    s = run.observe_summary(rounds)
    assert s["off_orders_per_s"] == pytest.approx(2.0)
    assert s["on_orders_per_s"] == pytest.approx(2.0)  # 20 orders in 10 s on both sides
    assert s["overhead_pct"] == pytest.approx(0.0)
    assert s["round_overhead_pct"] == [9.1, -11.1]
    assert s["cpu_ms_per_order"]["off"] == {
        "temporal": 100.0,
        "worker": 200.0,
        "api": 50.0,
        "bench_process": 50.0,
        "total": 400.0,
    }
    assert s["cpu_ms_per_order"]["on"]["total"] == 450.0
    assert s["cpu_overhead_pct"] == pytest.approx(12.5)


def test_observe_is_a_default_phase_with_sizes() -> None:
    assert "observe" in run.PHASES and "observe" not in run.PER_SIDE
    for sizes in (run.QUICK, run.FULL):
        assert sizes.observe_rounds >= 2
        assert sizes.observe_orders // sizes.observe_rounds >= 4  # every kind in a round

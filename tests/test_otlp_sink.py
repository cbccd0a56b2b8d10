"""scripts/otlp_sink.py keeps every span it receives as a JSON line (make run's local traces),
fed by the real OTLP/HTTP exporter."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import SpanKind

from scripts.otlp_sink import SinkServer


@pytest.fixture
def jsonl_sink(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    path = tmp_path / "traces.jsonl"
    server = SinkServer(("127.0.0.1", 0), path)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1/traces", path
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_every_span_is_a_json_line_with_its_parent_and_attributes(
    jsonl_sink: tuple[str, Path],
) -> None:
    url, path = jsonl_sink
    provider = TracerProvider(resource=Resource.create({"service.name": "procflow-worker"}))
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(url)))
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("HandleUpdate:decide", kind=SpanKind.SERVER) as parent:
        with tracer.start_as_current_span(
            "SendMail", kind=SpanKind.CLIENT, attributes={"procflow.recipients": 2}
        ):
            pass
    provider.shutdown()

    spans = {s["name"]: s for s in map(json.loads, path.read_text().splitlines())}
    assert set(spans) == {"HandleUpdate:decide", "SendMail"}
    mail, update = spans["SendMail"], spans["HandleUpdate:decide"]
    trace_id = f"{parent.get_span_context().trace_id:032x}"
    assert mail["trace_id"] == update["trace_id"] == trace_id
    assert (
        mail["parent_span_id"] == update["span_id"] == f"{parent.get_span_context().span_id:016x}"
    )
    assert update["parent_span_id"] is None
    assert mail["service"] == "procflow-worker"
    assert (mail["kind"], update["kind"]) == ("client", "server")
    assert mail["attributes"] == {"procflow.recipients": 2}
    assert mail["duration_ms"] >= 0 and mail["start_unix_nano"] > 0


def test_scripts_traces_prints_the_newest_matching_trace_as_a_tree(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from scripts import traces

    def span(trace: str, sid: str, parent: str | None, name: str, start: int) -> str:
        record = {
            "trace_id": trace,
            "span_id": sid,
            "parent_span_id": parent,
            "service": "procflow-api" if name.startswith("POST") else "procflow-worker",
            "name": name,
            "kind": "server",
            "start_unix_nano": start,
            "duration_ms": 1.5,
            "attributes": {},
        }
        return json.dumps(record)

    path = tmp_path / "traces.jsonl"
    path.write_text(
        "\n".join(
            [
                span("old", "a", None, "POST /tasks/{task_id}/decision", 1),
                span("new", "b", None, "POST /tasks/{task_id}/decision", 10),
                span("new", "d", "c", "RunActivity:project", 13),
                span("new", "c", "b", "HandleUpdate:decide", 12),
                span("new", "e", "d", "SendMail", 20),
                span("other", "f", None, "POST /orders", 30),
            ]
        )
        + "\n"
    )
    assert traces.main([str(path)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "trace new",
        "POST /tasks/{task_id}/decision  [procflow-api, 1.5 ms]",
        "  HandleUpdate:decide  [procflow-worker, 1.5 ms]",
        "    RunActivity:project  [procflow-worker, 1.5 ms]",
        "      SendMail  [procflow-worker, 1.5 ms]",
    ]
    assert traces.main([str(path), "--match", "nothing"]) == 1
    assert traces.main([str(tmp_path / "missing.jsonl")]) == 2

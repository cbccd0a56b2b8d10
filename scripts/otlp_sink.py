"""A minimal OTLP/HTTP trace receiver: `make run`'s local traces and the benchmark's sink.

    python -m scripts.otlp_sink --port N [--host 127.0.0.1] [--out FILE] [--jsonl FILE]

With `--jsonl` every span is appended to FILE as one JSON object a line (trace and span ids,
the parent's, service, name, kind, start, duration, attributes): `make run` with
PROCFLOW_TRACING_ENABLED=true and no PROCFLOW_OTLP_ENDPOINT writes `.data/traces.jsonl` so.

Accepts `POST /v1/traces` with an OTLP protobuf body (`ExportTraceServiceRequest`, gzip
or not), answers 200 with an empty `ExportTraceServiceResponse` (application/x-protobuf),
and counts the spans by the resource's `service.name` and by span name. `GET /counts`
answers the counts as JSON; on SIGTERM (or SIGINT) they are also written to `--out`. Nothing
is stored but the counts: the point is a real receiver on the other end of the exporters
(the HTTP request, the decoding) whose CPU is the collector's, not procflow's.
"""

from __future__ import annotations

import argparse
import gzip
import json
import signal
import sys
import threading
import zlib
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

TRACES_PATH = "/v1/traces"
COUNTS_PATH = "/counts"
PROTOBUF = "application/x-protobuf"
UNKNOWN_SERVICE = "unknown_service"


class SpanCounts:
    """Spans received, by service.name and by (service.name, span name); thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.by_service: Counter[str] = Counter()
        self.by_name: dict[str, Counter[str]] = {}
        self.requests = 0
        self.rejected = 0  # bodies that did not decode
        self.bytes = 0

    def add(self, request: ExportTraceServiceRequest, size: int) -> int:
        """Count the spans of one export request; the number of spans in it."""
        seen: list[tuple[str, str]] = []
        for resource_spans in request.resource_spans:
            service = service_name(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                seen.extend((service, span.name) for span in scope_spans.spans)
        with self._lock:
            self.requests += 1
            self.bytes += size
            for service, name in seen:
                self.by_service[service] += 1
                self.by_name.setdefault(service, Counter())[name] += 1
        return len(seen)

    def reject(self) -> None:
        with self._lock:
            self.rejected += 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "total": sum(self.by_service.values()),
                "by_service": dict(self.by_service),
                "by_name": {s: dict(c.most_common()) for s, c in self.by_name.items()},
                "requests": self.requests,
                "rejected": self.rejected,
                "bytes": self.bytes,
            }


def service_name(attributes: Any) -> str:
    for kv in attributes:
        if kv.key == "service.name":
            return kv.value.string_value or UNKNOWN_SERVICE
    return UNKNOWN_SERVICE


def decode_body(body: bytes, encoding: str) -> bytes:
    encoding = encoding.strip().lower()
    if encoding == "gzip":
        return gzip.decompress(body)
    if encoding == "deflate":
        return zlib.decompress(body)
    if encoding in ("", "identity"):
        return body
    raise ValueError(f"unsupported Content-Encoding {encoding!r}")


class Handler(BaseHTTPRequestHandler):
    server: SinkServer
    protocol_version = "HTTP/1.1"  # keep-alive: the exporters reuse their connection

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        pass  # one line per export would be the sink's main cost

    def _answer(self, code: int, body: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        if self.path.split("?", 1)[0] != TRACES_PATH:
            self._answer(404, b"not found\n", "text/plain")
            return
        content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip()
        if content_type != PROTOBUF:
            self.server.counts.reject()
            self._answer(415, b"only application/x-protobuf\n", "text/plain")
            return
        try:
            request = ExportTraceServiceRequest()
            request.ParseFromString(decode_body(body, self.headers.get("Content-Encoding", "")))
        except Exception as err:  # a body that does not decode: 400, as a collector answers
            self.server.counts.reject()
            self._answer(400, f"bad request: {err}\n".encode(), "text/plain")
            return
        self.server.counts.add(request, len(body))
        self.server.keep(request)
        self._answer(200, ExportTraceServiceResponse().SerializeToString(), PROTOBUF)

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] != COUNTS_PATH:
            self._answer(404, b"not found\n", "text/plain")
            return
        body = json.dumps(self.server.counts.snapshot()).encode()
        self._answer(200, body, "application/json")


_KINDS = {0: "unspecified", 1: "internal", 2: "server", 3: "client", 4: "producer", 5: "consumer"}


def _value(any_value: Any) -> Any:
    """An OTLP AnyValue as plain JSON (scalars; arrays and maps as their string form)."""
    field = any_value.WhichOneof("value")
    if field is None:
        return None
    value = getattr(any_value, field)
    return (
        value
        if field in ("string_value", "bool_value", "int_value", "double_value")
        else str(value)
    )


def span_lines(request: ExportTraceServiceRequest) -> list[str]:
    """One JSON line per span of an export request."""
    lines = []
    for resource_spans in request.resource_spans:
        service = service_name(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                record = {
                    "trace_id": span.trace_id.hex(),
                    "span_id": span.span_id.hex(),
                    "parent_span_id": span.parent_span_id.hex() or None,
                    "service": service,
                    "name": span.name,
                    "kind": _KINDS.get(span.kind, str(span.kind)),
                    "start_unix_nano": span.start_time_unix_nano,
                    "duration_ms": round(
                        (span.end_time_unix_nano - span.start_time_unix_nano) / 1e6, 3
                    ),
                    "attributes": {kv.key: _value(kv.value) for kv in span.attributes},
                }
                lines.append(json.dumps(record, separators=(",", ":")))
    return lines


class SinkServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], jsonl: Path | None = None) -> None:
        super().__init__(address, Handler)
        self.counts = SpanCounts()
        self.jsonl = jsonl
        self._write_lock = threading.Lock()

    def keep(self, request: ExportTraceServiceRequest) -> None:
        """Append the request's spans to the JSON-lines file, if there is one."""
        if self.jsonl is None:
            return
        lines = span_lines(request)
        if lines:
            with self._write_lock, self.jsonl.open("a", encoding="utf-8") as out:
                out.write("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.otlp_sink", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--out", type=Path, help="write the counts (JSON) here on SIGTERM")
    parser.add_argument("--jsonl", type=Path, help="append every span here, a JSON line each")
    args = parser.parse_args(argv)
    if args.jsonl is not None:
        args.jsonl.parent.mkdir(parents=True, exist_ok=True)
    server = SinkServer((args.host, args.port), args.jsonl)

    def stop(signum: int, frame: Any) -> None:
        # shutdown() waits for serve_forever, which runs in this very thread: from another
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"otlp sink on http://{args.host}:{server.server_address[1]}{TRACES_PATH}", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
        counts = server.counts.snapshot()
        if args.out is not None:
            args.out.write_text(json.dumps(counts, indent=2) + "\n")
        print(f"otlp sink stopped: {counts['total']} spans {counts['by_service']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

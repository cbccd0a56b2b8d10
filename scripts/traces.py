"""Print a trace from the spans `make run` keeps (scripts/otlp_sink.py --jsonl) as a tree.

    python -m scripts.traces [FILE] [--match TEXT]

The newest trace that has a span whose name contains TEXT (default "decision"; FILE default
.data/traces.jsonl), each span indented under its parent, in start order, with its service and
duration: one decision from the HTTP request through the update and the workflow to its
projection and the mails the dispatcher sent later.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

DEFAULT_FILE = Path(__file__).resolve().parent.parent / ".data" / "traces.jsonl"


def load(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def newest_trace(spans: list[dict[str, Any]], match: str) -> list[dict[str, Any]]:
    """The spans of the newest trace with a span whose name contains `match` ([] if none)."""
    hits = [s for s in spans if match in s["name"]]
    if not hits:
        return []
    trace_id = max(hits, key=lambda s: s["start_unix_nano"])["trace_id"]
    return [s for s in spans if s["trace_id"] == trace_id]


def tree_lines(trace: list[dict[str, Any]]) -> list[str]:
    """Each span under its parent (spans whose parent is not in the file at the top)."""
    ids = {s["span_id"] for s in trace}
    children: dict[str | None, list[dict[str, Any]]] = defaultdict(list)
    for span in trace:
        parent = span["parent_span_id"] if span["parent_span_id"] in ids else None
        children[parent].append(span)
    lines: list[str] = []

    def walk(parent: str | None, depth: int) -> None:
        for span in sorted(children[parent], key=lambda s: s["start_unix_nano"]):
            lines.append(
                f"{'  ' * depth}{span['name']}  [{span['service']}, {span['duration_ms']} ms]"
            )
            walk(span["span_id"], depth + 1)

    walk(None, 0)
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.traces", description=__doc__)
    parser.add_argument("file", nargs="?", type=Path, default=DEFAULT_FILE)
    parser.add_argument("--match", default="decision", help="part of a span name")
    args = parser.parse_args(argv)
    if not args.file.is_file():
        print(
            f"{args.file}: no such file (PROCFLOW_TRACING_ENABLED=true make run)", file=sys.stderr
        )
        return 2
    trace = newest_trace(load(args.file), args.match)
    if not trace:
        print(f"no span named like {args.match!r} in {args.file}", file=sys.stderr)
        return 1
    print(f"trace {trace[0]['trace_id']}")
    print("\n".join(tree_lines(trace)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

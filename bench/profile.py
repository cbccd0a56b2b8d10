"""Where the CPU goes during a benchmark phase: CPU seconds per process from /proc, and, with
`python -m bench.run --profile`, py-spy samples of the worker and of the benchmark process
(the API and the simulated users), summarised by function."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


@dataclass
class CpuMeter:
    """CPU seconds each named process uses between `start` and `stop`."""

    pids: dict[str, int]
    _t0: dict[str, float] = field(default_factory=dict)

    def start(self) -> None:
        self._t0 = {name: cpu_s(pid) for name, pid in self.pids.items()}

    def stop(self) -> dict[str, float]:
        return {name: cpu_s(pid) - self._t0[name] for name, pid in self.pids.items()}


# The asyncio loop's thread: the one whose stack runs the event loop. Other Python threads
# (aiosqlite's connection threads, the default executor) wait most of the time and py-spy
# cannot always tell waiting from working there.
MAIN_LOOP = "run_forever (asyncio/base_events.py"


def summarize(raw: Path, top: int = 25) -> dict[str, object]:
    """Inclusive and self share of the event loop thread's samples per function."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if MAIN_LOOP not in stack:
            continue
        n = int(count)
        total += n
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]
        for f in set(frames):
            inclusive[f] += n
        own[frames[-1]] += n
    share = lambda c: [(f, round(100 * v / total, 1)) for f, v in c.most_common(top)]  # noqa: E731
    return {"samples": total, "inclusive_pct": share(inclusive), "self_pct": share(own)}


@dataclass
class Profiler:
    """py-spy record on some processes while a phase runs (py-spy from the venv or PATH)."""

    out: Path
    rate: int = 100
    _runs: list[tuple[str, subprocess.Popen, Path]] = field(default_factory=list)

    @staticmethod
    def available() -> str | None:
        here = Path(__file__).resolve().parents[1] / ".venv" / "bin" / "py-spy"
        return str(here) if here.exists() else shutil.which("py-spy")

    def start(self, name: str, pid: int) -> None:
        binary = self.available()
        if binary is None:
            raise RuntimeError("--profile needs py-spy: .venv/bin/pip install py-spy")
        self.out.mkdir(parents=True, exist_ok=True)
        raw = self.out / f"{name}.txt"
        cmd = [binary, "record", "--pid", str(pid), "--rate", str(self.rate)]
        cmd += ["--format", "raw", "--nonblocking", "-o", str(raw)]
        log = (self.out / f"{name}.py-spy.log").open("wb")
        popen = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        self._runs.append((name, popen, raw))

    def stop(self) -> dict[str, object]:
        summaries: dict[str, object] = {}
        for name, popen, raw in self._runs:
            popen.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
            popen.wait(60)
            summaries[name] = summarize(raw) if raw.exists() else {"error": "no samples"}
        self._runs.clear()
        return summaries


def busy_s() -> tuple[float, float]:
    """The machine's busy and total CPU seconds so far, all cores (from /proc/stat)."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return (sum(values) - idle) / TICKS, sum(values) / TICKS


@dataclass
class LoadMeter:
    """How loaded the machine was while a side ran: /proc/loadavg every few seconds, and the
    CPU that processes other than the tracked ones (the benchmark's) used meanwhile."""

    interval_s: float = 5.0
    _pids: dict[str, int] = field(default_factory=dict)
    _first: dict[str, float] = field(default_factory=dict)
    _last: dict[str, float] = field(default_factory=dict)
    _loadavg: list[float] = field(default_factory=list)
    _t0: tuple[float, float, float] = (0.0, 0.0, 0.0)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._t0 = (time.monotonic(), *busy_s())
        self._thread = threading.Thread(target=self._run, name="load-meter", daemon=True)
        self._thread.start()

    def track(self, pids: dict[str, int]) -> None:
        """Count these processes as the benchmark's own from now on."""
        for name, pid in pids.items():
            if name not in self._pids:
                self._pids[name] = pid
                self._first[name] = self._last[name] = cpu_s(pid)

    def _sample(self) -> None:
        self._loadavg.append(float(Path("/proc/loadavg").read_text().split()[0]))
        for name, pid in list(self._pids.items()):
            try:
                self._last[name] = cpu_s(pid)
            except (FileNotFoundError, ProcessLookupError):  # ended: its last sample stands
                pass

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def stop(self) -> dict[str, float]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
        t0, busy0, _ = self._t0
        wall = time.monotonic() - t0
        busy = busy_s()[0] - busy0
        ours = sum(self._last[n] - self._first[n] for n in self._pids)
        loads = self._loadavg or [float("nan")]
        return {
            "wall_s": round(wall, 1),
            "loadavg_mean": round(sum(loads) / len(loads), 2),
            "loadavg_max": round(max(loads), 2),
            "busy_cores": round(busy / wall, 2),
            "bench_cores": round(ours / wall, 2),
            "others_cores": round(max(0.0, busy - ours) / wall, 2),
        }

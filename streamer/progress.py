"""Progress of a run: bytes read, quantized and written/uploaded, with rates and ETA.

One Progress object counts; listeners turn its events into tqdm bars (terminal), log lines,
or UI updates (the Gradio app). Listeners are called from worker threads and must be quick.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

log = logging.getLogger("streamer")

STAGES = ("read", "quantize", "upload")


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


@dataclass(frozen=True)
class ProgressEvent:
    stage: str  # one of STAGES, or "log" for a human-readable message
    done: int = 0  # bytes so far in this stage
    total: int = 0  # bytes expected in this stage
    rate: float = 0.0  # bytes/s since the stage started
    eta: float | None = None  # seconds left in this stage, when it can be estimated
    message: str = ""


@dataclass
class _Counter:
    total: int = 0
    done: int = 0
    started: float | None = None
    finished: float | None = None


@dataclass
class Progress:
    listeners: list[Callable[[ProgressEvent], None]] = field(default_factory=list)

    def __post_init__(self):
        self._lock = threading.Lock()
        self._counters = {s: _Counter() for s in STAGES}
        self.t0 = time.monotonic()

    def set_total(self, stage: str, total: int) -> None:
        with self._lock:
            self._counters[stage].total = total
        self._emit(stage)

    def advance(self, stage: str, n: int) -> None:
        now = time.monotonic()
        with self._lock:
            c = self._counters[stage]
            if c.started is None:
                c.started = now
            c.done += n
            if c.done >= c.total:
                c.finished = now
        self._emit(stage)

    def message(self, text: str) -> None:
        log.info(text)
        for fn in list(self.listeners):
            fn(ProgressEvent("log", message=text))

    def snapshot(self, stage: str) -> ProgressEvent:
        with self._lock:
            c = self._counters[stage]
            end = c.finished or time.monotonic()
            elapsed = (end - c.started) if c.started is not None else 0.0
            rate = c.done / elapsed if elapsed > 0 else 0.0
            eta = (c.total - c.done) / rate if rate > 0 and c.total > c.done else None
            return ProgressEvent(stage, c.done, c.total, rate, eta)

    def stage_seconds(self) -> dict[str, float]:
        with self._lock:
            return {
                s: round((c.finished or time.monotonic()) - c.started, 3) if c.started else 0.0
                for s, c in self._counters.items()
            }

    def _emit(self, stage: str) -> None:
        if not self.listeners:
            return
        event = self.snapshot(stage)
        for fn in list(self.listeners):
            fn(event)


class TqdmListener:
    """Three tqdm bars in a terminal: read, quantize, upload."""

    def __init__(self):
        from tqdm.auto import tqdm

        labels = {"read": "read    ", "quantize": "quantize", "upload": "write   "}
        self._bars = {
            s: tqdm(total=0, desc=labels[s], unit="B", unit_scale=True, unit_divisor=1000, position=i, leave=True)
            for i, s in enumerate(STAGES)
        }
        self._lock = threading.Lock()

    def __call__(self, event: ProgressEvent) -> None:
        with self._lock:
            if event.stage == "log":
                self._bars["read"].write(event.message)
                return
            bar = self._bars[event.stage]
            if bar.total != event.total:
                bar.total = event.total
            bar.update(event.done - bar.n)

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()

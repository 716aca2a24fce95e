"""Progress of a run: bytes read, quantized and written/uploaded, with rates and ETA.

One Progress object counts; listeners turn its events into tqdm bars (terminal), log lines,
or UI updates (the Gradio app). Listeners are called from worker threads and must be quick.

Rates are measured over a sliding window (WINDOW_S) from the moment a stage could start, not
from its first bytes: bytes arrive in whole pieces, so a rate counted from the first piece
(bytes / microseconds) made the first seconds show absurd rates and ETAs.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

log = logging.getLogger("streamer")

STAGES = ("read", "quantize", "upload")
WINDOW_S = 20.0  # rates cover about the last 20 s: recent enough to follow the link, long enough to be calm
STEADY_S = 3.0  # an ETA is worth showing only after this long and two advances (see ProgressEvent.steady)


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


def human_duration(seconds: float) -> str:
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


@dataclass(frozen=True)
class ProgressEvent:
    stage: str  # one of STAGES, or "log" for a human-readable message
    done: int = 0  # bytes so far in this stage
    total: int = 0  # bytes expected in this stage
    rate: float = 0.0  # bytes/s over the last WINDOW_S (the whole stage once it is finished)
    eta: float | None = None  # seconds left in this stage, when it can be estimated
    message: str = ""
    # True once rate and ETA rest on enough signal to show (STEADY_S seconds and two advances,
    # or the stage is finished); before that an ETA may be far off and a display should omit it
    steady: bool = False


@dataclass
class _Counter:
    total: int = 0
    done: int = 0
    since: float | None = None  # when the stage could start (its total was set): the rate's origin
    started: float | None = None  # its first bytes (stage_seconds)
    finished: float | None = None
    advances: int = 0
    # (time, done) points, oldest first; the first is the rate's anchor, at least WINDOW_S old
    # once the run is that long, and never the newest point, so a rate always spans one advance
    samples: deque = field(default_factory=deque)

    def begin(self, now: float) -> None:
        if self.since is None:
            self.since = now
            self.samples.append((now, 0))

    def record(self, now: float, n: int) -> None:
        if self.started is None:
            self.started = now
        self.done += n
        self.advances += 1
        self.samples.append((now, self.done))
        if self.done >= self.total:
            self.finished = now
        self._trim(now)

    def _trim(self, now: float) -> None:
        while len(self.samples) > 2 and self.samples[1][0] <= now - WINDOW_S:
            self.samples.popleft()

    def rate(self, now: float) -> float:
        if self.finished is not None:  # the whole stage's average: the number a summary wants
            elapsed = self.finished - self.since
            return self.done / elapsed if elapsed > 0 else 0.0
        self._trim(now)
        t, done = self.samples[0] if self.samples else (now, self.done)
        return (self.done - done) / (now - t) if now > t else 0.0

    def steady(self, now: float) -> bool:
        if self.finished is not None:
            return True
        return self.advances >= 2 and now - self.since >= STEADY_S


@dataclass
class Progress:
    listeners: list[Callable[[ProgressEvent], None]] = field(default_factory=list)

    def __post_init__(self):
        self._lock = threading.Lock()
        self._counters = {s: _Counter() for s in STAGES}
        self.t0 = time.monotonic()

    def set_total(self, stage: str, total: int) -> None:
        with self._lock:
            c = self._counters[stage]
            c.total = total
            c.begin(time.monotonic())
        self._emit(stage)

    def advance(self, stage: str, n: int) -> None:
        now = time.monotonic()
        with self._lock:
            c = self._counters[stage]
            c.begin(self.t0)  # no total was set: the rate counts from the Progress's creation
            c.record(now, n)
        self._emit(stage)

    def message(self, text: str) -> None:
        log.info(text)
        for fn in list(self.listeners):
            fn(ProgressEvent("log", message=text))

    def snapshot(self, stage: str) -> ProgressEvent:
        now = time.monotonic()
        with self._lock:
            c = self._counters[stage]
            rate = c.rate(now)
            eta = (c.total - c.done) / rate if rate > 0 and c.total > c.done else None
            return ProgressEvent(stage, c.done, c.total, rate, eta, steady=c.steady(now))

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


# --------------------------------------------------------------------------------------------
# the terminal
# --------------------------------------------------------------------------------------------


class TerminalLogHandler(logging.Handler):
    """Log records as whole lines on stderr, above the progress bars.

    tqdm.write takes the bars' lock, clears them, prints the line and redraws them, so a line
    is never cut by a bar being redrawn from another thread. Without bars it is a plain write.
    """

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            stream = sys.stderr  # looked up now: callers may swap it
            tqdm.write(self.format(record), file=stream)
            stream.flush()  # as logging.StreamHandler does: a line in a log file shows up at once
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)


def install_terminal_logging(level: int) -> bool:
    """Route log records and Python warnings to stderr through TerminalLogHandler, printing
    those at `level` or above. Leaves a root logger that someone else configured alone (as
    logging.basicConfig does), and replaces its own handler when called again. True if installed."""
    root = logging.getLogger()
    ours = [h for h in root.handlers if isinstance(h, TerminalLogHandler)]
    if len(ours) != len(root.handlers):
        return False
    for h in ours:
        root.removeHandler(h)
    handler = TerminalLogHandler(level)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)  # a library's warnings.warn would otherwise cut a bar, or break --quiet
    _adopt_hub_logging()
    return True


def _adopt_hub_logging() -> None:
    """huggingface_hub gives its logger a handler of its own on stderr ("Retrying in 1s …"); its
    records also reach the root's, so each line was printed twice, once straight through the
    bars. Leave them to the root's handler alone (shown at its level, above the bars)."""
    from huggingface_hub.utils import logging as hub_logging

    hub = hub_logging.get_logger()  # the library's root logger, "huggingface_hub"
    for h in list(hub.handlers):
        if type(h) is logging.StreamHandler and h.stream in (sys.stderr, sys.__stderr__):
            hub.removeHandler(h)


def hide_hub_bars() -> None:
    """Turn off huggingface_hub's own tqdm bars (one per uploaded file, "Upload 0 LFS files")
    for this process: streamer reports the bytes itself, and --quiet/--json must stay silent.
    An explicit HF_HUB_DISABLE_PROGRESS_BARS=0 wins (huggingface_hub would only warn)."""
    from huggingface_hub import constants
    from huggingface_hub.utils import disable_progress_bars

    if constants.HF_HUB_DISABLE_PROGRESS_BARS is not False:
        disable_progress_bars()


def _bar_class():
    from tqdm import tqdm

    class Bar(tqdm):
        """A tqdm bar that shows our numbers: bytes, the windowed rate and a steady ETA."""

        monitor_interval = 0  # no tqdm monitor thread: we redraw on our own clock
        stats = ""

        @property
        def format_dict(self):
            return {**super().format_dict, "stats": self.stats}

    return Bar


def bar_stats(event: ProgressEvent) -> str:
    """`1.20 GB / 9.08 GB · 12.3 MB/s · ETA 10:41`; no ETA until the estimate is steady."""
    rate = f"{human_bytes(event.rate)}/s" if event.rate > 0 else "–"
    if event.done >= event.total:  # 0 of 0 too: every shard was resumed
        eta = "done"
    elif event.steady and event.eta is not None:
        eta = f"ETA {human_duration(event.eta)}"
    else:
        eta = "ETA –"
    # fixed widths, so the three bars stay the same length and line up
    return f"{human_bytes(event.done):>9} / {human_bytes(event.total):<9} · {rate:>11} · {eta:<12}"


class TqdmListener:
    """Three bars on stderr: read, quantized, and uploaded (or written), with bytes, rate and ETA.

    Log events are left to logging (see TerminalLogHandler), so each line is printed once.
    Given the Progress, the bars are also redrawn every `refresh_s` seconds, so a stalled stage
    shows its rate falling instead of a frozen estimate. The bars appear with the run's totals,
    after the plan's log lines.
    """

    def __init__(self, progress: Progress | None = None, *, upload_label: str = "written", refresh_s: float = 1.0):
        labels = {"read": "read", "quantize": "quantized", "upload": upload_label}
        width = max(map(len, labels.values()))
        self._labels = {s: label.ljust(width) for s, label in labels.items()}
        self._bars: dict = {}
        self._drawn = {s: 0.0 for s in STAGES}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._progress = progress
        self._ticker = None
        if progress is not None:
            self._ticker = threading.Thread(target=self._tick, args=(refresh_s,), daemon=True, name="streamer-bars")
            self._ticker.start()

    def __call__(self, event: ProgressEvent) -> None:
        if event.stage in STAGES:
            self._show(event)

    def _show(self, event: ProgressEvent, force: bool = False) -> None:
        """Redraw a stage's bar; `force` (the clock, the last draw) passes the stop and the 0.1 s rule."""
        now = time.monotonic()
        final = event.total > 0 and event.done >= event.total
        with self._lock:
            if self._stop.is_set() and not force:
                return
            if not self._bars:
                self._open()
            if not (force or final) and now - self._drawn[event.stage] < 0.1:
                return  # a burst of events: tqdm's own rule, one redraw per 0.1 s
            bar, stats = self._bars[event.stage], bar_stats(event)
            # a stage with nothing to do (every shard resumed) is full, not an empty unknown
            total, n = (event.total, min(event.done, event.total)) if event.total else (1, 1)
            if (bar.total, bar.n, bar.stats) == (total, n, stats):
                return  # nothing new to see (a finished stage, on the clock)
            bar.total, bar.n, bar.stats = total, n, stats
            bar.refresh()
            self._drawn[event.stage] = now

    def _open(self) -> None:
        bar = _bar_class()
        self._bars = {
            s: bar(total=0, desc=self._labels[s], position=i, leave=True, file=sys.stderr,
                   bar_format="{desc} {percentage:3.0f}%|{bar}| {stats}", dynamic_ncols=True)
            for i, s in enumerate(STAGES)
        }  # fmt: skip

    def _tick(self, every: float) -> None:
        while not self._stop.wait(every):
            if self._bars:
                for s in STAGES:
                    self._show(self._progress.snapshot(s), force=True)

    def close(self) -> None:
        """Stop redrawing and leave the bars on screen, with their last numbers (once: the CLI
        closes them before printing an error, and again on its way out)."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
        if self._progress is not None and self._bars:
            for s in STAGES:
                self._show(self._progress.snapshot(s), force=True)
        with self._lock:
            for bar in self._bars.values():
                bar.close()

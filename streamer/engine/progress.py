"""Progress of a run: bytes read, quantized and written/uploaded, with rates and ETA.

One Progress object counts; listeners turn its events into bars (the command line's, in
streamer/cli/terminal.py), log lines, or UI updates (the web app). Listeners are called from
worker threads and must be quick.

Rates are measured over a sliding window (WINDOW_S) from the moment a stage could start, not
from its first bytes: bytes arrive in whole pieces, so a rate counted from the first piece
(bytes / microseconds) made the first seconds show absurd rates and ETAs.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from streamer.errors import Hint, Note, api_words, with_hints

log = logging.getLogger("streamer")

STAGES = ("read", "quantize", "upload")
WINDOW_S = 20.0  # rates cover about the last 20 s: recent enough to follow the link, long enough to be calm
STEADY_S = 3.0  # an ETA is worth showing only after this long and two advances (see ProgressEvent.steady)


@dataclass(frozen=True)
class ProgressEvent:
    """One stage's numbers at one moment (or, with stage "log", a message for people)."""

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
    unrated: int = 0  # bytes done that say nothing of the rate (read before the stage ran)
    # (time, done) points, oldest first; the first is the rate's anchor, at least WINDOW_S old
    # once the run is that long, and never the newest point, so a rate always spans one advance
    samples: deque = field(default_factory=deque)

    def begin(self, now: float) -> None:
        if self.since is None:
            self.since = now
            self.samples.append((now, 0))

    def record(self, now: float, n: int, rated: bool = True) -> None:
        if self.started is None:
            self.started = now
        self.done += n
        self.advances += 1
        if not rated:  # shift the window with it: the rate compares the bytes that were rated
            self.unrated += n
            self.samples = deque((t, d + n) for t, d in self.samples)
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
            return (self.done - self.unrated) / elapsed if elapsed > 0 else 0.0
        self._trim(now)
        t, done = self.samples[0] if self.samples else (now, self.done)
        return (self.done - done) / (now - t) if now > t else 0.0

    def steady(self, now: float) -> bool:
        if self.finished is not None:
            return True
        return self.advances >= 2 and now - self.since >= STEADY_S


@dataclass
class Progress:
    """The counts of one run, per stage (`STAGES`); every change is sent to each of `listeners`
    as a ProgressEvent. Thread-safe: the pipeline's workers report into it concurrently."""

    listeners: list[Callable[[ProgressEvent], None]] = field(default_factory=list)
    # how the front end words a hint (a flag, a form field, a parameter), for `note`
    hint_words: Callable[[Hint], str] = api_words

    def __post_init__(self):
        self._lock = threading.Lock()
        self._counters = {s: _Counter() for s in STAGES}
        self.t0 = time.monotonic()

    def set_total(self, stage: str, total: int) -> None:
        """The bytes STAGE will move in all (TOTAL); the stage's rate counts from now.

        :param stage: one of STAGES.
        :param total: bytes expected."""
        with self._lock:
            c = self._counters[stage]
            c.total = total
            c.begin(time.monotonic())
        self._emit(stage)

    def advance(self, stage: str, n: int, *, rated: bool = True) -> None:
        """N more bytes done in STAGE.

        :param stage: one of STAGES.
        :param n: bytes just done.
        :param rated: False for bytes that were done before and are only handed over now (a
            start-up reader's bytes): they count as done, but not in the rate or the ETA."""
        now = time.monotonic()
        with self._lock:
            c = self._counters[stage]
            c.begin(self.t0)  # no total was set: the rate counts from the Progress's creation
            c.record(now, n, rated)
        self._emit(stage)

    def message(self, text: str) -> None:
        """Log TEXT (logger "streamer", INFO) and send it to the listeners as a "log" event.

        :param text: a line for people."""
        log.info(text)
        for fn in list(self.listeners):
            fn(ProgressEvent("log", message=text))

    def note(self, note: Note) -> None:
        """Log NOTE, its hints in this front end's words (`hint_words`), as `message` does.

        :param note: a sentence for people, with hints."""
        self.message(with_hints(note.message, note.hints, self.hint_words))

    def snapshot(self, stage: str) -> ProgressEvent:
        """STAGE's numbers now: done, total, the windowed rate and the ETA.

        :param stage: one of STAGES."""
        now = time.monotonic()
        with self._lock:
            c = self._counters[stage]
            rate = c.rate(now)
            eta = (c.total - c.done) / rate if rate > 0 and c.total > c.done else None
            return ProgressEvent(stage, c.done, c.total, rate, eta, steady=c.steady(now))

    def stage_seconds(self) -> dict[str, float]:
        """Seconds each stage has taken, from its first bytes to its last (or to now)."""
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

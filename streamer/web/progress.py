"""The live progress panel: a bar per stage (read, quantized, uploaded) with bytes, rate and ETA."""

from __future__ import annotations

import html
from collections import deque

from streamer.engine.progress import STAGES, ProgressEvent
from streamer.formats import human_bytes

STAGE_LABELS = {"read": "Read", "quantize": "Quantized", "upload": "Uploaded"}


def duration(seconds: float | None) -> str:
    """SECONDS in words for the panel ("2 min 05 s"); "–" for None (not known).

    seconds: a duration, or None."""
    if seconds is None:
        return "–"
    if seconds < 1:
        return "<1 s"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


# the states in which a run is moving: only then are rates and ETAs shown
RUNNING = ("Starting", "Converting")


class RateWindow:
    """Per-stage rates over the last WINDOW seconds, from samples taken at each page refresh.

    A rate from the first burst (one piece landing at once) read 49–92 MB/s on a 12 MB/s link; a
    window of several seconds, shown only once it spans MIN_SPAN, follows what the link does, and
    decays when a transfer stalls instead of keeping an old average."""

    WINDOW = 10.0
    MIN_SPAN = 2.0

    def __init__(self):
        self.samples: dict[str, deque] = {}

    def add(self, now: float, stages: dict[str, ProgressEvent]) -> None:
        """Take a sample of each stage's bytes done.

        now: the time (time.monotonic()).
        stages: the last event of each stage."""
        for stage, ev in stages.items():
            q = self.samples.setdefault(stage, deque())
            q.append((now, ev.done))
            while len(q) > 2 and now - q[1][0] >= self.WINDOW:
                q.popleft()

    def rates(self, now: float) -> dict[str, float]:
        """Bytes per second of each stage over the window, for the stages sampled long enough.

        now: the time (time.monotonic())."""
        out = {}
        for stage, q in self.samples.items():
            if q and now - q[0][0] >= self.MIN_SPAN:
                out[stage] = (q[-1][1] - q[0][1]) / (now - q[0][0])
        return out


def progress_html(stages: dict[str, ProgressEvent], elapsed: float, state: str,
                  rates: dict[str, float] | None = None) -> str:  # fmt: skip
    """Three bars (read, quantized, uploaded) with bytes, rate and ETA.

    RATES come from a RateWindow (bytes/s over the last seconds). Rates and ETAs are shown only
    while the run is moving: once it is cancelling, cancelled or failed they would be stale
    promises.

    stages: the last event of each stage.
    elapsed: seconds since the run started.
    state: Idle, Queued, Starting, Converting, Cancelling, Cancelled, Done or Failed.
    rates: bytes/s by stage (None: none known yet).
    """
    rows, left = [], []
    live = state in RUNNING
    for stage in STAGES:
        ev = stages.get(stage) or ProgressEvent(stage)
        frac = min(1.0, ev.done / ev.total) if ev.total else 0.0
        nums = f"{human_bytes(ev.done)} / {human_bytes(ev.total)}" if ev.total else "waiting"
        rate = (rates or {}).get(stage, 0.0) if live else 0.0
        if ev.total and ev.done >= ev.total:
            eta = "done"
        elif rate:
            seconds = (ev.total - ev.done) / rate
            left.append(seconds)
            eta = f"ETA {duration(seconds)}"
        else:
            eta = "ETA –" if live else "–"
            if ev.total:
                left.append(None)  # a stage with no rate yet: no honest overall estimate
        rows.append(
            f'<div class="sp-row" data-stage="{stage}"><span class="sp-label">{STAGE_LABELS[stage]}</span>'
            f'<div class="sp-bar"><div class="sp-fill" style="width:{frac * 100:.1f}%"></div></div>'
            f'<span class="sp-nums">{nums}</span><span class="sp-rate">{human_bytes(rate) + "/s" if rate else "–"}</span>'
            f'<span class="sp-eta">{eta}</span></div>'
        )
    if state == "Idle":
        head = "Idle: nothing is converting. Fill in the form and click <b>Convert and publish</b>."
    elif state == "Queued":
        head = "Queued: waiting for a free conversion slot (your place in the queue is shown on the right)."
    else:
        head = f"{html.escape(state)}{'…' if state == 'Cancelling' else ''} · elapsed {duration(elapsed)}"
    if state == "Converting" and left and None not in left:
        head += f" · about {duration(max(left))} left"
    return f'<div class="streamer-progress" data-state="{state}"><div class="sp-head">{head}</div>{"".join(rows)}</div>'

"""What every command shares on the terminal: log lines printed above the progress bars (never
through them), the three bars themselves, the logging setup, and sizes read from flags.

Only the command line uses these: the engine reports into a `streamer.engine.progress.Progress`,
and this module draws it.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time

from streamer.engine.progress import STAGES, Progress, ProgressEvent
from streamer.formats import human_bytes, human_duration, parse_size


def size_arg(text: str) -> int:
    """`parse_size` for argparse: a size flag's value (`8GB`, `512MiB`) in bytes; a bad one is
    refused with parse_size's sentence as the usage error.

    :param text: the flag's value."""
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def count_arg(text: str) -> int:
    """A count flag's value (`--workers 4`) for argparse: a whole number of at least 1, else a
    usage error saying so.

    :param text: the flag's value."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n}: give at least 1")
    return n


def setup_logging(quiet: bool, verbose: bool, json: bool = False) -> None:
    """Log lines on stderr, printed above the progress bars, never through them; huggingface_hub's
    own bars are turned off (streamer reports the bytes itself).

    :param quiet: errors only.
    :param verbose: debug lines too, and every HTTP request.
    :param json: warnings and errors only (stdout carries the JSON alone)."""
    shown = logging.ERROR if quiet else logging.DEBUG if verbose else logging.WARNING if json else logging.INFO
    install_terminal_logging(shown)
    # --quiet filters at the handler: warnings still exist as records for a host's own handlers
    logging.getLogger("streamer").setLevel(min(shown, logging.WARNING))
    if not verbose:  # one line per HTTP request drowns the events that matter
        for noisy in ("httpx", "httpx2", "httpcore", "httpcore2", "huggingface_hub"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    hide_hub_bars()



class TerminalLogHandler(logging.Handler):
    """Log records as whole lines on stderr, above the progress bars.

    tqdm.write takes the bars' lock, clears them, prints the line and redraws them, so a line
    is never cut by a bar being redrawn from another thread. Without bars it is a plain write.
    """

    def emit(self, record: logging.LogRecord) -> None:
        """Print RECORD, formatted, as one line on the current sys.stderr."""
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
    """Route log records and Python warnings to stderr through TerminalLogHandler. Leaves a root
    logger that someone else configured alone (as logging.basicConfig does), and replaces its own
    handler when called again. True if installed.

    :param level: the lowest level printed."""
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
    """`1.20 GB / 9.08 GB · 12.3 MB/s · ETA 10:41`: the numbers a bar shows beside it; no ETA
    until the estimate is steady.

    :param event: the stage's numbers."""
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

    :param progress: the run's Progress (None: the bars move only on events).
    :param upload_label: the third bar's name ("uploaded" for the Hub, "written" for a folder).
    :param refresh_s: seconds between redraws on the clock.
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
        """Show EVENT (a listener of Progress); log events are left to logging."""
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

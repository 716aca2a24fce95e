"""Bandwidth limits shared by all connections, like one network link per direction."""

from __future__ import annotations

import threading
import time

MAX_CHUNK = 1024 * 1024


class TokenBucket:
    """Paces bytes at `rate` bytes/s in aggregate across threads.

    Each caller reserves the next free slot on a shared timeline and sleeps until it is due, so
    concurrent transfers share the rate fairly and the total never exceeds it. Idle time
    builds up credit of at most `burst` bytes, so a fresh transfer starts without a delay but
    a long one still averages the rate.
    """

    def __init__(self, rate: float, burst: float | None = None):
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = float(rate)
        self.burst = float(burst if burst is not None else min(rate * 0.05, MAX_CHUNK))
        self._lock = threading.Lock()
        self._next_free = time.monotonic()

    @property
    def chunk_size(self) -> int:
        # Small enough that pacing is smooth (~20 ms per chunk), large enough to stay cheap.
        return int(max(16 * 1024, min(MAX_CHUNK, self.rate / 50)))

    def consume(self, nbytes: int) -> None:
        with self._lock:
            now = time.monotonic()
            start = max(self._next_free, now - self.burst / self.rate)
            self._next_free = start + nbytes / self.rate
            wait = self._next_free - now
        if wait > 0:
            time.sleep(wait)


class Throttle:
    """The two directions; either may be None (unlimited). Swapped atomically by `set`."""

    def __init__(self) -> None:
        self.down: TokenBucket | None = None
        self.up: TokenBucket | None = None

    def set(self, down_bytes_per_s: float | None = None, up_bytes_per_s: float | None = None) -> None:
        self.down = TokenBucket(down_bytes_per_s) if down_bytes_per_s else None
        self.up = TokenBucket(up_bytes_per_s) if up_bytes_per_s else None

"""Bandwidth limits, like one network link per direction: shared by all connections, or one link
per client address (each machine of a cluster has its own link to the Hub)."""

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
    """The two directions; either may be None (unlimited). Swapped atomically by `set`.

    With `per_client`, each client address (127.0.0.2, 127.0.0.3 … for the nodes of a local
    cluster) gets its own pair of buckets at the same rates: N clients have N links.
    """

    def __init__(self) -> None:
        self.down: TokenBucket | None = None
        self.up: TokenBucket | None = None
        self.per_client = False
        self._clients: dict[tuple[str, str], TokenBucket] = {}
        self._lock = threading.Lock()

    def set(self, down_bytes_per_s: float | None = None, up_bytes_per_s: float | None = None, *,
            per_client: bool = False) -> None:
        with self._lock:
            self.down = TokenBucket(down_bytes_per_s) if down_bytes_per_s else None
            self.up = TokenBucket(up_bytes_per_s) if up_bytes_per_s else None
            self.per_client = per_client
            self._clients = {}

    def bucket(self, direction: str, client: str | None) -> TokenBucket | None:
        """The bucket paying for DIRECTION ("down": response bodies, "up": request bodies) of CLIENT."""
        shared = self.down if direction == "down" else self.up
        if shared is None or not self.per_client or client is None:
            return shared
        with self._lock:
            key = (direction, client)
            if key not in self._clients:
                self._clients[key] = TokenBucket(shared.rate, shared.burst)
            return self._clients[key]

    def links(self, direction: str) -> list[str]:
        """The client links that have their own DIRECTION bucket so far (per_client only)."""
        with self._lock:
            return sorted(link for d, link in self._clients if d == direction)

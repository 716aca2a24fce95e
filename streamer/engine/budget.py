"""The byte budget every stage that holds model bytes in memory draws from (`max_memory`)."""

from __future__ import annotations

import os
import threading

from streamer.errors import Hint, StreamerError
from streamer.formats import parse_size


class Budget:
    """A byte semaphore: acquire before allocating, release when the bytes are gone."""

    def __init__(self, limit: int | str):
        # 0 or a fraction of a byte used to fall back to the default budget without a word;
        # a budget that holds nothing is a mistake to report, not to reinterpret.
        """limit: the bytes the budget holds (a whole number, at least 1), or a size such as
        "8GB" or "512MiB" (the command line's --max-memory)."""
        if isinstance(limit, str):
            try:
                limit = parse_size(limit)
            except ValueError as e:
                raise StreamerError(f"the memory budget: {e}", hints=(Hint("max_memory"),)) from None
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise StreamerError(
                f"the memory budget must be a whole number of bytes (or a size such as 8GB), at least 1; got {limit!r}",
                hints=(Hint("max_memory"),),
            )
        self.limit = limit
        self.used = 0
        self.peak = 0
        self._cv = threading.Condition()

    def _fits(self, n: int) -> bool:
        # A request larger than the whole budget waits for an empty budget, then runs alone.
        return self.used + n <= self.limit or self.used == 0

    def try_acquire(self, n: int) -> bool:
        """Take N bytes if they fit now; whether they were taken."""
        with self._cv:
            if not self._fits(n):
                return False
            self._take(n)
            return True

    def acquire(self, n: int, *, force: bool = False) -> None:
        """Wait until N bytes fit. FORCE takes them at once: a runner that holds an unfinished
        shard must be able to finish it, or two runners sharing a budget could wait on each
        other forever; the overshoot is at most one piece per runner."""
        with self._cv:
            while not force and not self._fits(n):
                self._cv.wait()
            self._take(n)

    def _take(self, n: int) -> None:
        self.used += n
        self.peak = max(self.peak, self.used)

    def release(self, n: int) -> None:
        """Give N bytes back, waking those waiting for them."""
        with self._cv:
            self.used -= n
            self._cv.notify_all()


def available_memory() -> int:
    """Bytes that can be allocated without swapping: free memory plus the page cache the kernel
    would drop (MemAvailable). Free pages alone are far less on any machine that has read files."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 8 * 1024**3


def default_memory_budget() -> int:
    """Half the memory available now, at least 1 GB: room for the OS, Python and torch."""
    return max(available_memory() // 2, 1 << 30)

"""One read, many outputs: a source read once for several conversions of it (fan-out).

Each target keeps its own plan, its own Runner, its own sink and commit; what they share is the
source. Every target reads through a `SharedSource`, a view of one `SharedReader`. Before its
first read, each target's runner says which tensors it will read (`Source.will_read`); the reader
waits until every target has said so, then fetches each tensor once, hands the bytes to the target
that asked, and keeps a copy for the targets that have not read it yet. A copy is dropped as soon
as the last of them has taken it.

Targets walk the source in nearly the same order (source shards in order, offsets ascending), so
the copies held are few. To keep it so when one target runs ahead (a cheap scheme beside an
expensive one), a target that would fetch new bytes while the copies exceed the reader's share
of the memory budget waits for the others to catch up, unless it is itself behind on some copy
(it must never wait for itself). Memory is the budget split in one share for the copies and one
per target (see `split_budget`), so no target can starve another.
"""

from __future__ import annotations

import bisect
import threading
import time
from dataclasses import dataclass, field

from streamer.engine.progress import Progress
from streamer.errors import Cancelled
from streamer.io.source import Source, Span

Key = tuple[str, int, int]  # (file, start, end): TensorInfo.key

# A leader waits for the others at most this long without any of them taking a copy; past it, it
# goes on rather than risk waiting for ever. The targets it waits for never wait themselves (they
# owe copies), so this is a safety net: long enough that a slow target quantizing one large
# piece on a CPU does not trip it, since each trip lets the copies grow past the limit.
STALL_S = 60.0
# The reader's share of the budget for copies kept for slower targets.
CACHE_SHARE = 0.25


def split_budget(limit: int, targets: int) -> tuple[int, int]:
    """(bytes for the copies kept for slower targets, bytes for each target's runner) of a
    budget of LIMIT bytes shared by TARGETS conversions."""
    if targets <= 1:
        return 0, limit
    cache = int(limit * CACHE_SHARE)
    return cache, max((limit - cache) // targets, 1)


@dataclass
class _Entry:
    """One stored tensor's bytes: who still has to read them, and the copy kept for them."""

    claims: set[int] = field(default_factory=set)  # targets that will still read it
    data: bytearray | None = None  # the copy, once some target has fetched it
    fetching: threading.Event | None = None  # set when the target fetching it is done


class SharedReader:
    """Reads SOURCE once for TARGETS conversions (see the module's docstring).

    source: the checkpoint all targets convert; targets: how many runners will read through
    `view`s; cache_limit: bytes of copies held before a target running ahead waits for the
    others; cancel: stops waits and transfers; progress: where the bytes read are counted (once,
    whichever target asked for them).
    """

    def __init__(self, source: Source, *, targets: int, cache_limit: int, cancel: threading.Event, progress: Progress):
        self.source = source
        self.cache_limit = cache_limit
        self.cancel = cancel
        self.progress = progress
        self._cv = threading.Condition()
        self._entries: dict[Key, _Entry] = {}
        self._index: dict[str, list[Key]] = {}  # file -> keys sorted by start (when all have said)
        self._starts: dict[str, list[int]] = {}
        self._pending = set(range(targets))  # targets that have not said what they will read
        self._owed = [0] * targets  # per target: how many kept copies it has still to take
        self._small: dict[str, bytes] = {}  # small files (config, tokenizer, card), read once
        self._last_take = time.monotonic()
        self.held = 0  # bytes of copies held now
        self.peak = 0
        self.fetched = 0  # bytes read from the source: each tensor once (the fan-out's point)
        self.served = 0  # bytes handed out from copies instead of read again
        source.cancel = cancel

    def _arrived(self, n: int, *, rated: bool = True) -> None:
        self.progress.advance("read", n, rated=rated)

    def view(self, target: int) -> SharedSource:
        """The Source target number TARGET (0 …) reads through."""
        return SharedSource(self, target)

    def preload(self, paths: list[str]) -> None:
        """Read the small files PATHS (config, tokenizer, model card …) now, once for all targets:
        before the runs, so they are not counted as tensor bytes read."""
        for path in paths:
            if path not in self._small and path in self.source.files():
                self._small[path] = bytes(self.source.read_file(path))

    def read_file(self, path: str) -> bytes:
        """The small file PATH, read once for all targets."""
        data = self._small.get(path)
        if data is None:
            data = self._small[path] = bytes(self.source.read_file(path))
        return data

    # -- who reads what --------------------------------------------------------------------

    def register(self, target: int, pieces: list) -> None:
        """Target TARGET will read the tensors of PIECES (lists of TensorInfo)."""
        with self._cv:
            for piece in pieces:
                for t in piece:
                    self._entries.setdefault(t.key, _Entry()).claims.add(target)
            self._said(target)

    def retire(self, target: int) -> None:
        """Target TARGET reads nothing more (it finished, failed or was cancelled): its claims
        on copies are dropped, so no copy waits for it."""
        with self._cv:
            for key, entry in list(self._entries.items()):
                if target in entry.claims:
                    self._take(key, entry, target)
            self._said(target)

    def _said(self, target: int) -> None:
        if target not in self._pending:
            return
        self._pending.discard(target)
        if not self._pending:  # everyone has said: index the tensors for lookups by byte range
            by_file: dict[str, list[Key]] = {}
            for key in self._entries:
                by_file.setdefault(key[0], []).append(key)
            self._index = {f: sorted(keys, key=lambda k: (k[1], k[2])) for f, keys in by_file.items()}
            self._starts = {f: [k[1] for k in keys] for f, keys in self._index.items()}
            total = sum(k[2] - k[1] for k in self._entries)
            self.progress.set_total("read", total)
            if self.source.reports_bytes:  # tensor bytes are counted as they arrive, once for all
                self.source.on_bytes = self._arrived
        self._cv.notify_all()

    def _take(self, key: Key, entry: _Entry, target: int) -> None:
        """TARGET has its bytes of KEY: drop its claim, and the copy once nobody else needs it."""
        if target in entry.claims and entry.data is not None:
            self._owed[target] -= 1
        entry.claims.discard(target)
        if entry.claims or entry.fetching is not None:
            return
        if entry.data is not None:
            self.held -= len(entry.data)
            self._last_take = time.monotonic()
        del self._entries[key]
        self._cv.notify_all()

    # -- reading ---------------------------------------------------------------------------

    def _wait(self, ready) -> None:
        """Wait (under the lock) until READY() holds; a cancel ends the wait."""
        while not ready():
            if self.cancel.is_set():
                raise Cancelled()
            self._cv.wait(0.1)

    def _behind(self, target: int) -> bool:
        return self._owed[target] > 0

    def _throttle(self, target: int) -> None:
        """A target running ahead waits while the copies kept for the others exceed the limit."""

        def room() -> bool:
            return (
                self.held <= self.cache_limit
                or self._behind(target)
                or time.monotonic() - self._last_take > STALL_S
            )

        self._wait(room)

    def _within(self, path: str, span: Span) -> list[Key]:
        keys = self._index.get(path, [])
        i = bisect.bisect_left(self._starts.get(path, []), span.start)
        out = []
        while i < len(keys) and keys[i][1] < span.end:
            if keys[i][2] <= span.end:
                out.append(keys[i])
            i += 1
        return out

    def read_spans_into(self, target: int, path: str, spans: list[Span], outs: list[memoryview]) -> None:
        """Fill OUTS with SPANS of PATH for TARGET: tensors another target fetched come from their
        copies, tensors another is fetching now are waited for, the rest is read from the source
        (once: a copy is kept when other targets will read it too)."""
        with self._cv:
            self._wait(lambda: not self._pending)
            self._throttle(target)
            runs: list[tuple[Span, memoryview]] = []  # bytes this call reads from the source
            mine: list[tuple[Key, memoryview]] = []  # tensors this call fetches
            copies: list[tuple[bytearray, memoryview]] = []
            waits: list[tuple[Key, memoryview]] = []
            for span, out in zip(spans, outs):
                pos = span.start  # bytes before pos are accounted for
                run_start = span.start  # where the run of bytes to read from the source began
                for key in self._within(path, span):
                    _, start, end = key
                    if start < pos:  # overlaps bytes already accounted for
                        continue
                    entry = self._entries.get(key)  # None: nobody else needs it any more
                    dst = out[start - span.start : end - span.start]
                    if entry is None or (entry.data is None and entry.fetching is None):
                        if entry is not None:
                            entry.fetching = threading.Event()
                            mine.append((key, dst))
                        pos = end  # read with the run
                        continue
                    if start > run_start:
                        runs.append((Span(run_start, start), out[run_start - span.start : start - span.start]))
                    if entry.data is not None:
                        copies.append((entry.data, dst))
                        self.served += end - start
                        self._take(key, entry, target)
                    else:
                        waits.append((key, dst))
                    pos = run_start = end
                if span.end > run_start:
                    runs.append((Span(run_start, span.end), out[run_start - span.start :]))
        for data, dst in copies:  # outside the lock: copying a large tensor blocks nobody
            dst[:] = data
        try:
            if runs:
                self.source.read_spans_into(path, [s for s, _ in runs], [o for _, o in runs])
        except BaseException:
            with self._cv:
                for key, _ in mine:
                    self._fetched(key, None, target)
            raise
        n = sum(s.size for s, _ in runs)
        with self._cv:
            self.fetched += n
        if not self.source.reports_bytes:
            self.progress.advance("read", n)
        for key, dst in mine:
            self._keep(key, dst, target)
        for key, dst in waits:
            self._wait_for(key, dst, target, path)

    def _keep(self, key: Key, dst: memoryview, target: int) -> None:
        """KEY was fetched into DST for TARGET: keep a copy for the targets still to read it."""
        with self._cv:
            others = self._entries[key].claims - {target}
        copy = bytearray(dst) if others else None  # copied outside the lock
        with self._cv:
            self._fetched(key, copy, target)

    def _fetched(self, key: Key, copy: bytearray | None, target: int) -> None:
        """KEY's fetch by TARGET ended: COPY kept for the targets still to read it (None after a
        failed fetch: the next target to ask fetches it again)."""
        entry = self._entries[key]
        done, entry.fetching = entry.fetching, None
        entry.claims.discard(target)
        if not entry.claims:
            del self._entries[key]
        elif copy is not None:
            entry.data = copy
            for t in entry.claims:
                self._owed[t] += 1
            self.held += len(copy)
            self.peak = max(self.peak, self.held)
        done.set()
        self._cv.notify_all()

    def _wait_for(self, key: Key, dst: memoryview, target: int, path: str) -> None:
        """KEY is being fetched by another target: take its copy once it is there (or fetch it
        again, when that fetch failed or nobody kept a copy)."""
        with self._cv:
            self._wait(lambda: key not in self._entries or self._entries[key].fetching is None)
            entry = self._entries.get(key)
            data = entry.data if entry is not None else None
            if data is not None:
                self.served += len(data)
                self._take(key, entry, target)
        if data is not None:
            dst[:] = data
            return
        self.read_spans_into(target, path, [Span(key[1], key[2])], [dst])


class SharedSource(Source):
    """What one target of a fan-out reads: its view of a `SharedReader`."""

    reports_bytes = True  # the shared reader counts bytes read, once for all targets

    def __init__(self, reader: SharedReader, target: int):
        """reader: the SharedReader all targets read through; target: this view's number."""
        self.reader = reader
        self.target = target
        inner = reader.source
        self.label, self.repo_id, self.commit = inner.label, inner.repo_id, inner.commit
        self.private, self.gated = inner.private, inner.gated

    @property
    def held_bytes(self) -> int:
        """A start-up reader's bytes are reserved once, in the first target's budget."""
        return self.reader.source.held_bytes if self.target == 0 else 0

    def files(self) -> dict[str, int]:
        """The source's files."""
        return self.reader.source.files()

    def will_read(self, pieces: list) -> None:
        """Tell the shared reader which tensors this target reads."""
        self.reader.register(self.target, pieces)

    def read_into(self, path: str, span: Span, out: memoryview) -> None:
        """Bytes SPAN of PATH, through the shared reader."""
        self.reader.read_spans_into(self.target, path, [span], [out])

    def read_spans_into(self, path: str, spans: list[Span], outs: list[memoryview]) -> None:
        """Several ranges of PATH, through the shared reader."""
        self.reader.read_spans_into(self.target, path, spans, outs)

    def read_file(self, path: str) -> bytes:
        """A small file, read once for all targets."""
        return self.reader.read_file(path)

    def close(self) -> None:
        """This target reads nothing more; the source itself is closed by whoever opened it."""
        self.reader.retire(self.target)


class TargetProgress(Progress):
    """One target's progress in a fan-out: counted for the target's own statistics and added
    into PARENT, the run's, where the bars and the Space look. Bytes read are the shared
    reader's (counted once), so this target's own "read" does not reach PARENT."""

    def __init__(self, parent: Progress, label: str, totals: dict, lock: threading.Lock):
        """parent: the whole run's Progress; label: the target, prefixed to its log lines;
        totals, lock: the per-stage totals every target of the run adds into (shared)."""
        super().__init__(hint_words=parent.hint_words)
        self.parent = parent
        self.label = label
        self._mine: dict[str, int] = {}
        self._sum = totals
        self._sum_lock = lock

    def set_total(self, stage: str, total: int) -> None:
        """TOTAL for STAGE, for this target; the parent's total grows by the difference."""
        super().set_total(stage, total)
        if stage == "read":
            return
        with self._sum_lock:
            self._sum[stage] = self._sum.get(stage, 0) + total - self._mine.get(stage, 0)
            self._mine[stage] = total
            whole = self._sum[stage]
        self.parent.set_total(stage, whole)

    def advance(self, stage: str, n: int, *, rated: bool = True) -> None:
        """N more bytes in STAGE for this target, and for the run."""
        super().advance(stage, n, rated=rated)
        if stage != "read":
            self.parent.advance(stage, n, rated=rated)

    def message(self, text: str) -> None:
        """A log line of this target, named as such, in the run's log."""
        self.parent.message(f"{self.label}: {text}")

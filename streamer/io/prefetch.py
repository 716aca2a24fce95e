"""Fast start for a Hub source: a reader process fetches the source's bytes while the engine is
still importing torch and compressed-tensors (seconds before the first byte would be read).

    reader = start("org/model", "main", token=None, limit=4 << 30)  # before importing the engine
    ...                                                             # HubSource claims it (`claim`)
    reader.close()                                                  # after the run, however it ends

The reader (`python -m streamer.io.prefetch`, started by `start`) imports nothing of
huggingface_hub: its parent builds the request headers while the reader's interpreter starts.
It resolves the revision to a commit while it asks for the index and config.json at the
revision's name (kept when the Hub answered from that same commit), reads the first bytes of
every shard (its safetensors header), then the shards' bytes in file order (the order the
pipeline reads them in), 16 MB per request on 8 connections. It speaks HTTP with the standard
library's http.client, which reads a body straight into memory: a fifth of the CPU time of
huggingface_hub's httpx session, whose time would be taken from the engine's imports on a small
machine. (Behind a proxy it does not run.) What it reads lands in one anonymous shared memory
file (memfd) its parent created, at most LIMIT bytes; it reports on its stdout what it received,
every megabyte. (After an interrupted upload it reads only the headers: the rerun skips the
shards already uploaded, which only the plan knows.)

HubSource claims the reader when it opens the same repo and revision, reads at exactly the
reader's commit, and asks it for every range first (`Prefetch.serve`): bytes the reader holds are
copied out once and their memory is freed; the rest is read over HTTP as before. The first range
the reader does not hold ends it (SIGKILL: what it reported of its requests in flight is kept),
so the two never compete for the link.

Nothing outlives the run: the memfd has no name under /dev/shm and the kernel frees it with the
last process that holds it; the reader exits when its stdin closes, which happens when its parent
exits however it ends (an error, Ctrl-C, SIGKILL). The token reaches the reader on its stdin (in
the headers), never in its argv. A reader that fails (no network, no access, a server without
range support) costs nothing but its head start: its bytes are then read over HTTP, and its
errors are only logged at debug level.
"""

from __future__ import annotations

import bisect
import json
import logging
import mmap
import os
import select
import signal
import sys
import threading
import time
from pathlib import Path
from urllib.parse import quote, urlsplit

from streamer.errors import redact
from streamer.io.source import Span

log = logging.getLogger("streamer")

CHUNK_BYTES = 16 * 1024 * 1024  # one range request of the reader
# The most asked of the index or config.json before the file list gives their sizes (real
# ones are tens of kB; a larger one is read again once its size is known).
SMALL_BYTES = 4 * 1024 * 1024
CONNECTIONS = 8  # range requests the reader has in flight
# The first request to each shard: enough for the safetensors header of any real shard (tens of
# kB); a longer header is read in a second request before any tensor bytes.
HEAD_BYTES = 64 * 1024
PAGE = mmap.PAGESIZE
REPORT_BYTES = 1024 * 1024  # the reader reports what it received in steps of this size
COMMIT_WAIT = 10.0  # seconds HubSource waits for the reader's commit before going on without it
TIMEOUT = 30.0  # seconds a connection of the reader may stay silent
REDIRECTS = (301, 302, 303, 307, 308)
ENABLE_VARIABLE = "STREAMER_PREFETCH"  # "0" turns the reader off


def available() -> bool:
    """Whether this platform has what the reader needs (Linux: memfd, MADV_REMOVE, select on pipes)."""
    return hasattr(os, "memfd_create") and hasattr(mmap, "MADV_REMOVE")


# --- the parent's side ----------------------------------------------------------------------------

_started: list["Prefetch"] = []  # readers started by this process and not claimed yet
_started_lock = threading.Lock()


def start(repo_id: str, revision: str | None, *, token: str | bool | None, limit: int) -> "Prefetch | None":
    """A reader for the Hub repo REPO_ID at REVISION (None: main), or None where it cannot help:
    where the platform lacks memfd (`available`), when the environment variable STREAMER_PREFETCH
    is "0", and in a process that has imported torch already (the reader's head start is the time
    the engine's imports take).

    TOKEN: the Hub token (None: huggingface_hub's default, False: none). LIMIT: the most bytes the
    reader holds at once.
    """
    if os.environ.get(ENABLE_VARIABLE, "1") == "0" or "torch" in sys.modules or not available():
        return None
    return Prefetch.launch(repo_id, revision, token=token, limit=limit)


def claim(repo_id: str, revision: str | None, endpoint: str) -> "Prefetch | None":
    """The reader started for REPO_ID at REVISION (as the user named it) on the Hub at ENDPOINT,
    once its commit is known; None when there is none, or it could not resolve the revision.
    A reader is claimed once: the caller reads at its `commit`, and asks its `serve` first."""
    with _started_lock:
        found = next((r for r in _started if (r.repo_id, r.revision) == (repo_id, revision)), None)
        if found is None:
            return None
        _started.remove(found)
    if found.wait_commit(COMMIT_WAIT) and found.endpoint == endpoint.rstrip("/"):
        return found
    found.close()
    return None


def _reader_config(repo_id: str, revision: str | None, token: str | bool | None, fd: int, limit: int) -> dict | None:
    """What the reader is told on its stdin: the repo, the Hub, the request headers (the token's
    among them), whether an interrupted upload is being resumed, and its memory. None where the
    reader cannot help: behind a proxy (it speaks to the Hub directly only), or when the token
    cannot be built (the run itself then says why)."""
    from urllib.request import getproxies, proxy_bypass

    from huggingface_hub import constants
    from huggingface_hub.utils import build_hf_headers

    endpoint = constants.ENDPOINT.rstrip("/")
    parts = urlsplit(endpoint)
    if parts.scheme in getproxies() and not proxy_bypass(parts.hostname or ""):
        return None
    try:
        headers = build_hf_headers(token=token, user_agent={"streamer": "prefetch"})
    except Exception as e:  # no stored token where one was required, a bad token: the run says so
        log.debug("prefetch of %s: %s", repo_id, type(e).__name__)
        return None
    # The resume records of interrupted uploads (streamer.io.upload_journal, not imported: it
    # costs a third of a second). A rerun reads only the shards not uploaded yet, which only the
    # plan knows: the reader then reads the headers alone.
    resuming = any((Path(constants.HF_HOME) / "streamer" / "uploads").glob("*.json"))
    return {"repo_id": repo_id, "revision": revision, "endpoint": endpoint, "headers": headers,
            "resuming": resuming, "fd": fd, "limit": limit}  # fmt: skip


class Prefetch:
    """The parent's handle on one reader process: what it holds, and the memory it holds it in."""

    def __init__(self, repo_id: str, revision: str | None, proc, fd: int, limit: int):
        self.repo_id = repo_id
        self.revision = revision
        self.commit: str | None = None  # the commit the reader reads, once it said
        self.endpoint: str | None = None  # the Hub it reads from, once it said
        self.bytes_received = 0  # reported by the reader
        self.bytes_served = 0  # copied out to the run
        self.proc = proc
        self._fd = fd
        self._mm = mmap.mmap(fd, limit)
        self._out = proc.stdout.fileno()
        self._pending = b""
        self._running = True  # the reader may still report ranges
        self._closed = False
        # path -> sorted, disjoint [start, end, offset in the memfd]: received and not served yet
        self._held: dict[str, list[tuple[int, int, int]]] = {}
        self._lock = threading.Lock()

    @classmethod
    def launch(cls, repo_id: str, revision: str | None, *, token: str | bool | None, limit: int) -> "Prefetch | None":
        """Start a reader for REPO_ID at REVISION holding at most LIMIT bytes (see `start`); None
        where it cannot read directly (a proxy is configured, the token cannot be built)."""
        import subprocess

        limit = max(limit, PAGE)
        fd = os.memfd_create(f"streamer-prefetch-{os.getpid()}", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, limit)  # sparse: pages exist once the reader writes them
            proc = subprocess.Popen(
                [sys.executable, "-m", "streamer.io.prefetch"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                pass_fds=(fd,), bufsize=0,
            )  # fmt: skip
        except BaseException:
            os.close(fd)
            raise
        try:
            import fcntl

            # A report is a line per megabyte received; while the engine imports nobody reads
            # them, and a full pipe would stall the reader. 1 MB holds the reports of > 10 GB.
            fcntl.fcntl(proc.stdout.fileno(), fcntl.F_SETPIPE_SZ, 1 << 20)
        except (ImportError, AttributeError, OSError):
            pass
        try:
            reader = cls(repo_id, revision, proc, fd, limit)
        except BaseException:
            proc.kill()
            proc.wait()
            os.close(fd)
            raise
        try:
            # Built here, while the new interpreter starts, not in the reader: huggingface_hub's
            # token and header code costs a fifth of a second to import, which the engine's own
            # imports need anyway, and which the reader would spend before its first request.
            config = _reader_config(repo_id, revision, token, fd, limit)
            if config is not None:
                proc.stdin.write((json.dumps(config) + "\n").encode())  # the token: stdin, never argv
        except BaseException:
            reader.close()
            raise
        if config is None:
            reader.close()
            return None
        with _started_lock:
            _started.append(reader)
        return reader

    # -- the reader's reports -------------------------------------------------------------------

    def _pump(self, timeout: float) -> bool:
        """Take in what the reader reported, waiting up to TIMEOUT seconds for it; False when
        nothing came (or the reader has ended)."""
        if not self._running:
            return False
        ready, _, _ = select.select([self._out], [], [], timeout)
        if not ready:
            return False
        data = os.read(self._out, 1 << 16)
        if not data:
            self._running = False
            return False
        *lines, self._pending = (self._pending + data).split(b"\n")
        for line in lines:
            self._take_report(json.loads(line))
        return True

    def _take_report(self, report: dict) -> None:
        if "got" in report:
            path, start, end, offset = report["got"]
            held = self._held.setdefault(path, [])
            i = bisect.bisect(held, (start,))
            # A request's reports are adjacent in the file and in memory: one range grows.
            if i and held[i - 1][1] == start and held[i - 1][2] + start - held[i - 1][0] == offset:
                s, _, off = held[i - 1]
                held[i - 1] = (s, end, off)
            else:
                held.insert(i, (start, end, offset))
            self.bytes_received += end - start
        elif "commit" in report:
            self.commit, self.endpoint = report["commit"], report["endpoint"]
        elif "error" in report:
            log.debug("prefetch of %s: %s", self.repo_id, report["error"])

    def wait_commit(self, timeout: float) -> bool:
        """Wait up to TIMEOUT seconds for the reader to name the commit it reads; whether it did."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self.commit is None and self._running and time.monotonic() < deadline:
                self._pump(deadline - time.monotonic())
            return self.commit is not None

    def _stop(self) -> None:
        """End the reader now and take in its last reports. SIGKILL, not a request to stop: a
        range it reported is in memory, and whatever it did not report yet is simply read again."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        while self._pump(0):  # the reports still in the pipe (a cut-off last line is dropped)
            pass
        self._running = False
        for stream in (self.proc.stdin, self.proc.stdout):
            stream.close()

    # -- serving reads --------------------------------------------------------------------------

    def _take(self, path: str, start: int, end: int) -> tuple[list[tuple[int, int, int]], list[tuple[int, int]]]:
        """Remove the held parts of [START, END) of PATH from the table: (held parts as
        (start, end, offset), gaps as (start, end))."""
        parts, keep = [], []
        for s, e, off in self._held.get(path, ()):
            lo, hi = max(s, start), min(e, end)
            if lo >= hi:
                keep.append((s, e, off))
                continue
            parts.append((lo, hi, off + lo - s))
            if s < lo:
                keep.append((s, lo, off))
            if hi < e:
                keep.append((hi, e, off + hi - s))
        if path in self._held:
            self._held[path] = keep
        gaps, pos = [], start
        for lo, hi, _ in parts:
            if lo > pos:
                gaps.append((pos, lo))
            pos = hi
        if pos < end:
            gaps.append((pos, end))
        return parts, gaps

    def serve(self, path: str, spans: list[Span], outs: list[memoryview], on_bytes=None):
        """Copy into OUTS (one buffer per span, span.size bytes each) what the reader holds of
        SPANS of PATH, and free that memory: each byte is served once. Returns (spans, outs) still
        to read: the gaps, with the parts of OUTS they go to. ON_BYTES(n) is told the bytes
        served (with rated=False). The first gap stops the reader, which hands over what it received until then."""
        copies: list[tuple[memoryview, int, int]] = []  # (destination, memfd offset, bytes)
        gaps: list[tuple[Span, memoryview]] = []
        with self._lock:
            if self._closed:
                return spans, outs
            while self._pump(0):
                pass
            todo = []
            for span, out in zip(spans, outs):
                out = out.cast("B") if out.format != "B" else out
                parts, holes = self._take(path, span.start, span.end)
                copies += [(out[lo - span.start : hi - span.start], off, hi - lo) for lo, hi, off in parts]
                todo += [(span, out, lo, hi) for lo, hi in holes]
            if todo and self._running:
                self._stop()  # from here on the run reads the link alone
            for span, out, lo, hi in todo:
                parts, holes = self._take(path, lo, hi)
                copies += [(out[a - span.start : b - span.start], off, b - a) for a, b, off in parts]
                gaps += [(Span(a, b), out[a - span.start : b - span.start]) for a, b in holes]
            view = memoryview(self._mm)
            try:
                # Under the lock: close() must not unmap the memory while it is being copied.
                for dest, off, n in copies:
                    dest[:] = view[off : off + n]
                    self._free(off, n)
            finally:
                view.release()
            served = sum(n for _, _, n in copies)
            self.bytes_served += served
        if served and on_bytes is not None:
            on_bytes(served, rated=False)  # received while the engine imported: not the link's rate now
        return [s for s, _ in gaps], [o for _, o in gaps]

    def _free(self, offset: int, n: int) -> None:
        """Give the pages wholly inside [OFFSET, OFFSET + N) back to the system."""
        lo = -(-offset // PAGE) * PAGE
        hi = (offset + n) // PAGE * PAGE
        if hi > lo:
            self._mm.madvise(mmap.MADV_REMOVE, lo, hi - lo)

    @property
    def held_bytes(self) -> int:
        """At most how many bytes this holds now: the whole memory while the reader may still
        add to it, then what was received and not yet served."""
        with self._lock:
            if self._closed:
                return 0
            if self._running:
                return len(self._mm)
            return sum(e - s for ranges in self._held.values() for s, e, _ in ranges)

    def close(self) -> None:
        """Stop the reader and free its memory (idempotent)."""
        with _started_lock:
            if self in _started:
                _started.remove(self)
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if not self.proc.stdin.closed:
                self._stop()
            self._held.clear()
            self._mm.close()
            os.close(self._fd)


# --- the reader process -------------------------------------------------------------------------


class _Connections:
    """Keep-alive HTTP/1.1 connections (http.client), one per thread and host."""

    def __init__(self):
        self.local = threading.local()
        self.tls = None

    def _context(self):
        import ssl

        if self.tls is None:
            # httpx's trust store (certifi), unless the environment names one (as httpx honours).
            cafile = None
            if not (os.environ.get("SSL_CERT_FILE") or os.environ.get("SSL_CERT_DIR")):
                try:
                    import certifi

                    cafile = certifi.where()
                except ImportError:
                    pass
            self.tls = ssl.create_default_context(cafile=cafile)
        return self.tls

    def get(self, url: str, headers: dict):
        """The response to GET URL with HEADERS (its body not read yet)."""
        import http.client

        parts = urlsplit(url)
        conns = self.local.__dict__.setdefault("conns", {})
        key = (parts.scheme, parts.netloc)
        conn = conns.get(key)
        if conn is None:
            if parts.scheme == "https":
                conn = http.client.HTTPSConnection(parts.hostname, parts.port, timeout=TIMEOUT, context=self._context())
            else:
                conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=TIMEOUT)
            conns[key] = conn
        try:
            conn.request("GET", parts.path + (f"?{parts.query}" if parts.query else ""), headers=headers)
            return conn.getresponse()
        except Exception:
            self.drop(url)
            raise

    def drop(self, url: str) -> None:
        """Close this thread's connection to URL's host (after a response not read to its end)."""
        parts = urlsplit(url)
        conn = self.local.__dict__.get("conns", {}).pop((parts.scheme, parts.netloc), None)
        if conn is not None:
            conn.close()


class _Reader:
    """Reads the repo into the memfd and reports each range received (runs in the child)."""

    def __init__(self, config: dict, mm: mmap.mmap, report):
        self.repo_id = config["repo_id"]
        self.revision = config["revision"]
        self.endpoint = config["endpoint"]
        self.headers = config["headers"]
        self.resuming = config["resuming"]
        self.limit = config["limit"]
        self.mm = mm
        self.report = report
        self.commit: str | None = None
        self.used = 0  # memfd bytes handed out
        self.urls: dict[str, str] = {}  # file -> where its ranges are sent (after a redirect)
        self.lock = threading.Lock()
        self.http = _Connections()

    def alloc(self, n: int) -> int | None:
        """A page-aligned offset for N bytes in the memfd, or None past the limit."""
        with self.lock:
            if self.used + n > self.limit:
                return None
            offset = self.used
            self.used = -(-(offset + n) // PAGE) * PAGE
            return offset

    def run(self) -> None:
        """Resolve the commit, then read (see the module's docstring)."""
        try:
            self._run()
        except Exception as e:  # best effort: the run reads whatever is missing itself
            self.report(error=f"{type(e).__name__}: {redact(str(e))}")
            if self.commit is None:
                os._exit(0)  # nothing to offer: the parent stops waiting for a commit

    def _run(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        from streamer.io.catalog import CONFIG_NAME, INDEX_NAME, MAX_HEADER_BYTES, SINGLE_NAME

        self.max_header = MAX_HEADER_BYTES
        pool = ThreadPoolExecutor(CONNECTIONS, thread_name_prefix="prefetch")
        # The index and config.json are asked for at the revision's name while the file list
        # resolves it to a commit: one round trip less before the shards' headers.
        early = {p: pool.submit(self.peek, p) for p in (INDEX_NAME, CONFIG_NAME)}
        url = f"{self.endpoint}/api/models/{self.repo_id}"
        if self.revision is not None:
            url += f"/revision/{quote(self.revision, safe='')}"
        r = self.http.get(url + "?blobs=true", self.headers)
        body = r.read()
        if r.status != 200:
            raise RuntimeError(f"reading the file list: HTTP {r.status}")
        info = json.loads(body)
        self.commit = info["sha"]
        files = {s["rfilename"]: s.get("size") or 0 for s in info.get("siblings") or []}
        self.report(commit=self.commit, endpoint=self.endpoint)

        small = {p: self.keep(p, files[p], *early[p].result()) for p in early if p in files}
        if INDEX_NAME in small:
            index = small[INDEX_NAME]
            weight_map = json.loads(index).get("weight_map") if index else None
            if not isinstance(weight_map, dict):
                return
            shards = sorted({f for f in weight_map.values() if isinstance(f, str) and f in files})
        else:
            top = [f for f in files if f.endswith(".safetensors") and "/" not in f]
            shards = [SINGLE_NAME] if SINGLE_NAME in files else top if len(top) == 1 else []
        # Every header first (the catalog reads them all before the first tensor), then the
        # tensors, in the pipeline's order.
        starts = list(pool.map(lambda s: self.head(s, files[s]), shards))
        for shard, first in zip(shards, starts) if not self.resuming else ():
            for start in range(first, files[shard], CHUNK_BYTES):
                n = min(CHUNK_BYTES, files[shard] - start)
                offset = self.alloc(n)
                if offset is None:
                    pool.shutdown(wait=False)
                    return
                pool.submit(self.fetch, shard, start, start + n, offset)
        pool.shutdown(wait=False)

    def get_range(self, url: str, start: int, end: int):
        """The response to a GET of bytes [START, END) at URL (its body not read yet)."""
        # A redirect goes to a signed CDN URL: it must not receive the token.
        headers = self.headers if url.startswith(self.endpoint) else {"user-agent": self.headers["user-agent"]}
        return self.http.get(url, {**headers, "Range": f"bytes={start}-{end - 1}", "Accept-Encoding": "identity"})

    def peek(self, path: str) -> tuple[str | None, bytes | None]:
        """Small file PATH at the revision's name, before its commit is known: (the commit the
        Hub answered from, the file's bytes), (None, None) when it did not come."""
        base = f"{self.endpoint}/{self.repo_id}/resolve/{quote(self.revision or 'main', safe='')}/{quote(path)}"
        url, commit = base, None
        try:
            for _ in range(2):  # a redirect first, for a file stored in LFS
                r = self.get_range(url, 0, SMALL_BYTES)
                commit = commit or r.getheader("x-repo-commit")
                location = r.getheader("location")
                body = r.read(SMALL_BYTES + 1)
                if r.status in REDIRECTS and location:
                    url = location if location.startswith("http") else self.endpoint + location
                    continue
                if r.status != 206 or not (r.getheader("content-range") or "").startswith("bytes 0-"):
                    self.http.drop(url)
                    return None, None
                return commit, body
        except Exception as e:
            self.http.drop(url)
            self.report(error=f"{path}: {type(e).__name__}")
        return None, None

    def keep(self, path: str, size: int, commit: str | None, body: bytes | None) -> bytes | None:
        """Small file PATH of SIZE bytes, as `peek` read it (from COMMIT) when that is the commit
        being read and all of it came, else read again at the commit; its bytes, reported like
        any range, or None when it did not arrive."""
        if commit != self.commit or body is None or len(body) != size:
            return self.whole(path, size)
        offset = self.alloc(size)
        if offset is None:
            return None
        self.mm[offset : offset + size] = body
        if size:
            self.report(got=[path, 0, size, offset])
        return body

    def whole(self, path: str, size: int) -> bytes | None:
        """A small file, whole; its bytes, or None when it did not arrive."""
        offset = self.alloc(size)
        if offset is None or self.fetch(path, 0, size, offset) < size:
            return None
        return bytes(self.mm[offset : offset + size])

    def head(self, path: str, size: int) -> int:
        """Read the start of shard PATH, its whole safetensors header at least; where the rest
        of the file starts (SIZE when nothing is left to read of it)."""
        n = min(size, HEAD_BYTES)
        offset = self.alloc(n)
        if offset is None or self.fetch(path, 0, n, offset) < min(n, 8):
            return size
        length = int.from_bytes(self.mm[offset : offset + 8], "little")
        if length > self.max_header:  # not a safetensors file: the catalog will say so
            return size
        end = min(8 + length, size)
        if end > n:
            more = self.alloc(end - n)
            if more is None or self.fetch(path, n, end, more) < end - n:
                return size
        return max(n, end)

    def fetch(self, path: str, start: int, end: int, offset: int) -> int:
        """Bytes [START, END) of PATH into the memfd at OFFSET; reports and returns how many
        arrived (a prefix, when the request failed)."""
        got = reported = 0
        try:
            # hub_http.resolve_url's URL, not imported: hub_http also loads httpx 1.x (a third of a
            # second more before the reader's first request).
            base = f"{self.endpoint}/{self.repo_id}/resolve/{quote(self.commit, safe='')}/{quote(path)}"
            for _ in range(2):  # the first answer may be a redirect to where the file is
                url = self.urls.get(path, base)
                r = self.get_range(url, start, end)
                location = r.getheader("location")
                if r.status in REDIRECTS and location:
                    r.read()
                    self.urls[path] = location if location.startswith("http") else self.endpoint + location
                    continue
                expected = f"bytes {start}-{end - 1}/"
                if (r.status != 206 or not (r.getheader("content-range") or "").startswith(expected)
                        or (r.getheader("content-encoding") or "identity").lower() != "identity"):
                    self.http.drop(url)
                    self.report(error=f"{path}: HTTP {r.status} to a range request")
                    return 0
                view = memoryview(self.mm)
                try:
                    while got < end - start:
                        # Straight from the socket into the shared memory, a megabyte at a time.
                        n = r.readinto(view[offset + got : offset + min(end - start, got + REPORT_BYTES)])
                        if not n:
                            raise ConnectionError("the body ended early")
                        got += n
                        if got - reported >= REPORT_BYTES:
                            self.report(got=[path, start + reported, start + got, offset + reported])
                            reported = got
                except BaseException:
                    self.http.drop(url)
                    raise
                finally:
                    view.release()
                return got
            return got
        except Exception as e:  # dropped, refused: the run reads the rest of it itself
            self.report(error=f"{path}: {type(e).__name__} after {got} bytes")
            return got
        finally:
            if got > reported:
                self.report(got=[path, start + reported, start + got, offset + reported])


def _reader_main() -> None:
    """The reader process: its config on the first line of stdin; the end of stdin (its parent
    has exited, or closed it) ends it."""
    # Ctrl-C reaches the whole process group: the parent decides, and its exit closes our stdin.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    line = sys.stdin.buffer.readline()
    if not line:
        return
    config = json.loads(line)
    out = sys.stdout.buffer
    out_lock = threading.Lock()

    def report(**fields) -> None:
        data = (json.dumps(fields) + "\n").encode()
        with out_lock:
            try:
                out.write(data)
                out.flush()
            except (BrokenPipeError, ValueError):  # the parent is gone
                pass

    mm = mmap.mmap(config["fd"], config["limit"])
    reader = _Reader(config, mm, report)
    threading.Thread(target=reader.run, name="prefetch-plan", daemon=True).start()
    sys.stdin.buffer.read()


if __name__ == "__main__":
    _reader_main()
    sys.stdout.flush()
    os._exit(0)  # requests in flight must not hold the exit

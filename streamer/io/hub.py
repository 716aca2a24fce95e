"""The Hub at both ends: HubSource reads with HTTP range requests, HubSink publishes in one commit.

Every Hub call goes through huggingface_hub (HfApi for the API, its shared HTTP session for range
reads), so endpoints, auth headers and proxies behave exactly as the rest of the ecosystem, and
every one of them goes through one retry policy (`hub_call`): a dropped connection, a 5xx or a 429
costs a short wait, never the run.
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import importlib
import json
import logging
import mmap
import os
import queue
import random
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote

from huggingface_hub import CommitOperationAdd, HfApi
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

from streamer.engine.card import read_provenance
from streamer.errors import HubError, InputError, TargetError
from streamer.io.sink import ShardWriter, Sink, check_relpath
from streamer.io.source import Source, Span

log = logging.getLogger("streamer")

CHUNK_BYTES = 16 * 1024 * 1024  # a large span is fetched as parallel requests of this size
CONNECTIONS = 8  # parallel range requests per source

# --- one retry policy for every Hub call --------------------------------------------------------
#
# Tries per call, the first included. With waits of 0.5, 1, 2, 4, 8, 8, 8 s (jittered) a call gives
# up after about half a minute of a Hub that does not answer: long enough to ride out a blip or a
# rolling restart, short enough that a dead network is reported while the user still watches.
ATTEMPTS = 8
BACKOFF_FIRST = 0.5
BACKOFF_CAP = 8.0
RETRY_AFTER_CAP = 60.0  # a 429's Retry-After is honoured up to this many seconds
RETRY_STATUS = {408, 429, 500, 502, 503, 504}


def _network_error_types() -> tuple[type[BaseException], ...]:
    # huggingface_hub 1.x speaks httpx, 2.x httpx2: a transport error of either is a network
    # failure (refused, reset, timed out, closed mid-response).
    found: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for name in ("httpx2", "httpx"):
        try:
            found.append(importlib.import_module(name).TransportError)
        except (ImportError, AttributeError):
            pass
    return tuple(found)


NETWORK_ERRORS = _network_error_types()


class Cancelled(HubError):
    """A Hub call given up because the run is stopping (Ctrl-C, cancel, another upload failed)."""


def _chain(e: BaseException):
    """E and what caused it: huggingface_hub wraps some failures (RuntimeError from an upload)."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen and len(seen) < 8:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def classify(e: BaseException) -> tuple[str | None, float | None]:
    """("network" | "status" | None, Retry-After seconds): is E worth another try?"""
    for c in _chain(e):
        if isinstance(c, HfHubHTTPError):
            response = getattr(c, "response", None)
            status = getattr(response, "status_code", None)
            if status in RETRY_STATUS:
                return "status", _retry_after(getattr(response, "headers", None) or {})
            return None, None  # a definitive answer (404, 401, 403, 412 …)
        if isinstance(c, NETWORK_ERRORS):
            return "network", None
    return None, None


def _retry_after(headers) -> float | None:
    value = headers.get("retry-after") if hasattr(headers, "get") else None
    return _parse_retry_after(value) if value else None


def _parse_retry_after(value: str) -> float:
    try:
        return max(0.0, min(float(value), RETRY_AFTER_CAP))
    except ValueError:
        try:
            parsed = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return 1.0
        return max(0.0, min(parsed.timestamp() - time.time(), RETRY_AFTER_CAP)) if parsed else 1.0


def backoff_delay(attempt: int, retry_after: float | None = None) -> float:
    """Seconds to wait after failed try number ATTEMPT (1-based): exponential, capped, jittered
    (so parallel uploads that failed together do not retry together), never below Retry-After."""
    delay = min(BACKOFF_FIRST * 2 ** (attempt - 1), BACKOFF_CAP) * (0.5 + random.random() / 2)
    return max(delay, retry_after) if retry_after is not None else delay


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    text = text if len(text) <= 160 else text[:157] + "…"
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def gave_up(what: str, e: BaseException, kind: str, tries: int, endpoint: str | None = None) -> HubError:
    """The sentence for a Hub call that kept failing transiently. Never includes a token: it is
    built from exception texts and URLs, and huggingface_hub sends tokens only in headers."""
    where = _endpoint(endpoint)
    if kind == "network":
        cause = next((c for c in _chain(e) if isinstance(c, NETWORK_ERRORS)), e)
        return HubError(
            f"could not reach the Hub at {where}: {what} failed {tries} times ({_short(cause)}); "
            "check your network and retry"
        )
    cause = next((c for c in _chain(e) if isinstance(c, HfHubHTTPError)), e)
    status = getattr(getattr(cause, "response", None), "status_code", "?")
    return HubError(
        f"the Hub at {where} answered HTTP {status} to {what} {tries} times in a row; "
        "it is overloaded or rate-limiting this account: wait a few minutes and retry"
    )


def hub_call(what: str, fn, *args, where: str | None = None, cancel: threading.Event | None = None, **kwargs):
    """FN(*ARGS, **KWARGS) under the retry policy: network errors, 5xx and 429 (after its
    Retry-After) are tried again with capped exponential backoff, at most ATTEMPTS times; any other
    error is raised as it is. WHAT names the call in the sentence raised when it keeps failing
    ("reading acme/x's file list"), WHERE the Hub's URL (default: HF_ENDPOINT). A set CANCEL stops
    the waiting at once (raises Cancelled).

    Only idempotent calls belong here (reads, create with exist_ok, content-addressed uploads); the
    commit has its own loop (HubSink.commit) that reads the branch before trying again.
    """
    attempt = 0
    while True:
        if cancel is not None and cancel.is_set():
            raise Cancelled(f"{what}: stopped because the run is stopping")
        attempt += 1
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            kind, retry_after = classify(e)
            if kind is None:
                raise
            if cancel is not None and cancel.is_set():
                raise Cancelled(f"{what}: stopped because the run is stopping") from None
            if attempt >= ATTEMPTS:
                raise gave_up(what, e, kind, attempt, where) from None
            delay = backoff_delay(attempt, retry_after)
            log.debug("%s: %s; try %d of %d in %.1f s", what, _short(e), attempt + 1, ATTEMPTS, delay)
            if cancel is not None:
                if cancel.wait(delay):
                    raise Cancelled(f"{what}: stopped because the run is stopping") from None
            else:
                time.sleep(delay)


def hub_get(what: str, url: str, *, token, endpoint: str | None = None, follow_redirects: bool = True,
            headers: dict | None = None):
    """One GET on huggingface_hub's session under the retry policy. Returns the response of the
    first try that is not retryable (a 404 included: the caller decides what it means)."""

    def once():
        r = get_session().get(url, headers={**build_hf_headers(token=token), **(headers or {})},
                              follow_redirects=follow_redirects)  # fmt: skip
        if r.status_code in RETRY_STATUS:
            hf_raise_for_status(r)  # an HfHubHTTPError that hub_call retries
        return r

    return hub_call(what, once, where=endpoint)


def _endpoint(endpoint: str | None) -> str:
    return (endpoint or hf_constants.ENDPOINT).rstrip("/")


def resolve_url(endpoint: str, repo_id: str, revision: str, path: str) -> str:
    """/{repo}/resolve/{rev}/{path} with the revision and the file name percent-encoded: a name
    may hold '#', '?' or '%', which would otherwise end the path or be decoded."""
    return f"{_endpoint(endpoint)}/{repo_id}/resolve/{quote(revision, safe='')}/{quote(path)}"


def explain(e: Exception, repo_id: str, *, what: str = "repo") -> HubError:
    """Turn a huggingface_hub error into a sentence a user can act on. Never includes a token."""
    status = getattr(getattr(e, "response", None), "status_code", None)
    if isinstance(e, GatedRepoError):
        return HubError(
            f"{repo_id} is a gated model and this account has not been granted access: accept its "
            f"terms at https://huggingface.co/{repo_id}, then run again with that account's token"
        )
    if isinstance(e, RevisionNotFoundError):
        return HubError(f"revision not found in {repo_id}: check the branch, tag or commit after '@'")
    if isinstance(e, RepositoryNotFoundError):
        return HubError(
            f"{what} {repo_id} not found, or it is private and the token does not give access "
            "(pass --token or set HF_TOKEN)"
        )
    if status == 401:
        return HubError("the Hugging Face token was rejected (invalid or expired): check --token / HF_TOKEN")
    if status == 403:
        return HubError(f"the token has no write access to {repo_id}: use a write token, or a namespace you own")
    server = getattr(e, "server_message", "") or ""
    detail = f": {server}" if server else ""
    return HubError(f"Hub request for {repo_id} failed ({status or type(e).__name__}){detail}")


# --- source ------------------------------------------------------------------------------------


class RangeError(HubError):
    """The server did not honour a range request exactly; never fall back to a full download."""


class HubSource(Source):
    """A Hub repo pinned to one commit, read with range requests only.

    TOKEN False sends no token at all (a signed-out visitor of a Space); None lets
    huggingface_hub pick HF_TOKEN or the login cache.
    """

    # Set by the pipeline to its cancel event: range reads in flight stop at the next block
    # instead of running to the end of their chunk.
    cancel: threading.Event | None = None
    # Set by the pipeline: told about bytes as they arrive (in steps of REPORT_BYTES), so that
    # progress moves with the transfer and not once per piece of up to 256 MB.
    on_bytes = None
    REPORT_BYTES = 1 << 20

    def __init__(
        self,
        repo_id: str,
        *,
        revision: str | None = None,
        token: str | bool | None = None,
        endpoint: str | None = None,
        connections: int = CONNECTIONS,
        chunk_bytes: int = CHUNK_BYTES,
    ):
        self.repo_id = repo_id
        self.endpoint = _endpoint(endpoint)
        self.api = HfApi(endpoint=self.endpoint, token=token)
        self._token = token
        self.chunk_bytes = chunk_bytes
        try:
            info = hub_call(
                f"reading {repo_id}'s file list", self.api.model_info, repo_id,
                revision=revision, files_metadata=True, where=self.endpoint,
            )  # fmt: skip
        except HfHubHTTPError as e:
            raise explain(e, repo_id, what="source repo") from None
        # Every file is read at this sha, so a push to the source mid-run cannot mix versions.
        self.commit = info.sha
        self.label = repo_id if revision is None else f"{repo_id}@{revision}"
        # A private or gated source makes a private target unless the user asks otherwise.
        self.private = bool(getattr(info, "private", False))
        self.gated = bool(getattr(info, "gated", False))
        self._files = {s.rfilename: (s.size or 0) for s in (info.siblings or [])}
        self._urls: dict[str, str] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(connections, thread_name_prefix="streamer-range")
        self.requests = 0  # range requests sent, for tests and --json
        self.bytes_fetched = 0

    def files(self) -> dict[str, int]:
        return self._files

    def _base_url(self, path: str) -> str:
        return resolve_url(self.endpoint, self.repo_id, self.commit, path)

    def _resolve(self, path: str) -> tuple[str, dict]:
        """The URL to send ranges to: the redirect target, resolved once per file."""
        base = self._base_url(path)
        headers = build_hf_headers(token=self._token)
        with self._lock:
            url = self._urls.get(path)
        if url is None:
            r = self._send("HEAD", base, headers, path=path)
            url = base
            if r.status_code in (301, 302, 303, 307, 308) and r.headers.get("location"):
                loc = r.headers["location"]
                url = loc if loc.startswith("http") else self.endpoint + loc
            with self._lock:
                self._urls[path] = url
        # A redirect goes to a signed CDN URL: it must not receive the token.
        same_host = url.startswith(self.endpoint)
        return url, (headers if same_host else {})

    def _send(self, method: str, url: str, headers: dict, *, path: str):
        def once():
            r = get_session().request(method, url, headers=headers, follow_redirects=False)
            if r.status_code in RETRY_STATUS:
                hf_raise_for_status(r)
            return r

        r = hub_call(f"reading {path} from {self.repo_id}", once, where=self.endpoint, cancel=self.cancel)
        if r.status_code >= 400:
            self._raise(r, path)
        return r

    def _raise(self, response, path: str):
        try:
            hf_raise_for_status(response)
        except HfHubHTTPError as e:
            if response.status_code == 404 and response.headers.get("x-error-code") == "EntryNotFound":
                raise InputError(f"{path} is listed in {self.repo_id} but cannot be downloaded") from None
            raise explain(e, self.repo_id, what="source repo") from None
        raise HubError(f"unexpected HTTP {response.status_code} reading {path} from {self.repo_id}")

    def _backoff(self, attempt: int, why: str, retry_after: str | None, error: BaseException | None = None) -> int:
        """The retry policy of hub_call, for range reads: they keep the bytes that arrived and
        ask for the rest, so they cannot simply be called again."""
        attempt += 1
        if attempt >= ATTEMPTS:
            what = f"reading {why.split(':')[0]} from {self.repo_id}"
            if error is not None:
                kind = classify(error)[0] or "network"
                raise gave_up(what, error, kind, attempt, self.endpoint) from None
            raise HubError(f"giving up after {attempt} tries {what} ({why}); retry later")
        delay = backoff_delay(attempt, _parse_retry_after(retry_after) if retry_after else None)
        log.debug("retry %d in %.1fs: %s", attempt, delay, why)
        if self.cancel is not None:  # a cancel does not wait out a retry's backoff
            if self.cancel.wait(delay):
                raise Cancelled("range read stopped: the run is stopping")
        else:
            time.sleep(delay)
        return attempt

    def _fetch(self, path: str, span: Span, out: memoryview) -> None:
        """One range request, resumed where it broke off on a dropped connection."""
        got = 0
        attempt = 0
        unreported = 0  # bytes that arrived but were not yet passed to on_bytes
        while got < span.size:
            self._check_cancel()
            url, headers = self._resolve(path)
            want = Span(span.start + got, span.end)
            h = {**headers, "Range": f"bytes={want.start}-{want.end - 1}", "Accept-Encoding": "identity"}
            try:
                with get_session().stream("GET", url, headers=h, follow_redirects=False) as r:
                    if r.status_code in RETRY_STATUS:
                        attempt = self._backoff(attempt, f"{path}: HTTP {r.status_code}", r.headers.get("retry-after"))
                        continue
                    if r.status_code == 403 and url != self._base_url(path):
                        with self._lock:  # a signed URL expired: resolve again
                            self._urls.pop(path, None)
                        attempt = self._backoff(attempt, f"{path}: signed URL expired", None)
                        continue
                    if r.status_code >= 400:
                        r.read()
                        self._raise(r, path)
                    self._check_range(r, path, want)
                    with self._lock:
                        self.requests += 1
                    # Raw blocks as the socket delivers them: a third less CPU than iter_bytes'
                    # re-chunking, and the body is exact file bytes (_check_range refused any
                    # Content-Encoding).
                    for block in r.iter_raw():
                        self._check_cancel()
                        n = min(len(block), span.size - got)
                        out[got : got + n] = block[:n]
                        got += n
                        with self._lock:
                            self.bytes_fetched += n
                        unreported += n
                        if unreported >= self.REPORT_BYTES and self.on_bytes is not None:
                            self.on_bytes(unreported)
                            unreported = 0
                    if got < span.size:
                        raise ConnectionError("body ended early")
            except (HubError, InputError):
                raise
            except Exception as e:  # dropped mid-body: keep what arrived, ask for the rest
                attempt = self._backoff(attempt, f"{path}: {type(e).__name__} after {got} bytes", None, e)
        if unreported and self.on_bytes is not None:
            self.on_bytes(unreported)

    def _check_cancel(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled("range read stopped: the run is stopping")

    def _check_range(self, r, path: str, want: Span) -> None:
        if r.status_code != 206:
            raise RangeError(
                f"{path}: the server answered HTTP {r.status_code} to a range request instead of "
                "206; refusing to download whole files"
            )
        encoding = r.headers.get("content-encoding", "identity").lower()
        if encoding != "identity":
            raise RangeError(f"{path}: the server sent a {encoding}-encoded body to a range request")
        expected = f"bytes {want.start}-{want.end - 1}/"
        content_range = r.headers.get("content-range", "")
        length = r.headers.get("content-length")
        if not content_range.startswith(expected) or (length is not None and int(length) != want.size):
            raise RangeError(
                f"{path}: asked for bytes {want.start}-{want.end - 1}, server sent "
                f"{content_range or 'no Content-Range'} ({length} bytes)"
            )

    def read_into(self, path: str, span: Span, out: memoryview) -> None:
        self.read_spans_into(path, [span], [out])

    def read_spans_into(self, path: str, spans: list[Span], outs: list[memoryview]) -> None:
        if path not in self._files:
            raise InputError(f"{path} is not in {self.repo_id}@{self.commit}")
        tasks = []
        for span, out in zip(spans, outs):
            out = out.cast("B") if out.format != "B" else out
            for start in range(span.start, span.end, self.chunk_bytes):
                end = min(start + self.chunk_bytes, span.end)
                part = out[start - span.start : end - span.start]
                tasks.append(self._pool.submit(self._fetch, path, Span(start, end), part))
        errors = [t.exception() for t in tasks]
        for err in errors:
            if err is not None:
                raise err

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


# --- sink --------------------------------------------------------------------------------------


class _UploadThreads:
    """A few daemon threads running uploads. Unlike ThreadPoolExecutor's workers (joined when
    the interpreter exits), an upload that a stopping run abandons cannot keep the process alive:
    Ctrl-C or a failed upload ends the run at once instead of after every transfer in flight."""

    def __init__(self, workers: int, prefix: str):
        self._workers = workers
        self._prefix = prefix
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._unfinished: set[Future] = set()

    @property
    def unfinished(self) -> int:
        """Uploads submitted and not finished (queued or in flight)."""
        with self._lock:
            return len(self._unfinished)

    def submit(self, fn, *args) -> Future:
        fut: Future = Future()
        with self._lock:
            self._unfinished.add(fut)
            if len(self._threads) < self._workers:
                t = threading.Thread(target=self._work, name=f"{self._prefix}-{len(self._threads)}", daemon=True)
                self._threads.append(t)
                t.start()
        self._queue.put((fut, fn, args))
        return fut

    def fail_pending(self, error: BaseException) -> None:
        """Resolve every unfinished upload's future with ERROR now: whoever waits on one (the
        pipeline waits on them in order) learns at once that the run is over, instead of after
        the transfers still in flight. Their threads finish (or give up) in the background."""
        with self._lock:
            pending, self._unfinished = list(self._unfinished), set()
        for fut in pending:
            try:
                fut.set_exception(error)
            except Exception:  # finished meanwhile: its own outcome stands
                pass

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            fut, fn, args = item
            try:
                # A future fail_pending already resolved still runs its task: a stopped sink
                # makes it return at once, and it frees what it holds (the shard's memfd).
                if not (fut.done() or fut.set_running_or_notify_cancel()):
                    continue  # cancelled by its owner
                try:
                    result = fn(*args)
                except BaseException as e:  # handed to whoever waits on the future
                    outcome = (fut.set_exception, e)
                else:
                    outcome = (fut.set_result, result)
                try:
                    outcome[0](outcome[1])
                except Exception:  # fail_pending resolved it first
                    pass
            except Exception:  # a future in an unexpected state: never kill the worker
                pass
            finally:
                with self._lock:
                    self._unfinished.discard(fut)

    def shutdown(self, *, wait: bool) -> None:
        with self._lock:
            threads = list(self._threads)
        for _ in threads:
            self._queue.put(None)
        if wait:
            for t in threads:
                t.join()


def _xet_possible() -> bool:
    """Whether huggingface_hub may upload through hf_xet (which reads the file itself, from Rust)."""
    if getattr(hf_constants, "HF_HUB_DISABLE_XET", False):
        return False
    try:
        from huggingface_hub.utils import is_xet_available
    except ImportError:
        return False
    return bool(is_xet_available())


class _BufferedShard(ShardWriter):
    """A shard assembled in memory, uploaded (LFS or Xet) as soon as it is complete.

    On Linux the buffer is an anonymous in-memory file (memfd): huggingface_hub uploads it by
    path, so the shard is never copied into a second buffer. Elsewhere it is a bytearray, copied
    once into the bytes huggingface_hub needs.
    """

    def __init__(self, sink: "HubSink", name: str, size: int):
        super().__init__(name, size)
        self.sink = sink
        self.fd = -1
        if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd") and size > 0:
            self.fd = os.memfd_create(f"streamer-{os.path.basename(name)}")
            os.ftruncate(self.fd, size)
            self.buf = mmap.mmap(self.fd, size)
        else:
            self.buf = bytearray(size)

    def write_at(self, offset: int, data) -> None:
        # Another shard's upload failed for good: stop producing this one now, not after the
        # whole model has been read and quantized for nothing.
        self.sink.raise_if_failed()
        view = memoryview(data).cast("B")
        self.buf[offset : offset + len(view)] = view

    def close(self) -> Future:
        if self.fd >= 0:
            self.buf.close()
            self.buf = None
            return self.sink._upload_pool.submit(self._upload_fd)
        data, self.buf = bytes(self.buf), None
        return self.sink._upload_pool.submit(self.sink._preupload, self.name, data)

    def _upload_fd(self) -> str:
        try:
            with self.sink._lock:
                self.sink._inflight[self.name] = self.fd
            return self.sink._preupload(self.name, f"/proc/self/fd/{self.fd}")
        finally:
            with self.sink._lock:  # under the lock: _stop_uploads never truncates a closed fd
                self.sink._inflight.pop(self.name, None)
                os.close(self.fd)
                self.fd = -1

    def discard(self) -> None:
        if self.fd >= 0:
            if self.buf is not None:
                self.buf.close()
            os.close(self.fd)
            self.fd = -1
        self.buf = None


def _git_blob_oid(data: bytes) -> str:
    """The git object id of a regular (non-LFS) file, as the Hub reports it in `blobId`."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _tree(info) -> dict[str, tuple[str | None, str | None]]:
    """path -> (LFS sha256 or None, git blob id) from a model_info(files_metadata=True)."""
    tree = {}
    for s in info.siblings or []:
        lfs = getattr(s, "lfs", None)
        sha = (lfs.get("sha256") if isinstance(lfs, dict) else getattr(lfs, "sha256", None)) if lfs else None
        tree[s.rfilename] = (sha, getattr(s, "blob_id", None))
    return tree


class HubSink(Sink):
    """Shards are uploaded as content while the run goes on; the branch moves once, at commit.

    TOKEN False sends no token (and so cannot write); None lets huggingface_hub pick HF_TOKEN or
    the login cache. PRIVATE is the visibility of a repo this run creates (an existing repo keeps
    its own); None means public.
    """

    buffers_shards = True

    def __init__(
        self,
        repo_id: str,
        *,
        token: str | bool | None = None,
        revision: str | None = None,
        private: bool | None = False,
        create_pr: bool = False,
        overwrite: bool = False,
        endpoint: str | None = None,
        upload_workers: int = 4,
    ):
        self.repo_id = repo_id
        self.endpoint = _endpoint(endpoint)
        self.api = HfApi(endpoint=self.endpoint, token=token)
        self.revision = revision or "main"
        self.private = bool(private)
        self.create_pr = create_pr
        self.overwrite = overwrite
        self.label = repo_id
        self.url = f"{self.endpoint}/{repo_id}"
        self._ops: dict[str, CommitOperationAdd] = {}
        self._git_oids: dict[str, str] = {}  # small files: their git blob id, to compare with the Hub's
        self._deletes: list[str] = []
        self._lock = threading.Lock()
        self._upload_pool = _UploadThreads(upload_workers, "streamer-upload")
        self._inflight: dict[str, int] = {}  # shard name -> memfd being uploaded
        self._stop = threading.Event()  # set when the run stops: uploads give up
        self._failure: BaseException | None = None  # the first upload that failed for good
        self._parent: str | None = None
        self._remote: dict | None = None  # the branch head's files with their oids
        self._target_private: bool | None = None
        self.bytes_uploaded = 0

    def _call(self, what: str, fn, *args, **kwargs):
        return hub_call(what, fn, *args, where=self.endpoint, **kwargs)

    def check(self) -> None:
        """Refuse what must not be written; creates nothing (a dry run stays a dry run)."""
        from huggingface_hub.errors import LocalTokenNotFoundError

        try:
            me = self._call("checking the token (whoami)", self.api.whoami)
        except HfHubHTTPError as e:
            raise explain(e, self.repo_id, what="target repo") from None
        except (LocalTokenNotFoundError, ValueError) as e:  # no token at all, or token=False
            raise HubError(f"writing to the Hub needs a token: pass --token or set HF_TOKEN ({type(e).__name__})") from None
        namespace = self.repo_id.split("/")[0]
        mine = [me.get("name")] + [o.get("name") for o in me.get("orgs") or []]
        role = ((me.get("auth") or {}).get("accessToken") or {}).get("role")
        if namespace not in mine:
            raise TargetError(
                f"no write access to {namespace!r}: this token belongs to {me.get('name')!r}"
                f"{' (orgs: ' + ', '.join(mine[1:]) + ')' if mine[1:] else ''}; pick a namespace you can write to"
            )
        if role == "read":
            raise TargetError("this token is read-only: writing to the Hub needs a write token")
        existing = self._existing_files()
        self._create_repo = existing is None
        self._create_branch = self.revision != "main" and self._parent is None
        existing = existing or {}
        model_files = [f for f in existing if f not in (".gitattributes",)]
        if model_files and not self.overwrite and not self.create_pr:
            if not self._written_by_streamer(existing):
                raise TargetError(
                    f"target {self.repo_id} already holds files that streamer did not write "
                    f"({', '.join(sorted(model_files)[:3])}…); choose another repo or pass --overwrite"
                )
        # Files of an earlier conversion that this one does not produce are deleted in the same
        # commit, so the target never mixes two conversions.
        self._existing = existing

    def visibility_note(self, source_private: bool = False) -> str | None:
        """One sentence on who will see the result (after check()); None when there is nothing to say."""
        if getattr(self, "_create_repo", False):
            if self.private:
                why = " because the source is private or gated (pass --public to publish it)" if source_private else ""
                return f"target {self.repo_id} will be created as a private repo{why}"
            why = ": the source is private or gated, and --public was given" if source_private else ""
            return f"target {self.repo_id} will be created as a public repo{why}"
        if self._target_private is False and source_private:
            return (
                f"warning: target {self.repo_id} exists and is public, and the source is private or gated: "
                "everyone will be able to read the converted weights"
            )
        return None

    def begin(self) -> None:
        """Create the repo and branch the uploads need; abort() removes what this run created."""
        self._created: list[str] = []
        try:
            if getattr(self, "_create_repo", False):
                self._call(
                    f"creating {self.repo_id}", self.api.create_repo, self.repo_id,
                    private=self.private, exist_ok=True,
                )  # fmt: skip
                self._created.append("repo")
                self._existing_files()
            if getattr(self, "_create_branch", False) or (self.revision != "main" and self._parent is None):
                self._call(
                    f"creating branch {self.revision} of {self.repo_id}", self.api.create_branch, self.repo_id,
                    branch=self.revision, exist_ok=True,
                )  # fmt: skip
                self._created.append("branch")
                self._existing_files()
        except HfHubHTTPError as e:
            raise explain(e, self.repo_id, what="target repo") from None

    def _stop_uploads(self) -> int:
        """Make every upload give up now; returns how many were queued or in flight."""
        self._stop.set()
        with self._lock:
            if not _xet_possible():
                # An LFS upload streams the shard from its memfd: emptying the file ends the
                # request at once ("too little data"), where waiting would take as long as the
                # transfer. (hf_xet reads the file from Rust, possibly mapped: left alone.)
                for fd in self._inflight.values():
                    try:
                        os.ftruncate(fd, 0)
                    except OSError:
                        pass
        return self._upload_pool.unfinished

    def _fail(self, error: BaseException) -> None:
        with self._lock:
            if self._failure is None:
                self._failure = error
        self._stop_uploads()
        self._upload_pool.fail_pending(self._stopped_error())

    def raise_if_failed(self) -> None:
        if self._failure is not None:
            raise self._stopped_error()

    def _stopped_error(self) -> BaseException:
        if self._failure is not None:
            # The same sentence for every shard, so whichever the run looks at first says what
            # went wrong (not "cancelled").
            return HubError(str(self._failure))
        return Cancelled("upload stopped: the run is stopping")

    def abort(self, *, cancelled: bool = False) -> None:
        """Nothing is committed, so the branch holds no partial model. A user's cancel also drops
        the repo or branch this run created; after a failure or Ctrl-C they stay, holding the
        uploaded shard contents that a rerun of the same command resumes from."""
        pending = self._stop_uploads()
        if pending and self._failure is None:
            log.warning("stopping %d upload(s) in flight: nothing is committed to %s", pending, self.repo_id)
        self._upload_pool.fail_pending(self._stopped_error())
        created = getattr(self, "_created", []) if cancelled else []
        try:
            if "repo" in created:
                self._call(f"deleting {self.repo_id}", self.api.delete_repo, self.repo_id, missing_ok=True)
                # The resume record names the tensors of a possibly private model, on what may be
                # a shared machine (a Space): it goes with the repo it was for.
                self._forget_state()
            elif "branch" in created:
                self._call(f"deleting branch {self.revision}", self.api.delete_branch, self.repo_id, branch=self.revision)
        except Exception as e:  # best effort: the branch still holds no partial model
            log.warning("could not remove the empty %s created for this run: %s", created[0], type(e).__name__)
        self._created = []

    def _existing_files(self) -> dict[str, int] | None:
        try:
            info = self._call(
                f"reading {self.repo_id}'s files", self.api.model_info, self.repo_id,
                revision=self.revision, files_metadata=True,
            )  # fmt: skip
        except RevisionNotFoundError:
            return {} if self._repo_exists() else None
        except RepositoryNotFoundError:
            return None
        except HfHubHTTPError as e:
            raise explain(e, self.repo_id, what="target repo") from None
        self._parent = info.sha
        self._remote = _tree(info)
        self._target_private = getattr(info, "private", None)
        return {s.rfilename: s.size or 0 for s in (info.siblings or [])}

    def _repo_exists(self) -> bool:
        try:
            info = self._call(f"reading {self.repo_id}", self.api.model_info, self.repo_id)
        except RepositoryNotFoundError:
            return False
        except HfHubHTTPError as e:
            raise explain(e, self.repo_id, what="target repo") from None
        self._target_private = getattr(info, "private", None)
        return True

    def _written_by_streamer(self, existing: dict) -> bool:
        if "README.md" not in existing:
            return False
        text = self.read_text("README.md")
        return text is not None and read_provenance(text) is not None

    def read_text(self, path: str) -> str | None:
        """A small file of the target at the branch head, straight into memory (no HF cache)."""
        url = resolve_url(self.endpoint, self.repo_id, self.revision, path)
        r = hub_get(f"reading {path} of {self.repo_id}", url, token=self.api.token, endpoint=self.endpoint)
        return r.text if r.status_code == 200 else None

    def open_shard(self, name: str, size: int) -> ShardWriter:
        check_relpath(name)
        self.raise_if_failed()
        return _BufferedShard(self, name, size)

    # -- resume: a rerun after a crash skips shards whose content the Hub already holds --------

    def _state_path(self, fingerprint: str):
        key = hashlib.sha256(f"{self.endpoint}|{self.repo_id}|{self.revision}|{fingerprint}".encode()).hexdigest()
        return Path(hf_constants.HF_HOME) / "streamer" / "uploads" / f"{key[:32]}.json"

    def resume(self, fingerprint: str, shards: list[str]) -> set[str]:
        """Shards recorded as uploaded by an earlier run of this exact plan, and still on the Hub.

        The record (a few hundred bytes per shard: name, sha256, size) is the only thing written
        to local disk; the shards themselves are never read, quantized or uploaded again.
        """
        from huggingface_hub.lfs import UploadInfo, post_lfs_batch_info

        self._state = self._state_path(fingerprint)
        try:
            record = json.loads(self._state.read_text())
        except (OSError, ValueError):
            record = {}
        if not isinstance(record, dict):
            record = {}
        record = {k: v for k, v in record.items() if k in shards}
        if not record:
            return set()
        try:
            infos = {
                name: UploadInfo(sha256=bytes.fromhex(r["sha256"]), size=r["size"], sample=base64.b64decode(r["sample"]))
                for name, r in record.items()
            }
            actions, errors, _ = self._call(
                f"checking the uploads of an earlier run on {self.repo_id}",
                lambda: post_lfs_batch_info(
                    upload_infos=list(infos.values()), token=self.api.token, repo_type="model",
                    repo_id=self.repo_id, revision=self.revision, endpoint=self.endpoint,
                ),
            )  # fmt: skip
        except Exception:
            return set()  # cannot confirm: convert those shards again, nothing is lost
        missing = {a["oid"] for a in actions if a.get("actions")} | {e.get("oid") for e in errors}
        reused = set()
        for name, info in infos.items():
            if info.sha256.hex() in missing:
                continue
            op = CommitOperationAdd(path_in_repo=name, path_or_fileobj=b"")
            op.upload_info = info
            op._upload_mode = "lfs"
            op._is_uploaded = True
            with self._lock:
                self._ops[name] = op
            reused.add(name)
        if reused:
            log.info("resuming: %d shard(s) already on the Hub are not converted again", len(reused))
        return reused

    def _remember(self, name: str, op: CommitOperationAdd) -> None:
        path = getattr(self, "_state", None)
        if path is None:
            return
        with self._lock:
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError):
                record = {}
            if not isinstance(record, dict):
                record = {}
            info = op.upload_info
            record[name] = {"sha256": info.sha256.hex(), "size": info.size, "sample": base64.b64encode(info.sample).decode()}
            path.parent.mkdir(parents=True, exist_ok=True)
            # A temp name of its own: two identical runs at once share the record's path, and a
            # shared ".tmp" let one rename the other's file away. The last replace wins whole.
            fd, tmp = tempfile.mkstemp(prefix=path.stem + ".", suffix=".tmp", dir=path.parent)
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(json.dumps(record))
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise

    def _preupload(self, name: str, data: bytes | str) -> str:
        """Upload one shard's content (bytes, or a path to it) ahead of the commit."""
        if self._stop.is_set():
            raise self._stopped_error()
        try:
            op = CommitOperationAdd(path_in_repo=name, path_or_fileobj=data)
            del data
            # Upload the content now (Xet when hf_xet is installed, else LFS); the commit later
            # only references it. Content the server already has is skipped: that is the resume.
            self._call(
                f"uploading {name} to {self.repo_id}", self.api.preupload_lfs_files, self.repo_id, [op],
                revision=self.revision, free_memory=True, cancel=self._stop,
            )  # fmt: skip
        except Exception as e:
            if self._stop.is_set():  # stopped on purpose (an error of ours may follow from it)
                raise self._stopped_error() from None
            if isinstance(e, HfHubHTTPError):
                error: BaseException = explain(e, self.repo_id, what="target repo")
            elif isinstance(e, (HubError, TargetError)):
                error = e
            else:
                error = HubError(f"uploading {name} to {self.repo_id} failed ({_short(e)}); run again to resume")
            # The first definitive failure ends the run: the other uploads stop now instead of
            # finishing (or retrying) for a commit that will not happen.
            self._fail(error)
            raise error from None
        if self._stop.is_set():  # the content may be cut short: never record it for a resume
            raise self._stopped_error()
        # The digest, now: huggingface_hub may hash lazily from the path, and once the memfd is
        # closed /proc/self/fd/N is gone (or is another file).
        op.upload_info.sha256  # noqa: B018
        with self._lock:
            self._ops[name] = op
            self.bytes_uploaded += op.upload_info.size
        self._remember(name, op)
        log.debug("uploaded %s", name)
        return name

    def put_file(self, path: str, data: bytes) -> None:
        check_relpath(path)
        data = bytes(data)
        with self._lock:
            self._ops[path] = CommitOperationAdd(path_in_repo=path, path_or_fileobj=data)
            self._git_oids[path] = _git_blob_oid(data)

    # -- the commit ------------------------------------------------------------------------------

    def _holds_exactly(self, tree: dict | None) -> bool:
        """Whether TREE (path -> (lfs sha256, git blob id)) is what this commit would leave:
        every file with our content, and nothing else but .gitattributes."""
        if tree is None or not self._ops:
            return False
        if set(tree) - {".gitattributes"} != set(self._ops) - {".gitattributes"}:
            return False
        for path, op in self._ops.items():
            lfs_sha, blob_id = tree.get(path, (None, None))
            if lfs_sha is not None:
                if lfs_sha != op.upload_info.sha256.hex():
                    return False
            elif blob_id is None or blob_id != self._git_oids.get(path):
                return False
        return True

    def _commit_url(self, sha: str) -> str:
        return f"{self.endpoint}/{self.repo_id}/commit/{sha}"

    def _pr_refs(self) -> set[str]:
        refs = self._call(
            f"listing the pull requests of {self.repo_id}", self.api.list_repo_refs, self.repo_id,
            include_pull_requests=True,
        )  # fmt: skip
        return {r.ref for r in (getattr(refs, "pull_requests", None) or [])}

    def _landed(self, prs_before: set[str] | None) -> str | None:
        """After a commit whose answer was lost: the URL of our commit if the Hub applied it.

        Decided from what the branch (or a new pull request) holds: a head that moved past the
        parent we committed on and holds exactly our files (same sha256 / git oids) is ours. A
        head still at the parent means nothing landed and the commit can be sent again (with
        parent_commit, so even a wrong guess is refused by the Hub instead of committed twice)."""
        what = f"reading {self.repo_id} after an unanswered commit"
        if prs_before is None:
            info = self._call(what, self.api.model_info, self.repo_id, revision=self.revision, files_metadata=True)
            if info.sha != self._parent and self._holds_exactly(_tree(info)):
                return self._commit_url(info.sha)
            return None
        for ref in sorted(self._pr_refs() - prs_before):
            info = self._call(what, self.api.model_info, self.repo_id, revision=ref, files_metadata=True)
            if self._holds_exactly(_tree(info)):
                return f"{self.endpoint}/{self.repo_id}/discussions/{ref.rsplit('/', 1)[-1]}"
        return None

    def commit(self, message: str, description: str = "") -> str:
        from huggingface_hub import CommitOperationDelete

        if self._stop.is_set():
            raise self._stopped_error()
        # Nothing would change (a rerun, or a resumed run, on a target that already holds exactly
        # this conversion): no commit, not even an empty one; the existing commit is the result.
        if self._parent is not None and self._holds_exactly(self._remote):
            self.url = self._commit_url(self._parent)
            log.info("%s already holds exactly this conversion: nothing to commit", self.repo_id)
            self._forget_state()
            return self.url
        ops = list(self._ops.values())
        produced = set(self._ops)
        stale = [f for f in getattr(self, "_existing", {}) if f not in produced and f != ".gitattributes"]
        ops += [CommitOperationDelete(path_in_repo=f) for f in stale]
        prs_before = self._pr_refs() if self.create_pr else None
        attempt = 0
        while True:
            attempt += 1
            try:
                info = self.api.create_commit(
                    self.repo_id,
                    operations=ops,
                    commit_message=message,
                    commit_description=description,
                    revision=self.revision,
                    create_pr=self.create_pr,
                    parent_commit=None if self.create_pr else self._parent,
                )
                self.url = info.pr_url or info.commit_url
                break
            except Exception as e:
                kind, retry_after = classify(e)
                if kind is None:
                    if isinstance(e, HfHubHTTPError):
                        if getattr(e.response, "status_code", None) == 412:
                            raise TargetError(f"{self.repo_id}@{self.revision} changed while converting; run again") from None
                        raise explain(e, self.repo_id, what="target repo") from None
                    raise
                # The answer was lost or refused transiently: the commit may still have been
                # applied (a connection closed after the server committed). Never send it twice.
                landed = self._landed(prs_before)
                if landed is not None:
                    log.info("the commit was applied although its answer was lost (%s)", _short(e))
                    self.url = landed
                    break
                if attempt >= ATTEMPTS:
                    raise gave_up(f"committing to {self.repo_id}", e, kind, attempt, self.endpoint) from None
                delay = backoff_delay(attempt, retry_after)
                log.debug("commit: %s; try %d of %d in %.1f s", _short(e), attempt + 1, ATTEMPTS, delay)
                time.sleep(delay)
        self._forget_state()
        return self.url

    def _forget_state(self) -> None:
        state = getattr(self, "_state", None)
        if state is not None:
            state.unlink(missing_ok=True)

    def close(self) -> None:
        # After a stop, uploads still in flight are abandoned (their threads are daemons); after
        # a commit every upload is long done.
        self._upload_pool.shutdown(wait=not self._stop.is_set())

"""A Hub repo as a Source: pinned to one commit, read with HTTP range requests only.

Nothing is downloaded whole and nothing goes to the HF cache: the plan asks for byte ranges, and
each is fetched as parallel requests of CHUNK_BYTES on huggingface_hub's HTTP session, under the
retry policy of hub_http (a range read that breaks off keeps the bytes that arrived and asks for
the rest).
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor

from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

from streamer.errors import Cancelled, HubError, InputError
from streamer.formats import hub_token
from streamer.io.hub_http import (
    REDIRECTS,
    RETRY_STATUS,
    classify,
    explain,
    hub_call,
    hub_endpoint,
    parse_retry_after,
    resolve_url,
    retry_wait,
)
from streamer.io.prefetch import claim
from streamer.io.source import Source, Span

log = logging.getLogger("streamer")

CHUNK_BYTES = 16 * 1024 * 1024  # a large span is fetched as parallel requests of this size
CONNECTIONS = 8  # parallel range requests per source


class RangeError(HubError):
    """The server did not honour a range request exactly; never fall back to a full download."""


class HubSource(Source):
    """The Hub repo REPO_ID at REVISION (None: main), pinned to that revision's commit when opened
    and read with range requests only.

    TOKEN False sends no token at all (a signed-out visitor of a Space); None lets huggingface_hub
    pick HF_TOKEN or the login cache. ENDPOINT is the Hub's URL (None: HF_ENDPOINT). CONNECTIONS
    range requests run at once, each of at most CHUNK_BYTES.
    """

    # Range reads in flight stop at the next block once `cancel` is set, instead of running to the
    # end of their chunk; `on_bytes` hears of bytes as they arrive (in steps of REPORT_BYTES), so
    # that progress moves with the transfer and not once per piece of up to 256 MB.
    reports_bytes = True
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
        self.endpoint = hub_endpoint(endpoint)
        token = hub_token(token)
        self.api = HfApi(endpoint=self.endpoint, token=token)
        self._token = token
        self.chunk_bytes = chunk_bytes
        # A reader the command line started for this repo may hold its first bytes already
        # (streamer.io.prefetch): read at exactly its commit, and ask it first.
        self.prefetched = claim(repo_id, revision, self.endpoint)
        try:
            info = hub_call(
                f"reading {repo_id}'s file list", self.api.model_info, repo_id,
                revision=revision if self.prefetched is None else self.prefetched.commit,
                files_metadata=True, where=self.endpoint,
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
        self.requests = 0  # range requests sent, for tests and the run's JSON summary
        self.bytes_fetched = 0

    def files(self) -> dict[str, int]:
        """Relative path -> size in bytes of every file of the repo at the pinned commit."""
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
            if r.status_code in REDIRECTS and r.headers.get("location"):
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

    def _backoff(self, attempt: int, path: str, why: BaseException | str, retry_after: str | None = None) -> int:
        """The retry policy for range reads, which keep the bytes that arrived and ask for the
        rest, so they cannot simply be called again: waits, or raises once the tries are spent.
        WHY is the failure, or a few words for an answer that raised nothing. Returns ATTEMPT + 1."""
        attempt += 1
        kind = (classify(why)[0] or "network") if isinstance(why, BaseException) else "status"
        wait = parse_retry_after(retry_after) if retry_after else None
        retry_wait(f"reading {path} from {self.repo_id}", attempt, why, kind, wait, where=self.endpoint, cancel=self.cancel)
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
                        attempt = self._backoff(attempt, path, f"HTTP {r.status_code}", r.headers.get("retry-after"))
                        continue
                    if r.status_code == 403 and url != self._base_url(path):
                        with self._lock:  # a signed URL expired: resolve again
                            self._urls.pop(path, None)
                        attempt = self._backoff(attempt, path, "signed URL expired")
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
            except (HubError, InputError, Cancelled):
                raise
            except Exception as e:  # dropped mid-body: keep what arrived, ask for the rest
                log.debug("%s: %s after %d bytes", path, type(e).__name__, got)
                attempt = self._backoff(attempt, path, e)
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

    @property
    def held_bytes(self) -> int:
        """What the start-up reader may hold (see Source.held_bytes)."""
        return 0 if self.prefetched is None else self.prefetched.held_bytes

    def read_into(self, path: str, span: Span, out: memoryview) -> None:
        """Fill OUT (exactly span.size bytes) with bytes SPAN of file PATH."""
        self.read_spans_into(path, [span], [out])

    def read_spans_into(self, path: str, spans: list[Span], outs: list[memoryview]) -> None:
        """Fill each of OUTS with its span of SPANS of file PATH, in parallel range requests."""
        if path not in self._files:
            raise InputError(f"{path} is not in {self.repo_id}@{self.commit}")
        if self.prefetched is not None:
            spans, outs = self.prefetched.serve(path, spans, outs, on_bytes=self.on_bytes)
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
        """Stop the range requests that have not started; those in flight end on their own."""
        self._pool.shutdown(wait=False, cancel_futures=True)


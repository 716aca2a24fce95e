"""HTTP/1.1 mechanics under the Hub endpoints: bodies in and out, throttling, faults, logging.

Clients pool connections, so every response carries a Content-Length and every request body
is consumed (or the connection closed) before the next request is read; otherwise the next
request on the same connection would be parsed from the middle of a body.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from urllib.parse import urlsplit

from . import errors
from .throttle import TokenBucket

logger = logging.getLogger("streamer.localhub")

IO_CHUNK = 1024 * 1024
SENDFILE_CHUNK = 8 * 1024 * 1024
# An unread request body larger than this is not drained after an error: closing the
# connection is cheaper than reading gigabytes we are going to throw away.
MAX_DRAIN = 64 * 1024 * 1024


@dataclass
class RequestRecord:
    """One request as the server saw it (read `LocalHub.request_log`, in arrival order).

    Records are logged when a request arrives and filled in as it is served; status and
    byte counts are final by the time the client has the whole response, `duration` only
    once the server thread is done with it. `status` stays 0 when no answer was sent.
    """

    method: str
    path: str  # URL path, still percent-encoded as sent
    query: str
    time: float  # wall clock when the request line arrived
    repo_id: str | None = None
    file: str | None = None  # path in repo, for resolve requests
    revision: str | None = None
    range: tuple[int, int] | None = None  # inclusive byte range served (or asked, on a 416)
    status: int = 0
    bytes_out: int = 0  # response body bytes actually sent
    bytes_in: int = 0  # request body bytes received
    duration: float = 0.0
    fault: str | None = None  # injected fault kind, if any
    user: str | None = None
    headers: dict[str, str] = field(default_factory=dict, repr=False)


class DroppedConnection(Exception):
    """Raised to abandon a response half-way (fault injection)."""


class BodyReader:
    """Reads a request body once, whether sized or chunked, counting and throttling it."""

    def __init__(self, handler: "TransportHandler"):
        self._rfile = handler.rfile
        self._record = handler.record
        self._state = handler.state
        self._client = handler.link
        self.chunked = "chunked" in handler.headers.get("Transfer-Encoding", "").lower()
        length = handler.headers.get("Content-Length")
        self.length: int | None = None if self.chunked else int(length or 0)
        if self.length is not None and self.length < 0:
            raise ValueError("negative Content-Length")
        self._left = self.length or 0  # bytes left in the body, or in the current chunk
        self.done = not self.chunked and self._left == 0

    @property
    def pending(self) -> int | None:
        """Bytes still unread, None if unknown (chunked)."""
        return None if self.chunked and not self.done else self._left

    def _next_chunk(self) -> None:
        line = self._rfile.readline(1024)
        try:
            self._left = int(line.split(b";")[0].strip(), 16)
        except ValueError:
            raise errors.bad_request("Malformed chunked request body") from None
        if self._left == 0:
            while self._rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                pass  # trailers
            self.done = True

    def read(self, n: int = IO_CHUNK) -> bytes:
        if self.done:
            return b""
        if self.chunked and self._left == 0:
            self._next_chunk()
            if self.done:
                return b""
        bucket: TokenBucket | None = self._state.throttle.bucket("up", self._client)
        if bucket is not None:
            n = min(n, bucket.chunk_size)
        data = self._rfile.read(min(n, self._left))
        if not data:
            raise ConnectionError("client closed the connection in the middle of the body")
        self._left -= len(data)
        self._record.bytes_in += len(data)
        if self._left == 0:
            if self.chunked:
                self._rfile.readline(16)  # CRLF closing the chunk
            else:
                self.done = True
        if bucket is not None:
            bucket.consume(len(data))
        return data

    def read_all(self, limit: int = 2 * 1024**3) -> bytes:
        parts, total = [], 0
        while chunk := self.read():
            total += len(chunk)
            if total > limit:
                raise errors.HubError(413, "Request body too large")
            parts.append(chunk)
        return b"".join(parts)

    def json(self) -> dict:
        try:
            data = json.loads(self.read_all() or b"{}")
        except (ValueError, RecursionError):  # RecursionError: nesting deeper than the parser goes
            raise errors.bad_request("Request body is not valid JSON") from None
        if not isinstance(data, dict):
            raise errors.bad_request("Request body must be a JSON object")
        return data

    def drain(self) -> None:
        while self.read():
            pass


class TransportHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "localhub/1.0"

    @property
    def link(self) -> str:
        """The client's link for a per-client throttle: its address and the address it dialled.

        On loopback every peer is 127.0.0.1, so the nodes of a local cluster are told apart by
        the address each one uses as its endpoint (127.0.0.2, 127.0.0.3 … with --host 0.0.0.0)."""
        try:
            local = self.connection.getsockname()[0]
        except OSError:
            local = ""
        return f"{self.client_address[0]}>{local}"

    state: object  # the server's HubState (server.py builds on this module, not the reverse)
    record: RequestRecord
    body: BodyReader | None
    fault: str | None

    # ------------------------------------------------------------------ connection
    def setup(self) -> None:
        super().setup()
        # Headers and body go out in separate writes: without NODELAY, Nagle + delayed ACK
        # would add ~40 ms to every small response on a kept-alive connection.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.state = self.server.state  # type: ignore[attr-defined]
        self.server.track(self.connection, True)  # type: ignore[attr-defined]

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:
            pass
        finally:
            self.server.track(self.connection, False)  # type: ignore[attr-defined]

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - signature from the base class
        logger.debug("%s - %s", self.address_string(), format % args)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = lambda self: self._handle()  # noqa: E731

    # ------------------------------------------------------------------ one request
    def route(self, path: str, query: str) -> None:  # implemented by the Hub endpoints
        raise NotImplementedError

    def _handle(self) -> None:
        url = urlsplit(self.path)
        # Tokens stay out of the log: it is meant to be printed in test failures.
        headers = {k: v for k, v in self.headers.items() if k.lower() != "authorization"}
        self.record = RequestRecord(self.command, url.path, url.query, time.time(), headers=headers)
        # Logged on arrival and updated in place, with byte counts bumped *before* each send:
        # a client that has its whole response finds a record that already says so.
        self.state.log(self.record)
        started = time.monotonic()
        drawn = self.state.faults.draw(self.command, url.path)
        self.fault, plan = drawn if drawn else (None, None)
        self.record.fault = self.fault
        self.body = None
        try:
            try:
                self.body = BodyReader(self)
            except ValueError:
                self.close_connection = True  # cannot tell where this request's body ends
                raise errors.bad_request("Invalid Content-Length") from None
            if plan is not None and self.fault == "slow":
                time.sleep(plan.slow_seconds)
            if plan is not None and self.fault in ("429", "500", "502", "503", "504"):
                self._injected_error(int(self.fault), plan.retry_after)
            else:
                self.route(url.path, url.query)
        except errors.HubError as exc:
            self._send_error(exc)
        except DroppedConnection:
            self.close_connection = True
        except (ConnectionError, TimeoutError, BrokenPipeError):
            self.close_connection = True
        except Exception:  # a bug in an endpoint must not kill the connection thread silently
            logger.exception("localhub: error handling %s %s", self.command, self.path)
            if not self.record.status:
                self._send_error(errors.HubError(500, "Internal error in localhub"))
            else:
                self.close_connection = True
        finally:
            self.record.duration = time.monotonic() - started

    def _injected_error(self, status: int, retry_after: int) -> None:
        headers = {"Retry-After": str(retry_after)} if status == 429 else {}
        message = "Too Many Requests (injected)" if status == 429 else f"Injected server error {status}"
        raise errors.HubError(status, message, None, headers)

    # ------------------------------------------------------------------ responses
    def _finish_body_before_answer(self) -> None:
        """Consume what is left of the request body, or give up the connection if that is a lot."""
        if self.body is None or self.body.done:
            return
        pending = self.body.pending
        if pending is not None and pending <= MAX_DRAIN:
            try:
                self.body.drain()
                return
            except (errors.HubError, ConnectionError):
                pass
        self.close_connection = True

    def _send_head(self, status: int, headers: dict[str, str], length: int) -> None:
        self._finish_body_before_answer()
        if self.fault == "drop" and (length == 0 or self.command == "HEAD"):
            raise DroppedConnection  # nothing to cut in half: vanish without an answer
        self.record.status = status
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(length))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()

    def _drop_limit(self, length: int) -> int:
        return length // 2 if self.fault == "drop" else length

    def send_bytes(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self._send_head(status, headers or {}, len(body))
        if self.command == "HEAD":
            return
        limit = self._drop_limit(len(body))
        view = memoryview(body)
        sent = 0
        while sent < limit:
            bucket = self.state.throttle.bucket("down", self.link)
            n = min(limit - sent, bucket.chunk_size if bucket else limit)
            if bucket is not None:
                bucket.consume(n)
            self._counted_write(view[sent : sent + n])
            sent += n
        if limit < len(body):
            raise DroppedConnection

    def send_json(self, status: int, data: object, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(data).encode()
        self.send_bytes(status, body, {"Content-Type": "application/json; charset=utf-8", **(headers or {})})

    def send_file_range(self, status: int, path: str, offset: int, length: int, headers: dict[str, str]) -> None:
        """Stream a slice of a file with zero-copy `sendfile`, in paced chunks when throttled."""
        with open(path, "rb") as fh:
            self._send_head(status, headers, length)
            if self.command == "HEAD":
                return
            limit = self._drop_limit(length)
            sent = 0
            while sent < limit:
                bucket = self.state.throttle.bucket("down", self.link)  # re-read: the limit may change mid-transfer
                want = min(bucket.chunk_size if bucket else SENDFILE_CHUNK, limit - sent)
                if bucket is not None:
                    bucket.consume(want)  # paced, then sent zero-copy like a real file server
                self.record.bytes_out += want
                n = 0
                try:
                    n = self.connection.sendfile(fh, offset + sent, want)
                finally:
                    self.record.bytes_out -= want - n
                if not n:
                    raise ConnectionError(f"short read or write on {path}")
                sent += n
            if limit < length:
                raise DroppedConnection

    def _counted_write(self, data: memoryview) -> None:
        self.record.bytes_out += len(data)
        try:
            self.wfile.write(data)
        except OSError:
            self.record.bytes_out -= len(data)
            raise

    def _send_error(self, exc: errors.HubError) -> None:
        headers = dict(exc.headers)
        if exc.code:
            headers["X-Error-Code"] = exc.code
        if self.command == "HEAD" and "X-Error-Message" not in headers:
            headers["X-Error-Message"] = exc.message  # HEAD answers have no body to carry it
        try:
            self.send_json(exc.status, {"error": exc.message, **exc.body}, headers)
        except DroppedConnection:
            self.close_connection = True
        except OSError:
            self.close_connection = True

"""The webhook trigger for mirroring jobs: `python -m streamer mirror jobs.toml --serve`.

A dependency-free `http.server` listener that speaks the Hugging Face Hub's webhook protocol
(payload version 3, the format `huggingface_hub.WebhookPayload` models):

- `POST /webhook` (or `/`): the Hub's request. `X-Webhook-Secret` must equal the configured
  secret: missing -> 401, wrong -> 403 (as huggingface_hub's WebhooksServer answers). A
  `repo.content` (or `repo` create/update) event on a model repo that some job uses as its source
  queues those jobs, answered at once with 202 `{"queued": [...]}`; anything else gets 200
  `{"queued": [], "ignored": "why"}`. When `updatedRefs` is present, only jobs that follow one of
  the updated branches/tags start (a job pinned to a commit sha never does).
- `GET /health`: 200 `{"ok": true}` (no secret; for load balancers).
- `GET /jobs` (secret required): each job's state (idle/queued/running) and last result.

Queued jobs run on `parallel` worker threads through the same MirrorRunner as a one-off run, so
each one still starts with the cheap skip check: a webhook for a commit that is already mirrored
(or a duplicate delivery) costs two small requests. A job triggered while it runs is run once
more after it finishes (several triggers coalesce into one).
"""

from __future__ import annotations

import hmac
import io
import json
import logging
import signal
import socket
import sys
import threading
import time
from collections import deque
from contextvars import copy_context
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from streamer.formats import is_commit_sha
from streamer.mirror.jobs import MirrorJob
from streamer.mirror.runner import JobResult, MirrorRunner

log = logging.getLogger(__name__)

MAX_BODY = 1 << 20  # Hub payloads are a few kB
MAX_DEPTH = 32  # a Hub payload nests 4 levels; deeper JSON is refused before it is looked at
# Seconds a client has to send its whole request (headers and body). A per-read timeout alone
# would let a client that trickles a byte at a time hold a thread forever.
READ_TIMEOUT = 5.0
MAX_CONNECTIONS = 64  # connections served at once; more are closed at once
WEBHOOK_PATHS = ("/webhook", "/")
TRIGGER_SCOPES = ("repo.content", "repo")


def _text(value) -> str:
    return value if isinstance(value, str) else ""


def _too_deep(value, limit: int) -> bool:
    """Whether VALUE nests lists/objects more than LIMIT levels (walked without recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > limit:
                return True
            children = item.values() if isinstance(item, dict) else item
            stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return False


def parse_payload(body: bytes) -> tuple[dict | None, str | None]:
    """(payload, None), or (None, why it is refused) for a body that is not a sane JSON object.

    :param body: the request's body, as received."""
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, ValueError):
        return None, "body is not JSON"
    except RecursionError:
        return None, f"body nests deeper than {MAX_DEPTH} levels"
    if not isinstance(payload, dict):
        return None, "body is not a JSON object"
    if _too_deep(payload, MAX_DEPTH):
        return None, f"body nests deeper than {MAX_DEPTH} levels"
    return payload, None


def match_payload(jobs: list[MirrorJob], payload: dict) -> tuple[list[MirrorJob], str]:
    """The jobs a Hub webhook payload should start, and a sentence saying why (or why none).

    :param jobs: the jobs of the jobs file.
    :param payload: the webhook's JSON body (version 3), untrusted: every field's type is checked."""
    event = payload.get("event")
    repo = payload.get("repo")
    if not isinstance(event, dict) or not isinstance(repo, dict):
        return [], "not a Hub webhook payload (no event/repo objects)"
    # Every field is checked for its type: the payload is untrusted JSON, even when signed.
    scope, action = _text(event.get("scope")), _text(event.get("action"))
    name, rtype = repo.get("name"), _text(repo.get("type"))
    if scope not in TRIGGER_SCOPES:
        return [], f"event scope {scope!r} does not change a source"
    if action not in ("update", "create"):
        return [], f"event {scope}/{action} ignored" + (
            " (repo moved: update the jobs file)" if action == "move" else ""
        )
    if rtype != "model" or not isinstance(name, str):
        return [], f"{rtype or 'unknown'} repo {_text(name) or '?'}: jobs mirror model repos"
    matching = [j for j in jobs if j.source.lower() == name.lower()]
    if not matching:
        return [], f"no job has {name} as its source"
    followed = [j for j in matching if not is_commit_sha(j.source_revision or "")]
    if not followed:
        return [], f"jobs on {name} are pinned to a commit"
    refs = payload.get("updatedRefs")
    if refs is not None and not isinstance(refs, list):
        return [], "updatedRefs is not a list"
    if refs:
        updated = {r["ref"] for r in refs if isinstance(r, dict) and isinstance(r.get("ref"), str)}

        def follows(job: MirrorJob) -> bool:
            rev = job.source_revision or "main"
            return bool({rev, f"refs/heads/{rev}", f"refs/tags/{rev}"} & updated)

        selected = [j for j in followed if follows(j)]
        if not selected:
            return [], f"{name}: updated {', '.join(sorted(map(str, updated)))}, which no job follows"
    else:
        selected = followed
    head = repo.get("headSha") or repo.get("head_sha")
    at = f" at {head[:7]}" if isinstance(head, str) and head else ""
    return selected, f"{name} updated{at}"


class _DeadlineReader(io.RawIOBase):
    """The socket, read with one deadline for the whole request: each read waits at most until
    then, and a read past it fails (TimeoutError, which http.server answers by closing)."""

    def __init__(self, sock: socket.socket, deadline: float):
        self.sock = sock
        self.deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request was not received in time")
        self.sock.settimeout(left)
        return self.sock.recv_into(b)


class _Handler(BaseHTTPRequestHandler):
    server_version = "streamer-mirror"
    protocol_version = "HTTP/1.1"
    listener: "WebhookListener"  # set on the subclass made per listener

    def setup(self) -> None:
        super().setup()
        # One request per connection (a Hub delivery is one POST), received within READ_TIMEOUT.
        self.rfile.close()
        self.rfile = io.BufferedReader(_DeadlineReader(self.connection, time.monotonic() + READ_TIMEOUT))

    def log_message(self, fmt, *args):  # route the access log to logging, at debug level
        log.debug("webhook %s - %s", self.address_string(), fmt % args)

    def _send(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.close_connection = True
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)
        except OSError:  # the client went away: nothing to answer
            pass

    def _authorized(self) -> bool:
        given = self.headers.get("X-Webhook-Secret")
        if given is None:
            self._send(401, {"error": "x-webhook-secret header not set."})
            return False
        if not hmac.compare_digest(given.encode(), self.listener.secret.encode()):
            self._send(403, {"error": "Invalid webhook secret."})
            return False
        return True

    def do_GET(self):
        path = urlsplit(self.path).path
        if path == "/health":
            return self._send(200, {"ok": True})
        if path == "/jobs":
            if self._authorized():
                self._send(200, self.listener.status())
            return
        self._send(404, {"error": f"no such endpoint; POST webhooks to {WEBHOOK_PATHS[0]}"})

    def do_POST(self):
        path = urlsplit(self.path).path
        length = self.headers.get("Content-Length")
        if path not in WEBHOOK_PATHS:
            self.close_connection = True
            return self._send(404, {"error": f"no such endpoint; POST webhooks to {WEBHOOK_PATHS[0]}"})
        if not self._authorized():
            self.close_connection = True  # the body was not read
            return
        if length is None or not length.isdigit():
            self.close_connection = True
            return self._send(411, {"error": "Content-Length required"})
        if int(length) > MAX_BODY:
            self.close_connection = True
            return self._send(413, {"error": "payload too large"})
        try:
            body = self.rfile.read(int(length))
        except (TimeoutError, OSError):
            return self._send(408, {"error": f"the body was not received within {READ_TIMEOUT:g} s"})
        if len(body) < int(length):
            return self._send(400, {"error": "body shorter than its Content-Length"})
        payload, problem = parse_payload(body)
        if problem is not None:
            return self._send(400, {"error": problem})
        try:
            jobs, why = match_payload(self.listener.jobs, payload)
        except Exception:  # an unexpected shape: a 400 for the sender, never a dropped connection
            log.warning("webhook payload not understood", exc_info=log.isEnabledFor(logging.DEBUG))
            return self._send(400, {"error": "payload not understood: expected a Hub webhook (version 3)"})
        if not jobs:
            log.info("webhook ignored: %s", why)
            return self._send(200, {"queued": [], "ignored": why})
        names = self.listener.submit([j.name for j in jobs], why)
        self._send(202, {"queued": names, "reason": why})


class _Server(ThreadingHTTPServer):
    """A thread per connection, at most MAX_CONNECTIONS at once: a flood of idle connections is
    closed on arrival instead of growing threads without bound."""

    daemon_threads = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)

    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class WebhookListener:
    """Serve the webhook endpoint and run triggered jobs in the background.

    :param jobs: the jobs a webhook may start.
    :param runner: runs them (`parallel` of them at once, each after its up-to-date check).
    :param secret: the value the Hub sends as X-Webhook-Secret (required).
    :param host: the address to listen on.
    :param port: the port to listen on (0: a free one, then in `port`).
    :param json_lines: print each job's result as one JSON line on stdout.

    >>> listener = WebhookListener(jobs, MirrorRunner(token=...), secret="…", port=0).start()
    >>> listener.url, listener.wait_idle(timeout=60), listener.results
    """

    def __init__(
        self,
        jobs: list[MirrorJob],
        runner: MirrorRunner,
        *,
        secret: str,
        host: str = "127.0.0.1",
        port: int = 8000,
        json_lines: bool = False,
    ):
        if not secret:
            raise ValueError("a webhook secret is required")
        self.jobs = list(jobs)
        self.by_name = {j.name: j for j in self.jobs}
        self.runner = runner
        self.secret = secret
        self.host = host
        self.port = port
        self.json_lines = json_lines
        self.results: dict[str, JobResult] = {}  # last result per job
        self.history: deque[JobResult] = deque(maxlen=200)
        self._state: dict[str, str] = {}  # name -> queued | running | running+queued
        self._queue: deque[str] = deque()
        self._cv = threading.Condition()
        self._stopping = False
        self._workers: list[threading.Thread] = []
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> "WebhookListener":
        """Listen and start the worker threads; returns the listener (its `url` is now known)."""
        handler = type("Handler", (_Handler,), {"listener": self})
        self._server = _Server((self.host, self.port), handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="streamer-webhook", daemon=True)
        self._thread.start()
        for i in range(self.runner.parallel):
            # each worker in a copy of the caller's context: a `with nonfinite_policy(...)` around
            # the listener applies to its conversions, as around MirrorRunner.run
            t = threading.Thread(target=copy_context().run, args=(self._work,), name=f"streamer-mirror-{i}", daemon=True)
            t.start()
            self._workers.append(t)
        return self

    @property
    def url(self) -> str:
        """The URL the Hub's webhook should POST to."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}{WEBHOOK_PATHS[0]}"

    def stop(self, *, cancel: bool = True, timeout: float = 30.0) -> None:
        """Stop listening and the workers; running conversions are cancelled (nothing half-done
        is published).

        :param cancel: cancel running conversions (False: let them finish).
        :param timeout: seconds to wait for each worker thread."""
        with self._cv:
            self._stopping = True
            self._queue.clear()
            self._cv.notify_all()
        if cancel:
            self.runner.cancel.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        for t in self._workers:
            t.join(timeout)

    def serve_forever(self, *, catch_up: bool = False) -> int:
        """Start, and block until SIGINT/SIGTERM; returns the exit code (0).

        :param catch_up: queue every job once at startup (up-to-date ones are skipped cheaply)."""
        self.start()
        print(f"streamer mirror: listening on {self.url} for {len(self.jobs)} job(s): "
              f"{', '.join(self.by_name)}", file=sys.stderr, flush=True)
        stop = threading.Event()
        previous = None
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
        try:
            if catch_up:
                self.submit(list(self.by_name), "catch-up at startup")
            while not stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
            print("streamer mirror: stopping (running conversions are cancelled)", file=sys.stderr, flush=True)
            self.stop()
        return 0

    # -- the queue ----------------------------------------------------------------------------

    def submit(self, names: list[str], why: str = "") -> list[str]:
        """Queue jobs by name; a job already queued is not queued twice, a running one reruns once.

        :param names: the jobs' names (KeyError for an unknown one).
        :param why: what triggered them, for the log.
        Returns NAMES."""
        with self._cv:
            for name in names:
                if name not in self.by_name:
                    raise KeyError(name)
                state = self._state.get(name)
                if state is None:
                    self._state[name] = "queued"
                    self._queue.append(name)
                elif state == "running":
                    self._state[name] = "running+queued"
            self._cv.notify_all()
        log.info("queued %s: %s", ", ".join(names), why)
        return list(names)

    def _work(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._stopping:
                    self._cv.wait()
                if self._stopping:
                    return
                name = self._queue.popleft()
                self._state[name] = "running"
            result = self.runner.run_one(self.by_name[name])
            if self.json_lines:
                print(json.dumps(result.to_dict()), flush=True)
            with self._cv:
                self.results[name] = result
                self.history.append(result)
                if self._state.get(name) == "running+queued" and not self._stopping:
                    self._state[name] = "queued"
                    self._queue.append(name)
                else:
                    self._state.pop(name, None)
                self._cv.notify_all()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until no job is queued or running; False on timeout.

        :param timeout: seconds to wait at most (None: no limit)."""
        with self._cv:
            return self._cv.wait_for(lambda: not self._state, timeout)

    def status(self) -> dict:
        """Each job's state (idle, queued, running, running+queued) and last result, and the
        recent results (what GET /jobs answers)."""
        with self._cv:
            return {
                "jobs": {
                    name: {
                        "state": self._state.get(name, "idle"),
                        "last": self.results[name].to_dict() if name in self.results else None,
                    }
                    for name in self.by_name
                },
                "history": [r.to_dict() for r in self.history],
            }

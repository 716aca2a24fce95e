"""The mirroring webhook listener under hostile input: every request gets an answer (400 for a
malformed payload), nothing crashes a handler, and idle or trickling connections are closed."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import pytest

from streamer.mirror import webhook
from streamer.mirror.jobs import parse_jobs
from streamer.mirror.runner import JobResult
from streamer.mirror.webhook import WebhookListener, match_payload, parse_payload

SECRET = "s3cret"


class FakeRunner:
    parallel = 1

    def __init__(self):
        self.cancel = threading.Event()
        self.ran: list[str] = []

    def run_one(self, job):
        self.ran.append(job.name)
        return JobResult(job.name, "skipped", job.source, job.target, job.scheme, reason="up to date")


@pytest.fixture
def listener():
    jobs = parse_jobs({"job": [{"name": "m", "source": "org/m", "target": "acme/m", "scheme": "W4A16"}]})
    runner = FakeRunner()
    server = WebhookListener(jobs, runner, secret=SECRET, port=0).start()
    server.fake_runner = runner
    try:
        yield server
    finally:
        server.stop()


def _post(listener, body: bytes, secret: str | None = SECRET, timeout: float = 10):
    conn = http.client.HTTPConnection("127.0.0.1", listener.port, timeout=timeout)
    headers = {"Content-Type": "application/json"}
    if secret is not None:
        headers["X-Webhook-Secret"] = secret
    conn.request("POST", "/webhook", body=body, headers=headers)
    r = conn.getresponse()
    out = r.status, json.loads(r.read() or b"null")
    conn.close()
    return out


def _event(**repo) -> dict:
    return {"event": {"scope": "repo.content", "action": "update"},
            "repo": {"type": "model", "name": "org/m", **repo}}  # fmt: skip


# Authenticated payloads of the wrong shapes: each must get an answer, never a dropped connection.
MALFORMED = {
    "ref is a list": {**_event(), "updatedRefs": [{"ref": ["x"]}]},
    "ref is an object": {**_event(), "updatedRefs": [{"ref": {"a": 1}}]},
    "refs not a list": {**_event(), "updatedRefs": {"ref": "main"}},
    "name is a list": _event(name=["org/m"]),
    "name is an object": _event(name={"org": "m"}),
    "type is a list": _event(type=["model"]),
    "scope is an object": {"event": {"scope": {"x": 1}, "action": "update"}, "repo": {"type": "model", "name": "org/m"}},
    "event is a list": {"event": ["repo.content"], "repo": {"name": "org/m"}},
    "nulls": {"event": None, "repo": None, "updatedRefs": None},
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_payloads_get_an_answer(listener, case):
    status, body = _post(listener, json.dumps(MALFORMED[case]).encode())
    assert status in (200, 400), (status, body)
    assert listener.fake_runner.ran == []
    # the listener still works
    assert _post(listener, json.dumps(_event()).encode())[0] == 202


@pytest.mark.parametrize("depth", [webhook.MAX_DEPTH + 1, 5000, 200_000])
def test_deeply_nested_json_is_refused(listener, depth):
    nested = b"[" * depth + b"]" * depth
    body = b'{"event": {"scope": "repo.content", "action": "update"}, "repo": ' + nested + b"}"
    if len(body) > webhook.MAX_BODY:
        body = b"[" * (webhook.MAX_BODY // 2 - 1) + b"]" * (webhook.MAX_BODY // 2 - 1)
    status, answer = _post(listener, body)
    assert status == 400 and "nests deeper" in answer["error"], answer
    assert _post(listener, json.dumps(_event()).encode())[0] == 202


def test_odd_but_harmless_fields_still_trigger(listener):
    assert _post(listener, json.dumps(_event(headSha=12)).encode())[0] == 202  # headSha is only logged


def test_parse_payload_sentences():
    assert parse_payload(b"not json")[1] == "body is not JSON"
    assert parse_payload(b"\xff\xfe")[1] == "body is not JSON"
    assert parse_payload(b"[1, 2]")[1] == "body is not a JSON object"
    assert parse_payload(json.dumps(_event()).encode())[1] is None
    jobs = parse_jobs({"job": [{"name": "m", "source": "org/m", "target": "acme/m", "scheme": "W4A16"}]})
    for case, payload in MALFORMED.items():
        selected, why = match_payload(jobs, payload)  # never raises
        assert selected == [] and isinstance(why, str), case


def test_oversized_body_is_refused(listener):
    conn = http.client.HTTPConnection("127.0.0.1", listener.port, timeout=10)
    conn.putrequest("POST", "/webhook")
    conn.putheader("X-Webhook-Secret", SECRET)
    conn.putheader("Content-Length", str(webhook.MAX_BODY + 1))
    conn.endheaders()
    assert conn.getresponse().status == 413
    conn.close()


def _is_closed(sock: socket.socket, wait: float) -> bool:
    """Whether the server closed SOCK within WAIT seconds (EOF or reset), reading what it sent."""
    sock.settimeout(wait)
    try:
        while True:
            data = sock.recv(4096)
            if not data:
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False


def test_idle_and_trickling_connections_are_closed(listener, monkeypatch):
    monkeypatch.setattr(webhook, "READ_TIMEOUT", 1.0)
    idle = []
    for _ in range(20):  # headers started, never finished
        s = socket.create_connection(("127.0.0.1", listener.port))
        s.sendall(b"POST /webhook HTTP/1.1\r\nHost: x\r\n")
        idle.append(s)
    trickle = socket.create_connection(("127.0.0.1", listener.port))
    body = json.dumps(_event()).encode()
    trickle.sendall(b"POST /webhook HTTP/1.1\r\nHost: x\r\nX-Webhook-Secret: " + SECRET.encode()
                    + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n")  # fmt: skip
    t0 = time.monotonic()
    stop = threading.Event()

    def drip():  # one byte every 0.2 s: each read is quick, the whole never arrives in time
        for b in body:
            if stop.wait(0.2):
                return
            try:
                trickle.send(bytes([b]))
            except OSError:
                return

    threading.Thread(target=drip, daemon=True).start()
    try:
        assert all(_is_closed(s, wait=6) for s in idle)
        assert _is_closed(trickle, wait=6)
        assert time.monotonic() - t0 < 8  # the generous bound of 'closed promptly'
        assert listener.fake_runner.ran == []
        # a well-behaved client is still served
        assert _post(listener, json.dumps(_event()).encode())[0] == 202
    finally:
        stop.set()
        for s in [*idle, trickle]:
            s.close()


def test_connection_flood_is_bounded(listener, monkeypatch):
    monkeypatch.setattr(webhook, "READ_TIMEOUT", 3.0)
    before = threading.active_count()
    socks = []
    try:
        for _ in range(webhook.MAX_CONNECTIONS + 40):
            socks.append(socket.create_connection(("127.0.0.1", listener.port)))
        time.sleep(0.5)
        assert threading.active_count() - before <= webhook.MAX_CONNECTIONS + 2
        # the extra ones were closed on arrival
        assert sum(_is_closed(s, wait=0.2) for s in socks) >= 40
    finally:
        for s in socks:
            s.close()
    time.sleep(3.5)  # the held ones time out and free their slots
    assert _post(listener, json.dumps(_event()).encode())[0] == 202

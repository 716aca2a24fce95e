"""The fast-start reader (streamer.io.prefetch) against a real localhub: what it reads is served to
the run once and never downloaded again, the output is byte-identical to a run without it, the
token never shows in its argv, and nothing outlives the run (success, error, Ctrl-C, SIGKILL).
No timing is asserted: how much the reader gains is bench/bench_hub.py's business."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import huggingface_hub
import psutil
import pytest

from streamer.cli import main as cli
from streamer.io import prefetch
from streamer.io.source import Span
from streamer.localhub import LocalHub

ALICE = "hf_alice_token_0123456789"
SOURCE = "acme/tiny-llama"
REPO_ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not prefetch.available(), reason="the reader needs Linux (memfd)")


@pytest.fixture
def hub(tmp_path, monkeypatch, llama_ckpt):
    with LocalHub(tmp_path / "hub") as h:
        h.add_user("alice", ALICE, orgs=["acme"])
        h.seed_repo(SOURCE, llama_ckpt)
        monkeypatch.setenv("HF_ENDPOINT", h.url)
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
        monkeypatch.delenv("HF_TOKEN", raising=False)  # the token goes on the command line
        monkeypatch.delenv(prefetch.ENABLE_VARIABLE, raising=False)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HOME", str(tmp_path / "hf_home"))
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", h.url)
        monkeypatch.setattr(
            huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE", h.url + "/{repo_id}/resolve/{revision}/{filename}"
        )
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True, raising=False)
        yield h


def _by_reader(record) -> bool:
    agent = next((v for k, v in record.headers.items() if k.lower() == "user-agent"), "")
    return "streamer/prefetch" in agent


def _shard_gets(log, reader: bool | None = None) -> list:
    """Range GETs of safetensors files (by the reader, by the run, or both when READER is None)."""
    return [
        r for r in log
        if r.method == "GET" and r.range is not None and (r.file or "").endswith(".safetensors")
        and (reader is None or _by_reader(r) == reader)
    ]  # fmt: skip


def _memfd_holders(parent_pid: int) -> list[int]:
    """Processes that still hold the reader memory of the streamer process PARENT_PID."""
    name = f"memfd:streamer-prefetch-{parent_pid}"
    holders = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if any(name in os.readlink(fd) for fd in (proc / "fd").iterdir()):
                holders.append(int(proc.name))
        except OSError:  # gone meanwhile, or not ours to look at
            continue
    return holders


def _streamer(*args: str, env: dict) -> subprocess.Popen:
    """`python -m streamer ARGS` as a user starts it: a fresh process, which starts the reader."""
    cmd = [sys.executable, "-m", "streamer", *args, "--device", "cpu", "-q", "--token", ALICE]
    return subprocess.Popen(cmd, env={**env, "PYTHONPATH": str(REPO_ROOT)}, cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip


def _reader_of(proc: subprocess.Popen, timeout: float = 60) -> psutil.Process:
    """The reader process the streamer process PROC started."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        for child in psutil.Process(proc.pid).children():
            try:
                if "streamer.io.prefetch" in child.cmdline():
                    return child
            except psutil.Error:
                continue
        time.sleep(0.01)
    raise AssertionError(f"no reader was started (exit {proc.poll()}): {proc.stderr.read().decode()[-3000:]}")


def test_reader_serves_what_it_read_once(hub, llama_ckpt):
    reader = prefetch.Prefetch.launch(SOURCE, None, token=ALICE, limit=64 << 20)
    try:
        child = psutil.Process(reader.proc.pid)
        assert ALICE not in " ".join(child.cmdline()) and ALICE not in str(child.environ())
        assert prefetch.claim(SOURCE, "main", hub.url) is None  # another revision: not this reader
        assert prefetch.claim(SOURCE, None, hub.url) is reader
        assert prefetch.claim(SOURCE, None, hub.url) is None  # claimed once
        assert reader.commit == hub.commits(SOURCE)[0].sha

        names = sorted(p.name for p in llama_ckpt.glob("*.safetensors")) + ["config.json", "model.safetensors.index.json"]
        data = {n: (llama_ckpt / n).read_bytes() for n in names}
        deadline = time.monotonic() + 60  # the reader reads the whole (tiny) model
        while reader.bytes_received < sum(map(len, data.values())) and time.monotonic() < deadline:
            reader.serve(names[0], [], [])  # takes in its reports
            time.sleep(0.05)
        assert reader.bytes_received == sum(map(len, data.values()))

        # Read as the catalog and the pipeline do: length, header, tensors in pieces.
        for name, want in data.items():
            got = bytearray(len(want))
            view = memoryview(got)
            cuts = sorted({0, 8, min(len(want), 1000), len(want) // 2, len(want)})
            spans = [Span(a, b) for a, b in zip(cuts, cuts[1:])]
            told = []
            gaps, outs = reader.serve(name, spans, [view[s.start : s.end] for s in spans],
                                      on_bytes=lambda n, rated=True: told.append((n, rated)))  # fmt: skip
            assert gaps == [] and outs == [] and bytes(got) == want, name
            assert sum(n for n, _ in told) == len(want) and not any(rated for _, rated in told), told
        assert reader.bytes_served == reader.bytes_received
        assert reader.proc.poll() is None  # nothing was missing: the reader was never stopped

        # Each byte is served once: asked again, all of it is left to read over HTTP, which
        # stops the reader.
        again = bytearray(100)
        gaps, outs = reader.serve(names[0], [Span(10, 110)], [memoryview(again)])
        assert gaps == [Span(10, 110)] and len(outs) == 1 and len(outs[0]) == 100
        assert reader.proc.poll() is not None
        assert all(r.status == 206 for r in _shard_gets(hub.request_log, reader=True))
    finally:
        reader.close()
    assert reader.proc.returncode is not None and _memfd_holders(os.getpid()) == []


def test_a_reader_without_access_offers_nothing(hub):
    reader = prefetch.Prefetch.launch("acme/no-such-repo", None, token=ALICE, limit=1 << 20)
    try:
        assert prefetch.claim("acme/no-such-repo", None, hub.url) is None
        assert reader.proc.poll() is not None  # it ended when it found nothing to read
    finally:
        reader.close()
    assert _memfd_holders(os.getpid()) == []


def test_a_run_with_the_reader_is_identical_and_downloads_nothing_twice(hub, monkeypatch):
    proc = _streamer(SOURCE, "alice/with-reader", "--scheme", "FP8_DYNAMIC", env=dict(os.environ))
    child = _reader_of(proc)
    pid = proc.pid
    try:
        argv, environ = " ".join(child.cmdline()), str(child.environ())
    except psutil.Error:  # it finished meanwhile: then its argv cannot be looked at
        pytest.fail("the reader ended before it could be looked at")
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err.decode()[-3000:]
    assert ALICE not in argv and ALICE not in environ  # the token went on its stdin
    assert _memfd_holders(pid) == [] and not child.is_running()
    with_reader = hub.request_log

    hub.clear_log()
    monkeypatch.setenv(prefetch.ENABLE_VARIABLE, "0")
    assert cli.main([SOURCE, "alice/no-reader", "--scheme", "FP8_DYNAMIC", "--device", "cpu", "-q", "--token", ALICE]) == 0
    without = hub.request_log

    a, b = hub.files("alice/with-reader"), hub.files("alice/no-reader")
    assert a.keys() == b.keys()
    for f in a:
        if f.endswith((".safetensors", ".json")):
            assert hub.read_file("alice/with-reader", f) == hub.read_file("alice/no-reader", f), f

    def fetched(log, reader=None):
        return sum(r.bytes_out for r in _shard_gets(log, reader))

    assert not _shard_gets(without, reader=True)
    assert fetched(with_reader, reader=True) > 0
    # What the reader fetched was not fetched again: the two together moved no more bytes than
    # the run alone does (which reads a few bytes twice by design: fused partners in two shards).
    assert fetched(with_reader, reader=False) < fetched(without)
    assert fetched(with_reader) <= fetched(without)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "Ctrl-C"])
def test_the_reader_ends_with_its_parent(hub, sig):
    hub.set_throttle(down_bytes_per_s=200_000)  # the reader is still reading when the parent dies
    try:
        proc = _streamer(SOURCE, "alice/killed", "--scheme", "FP8_DYNAMIC", env=dict(os.environ))
        child = _reader_of(proc)
        deadline = time.monotonic() + 60
        while not _shard_gets(hub.request_log, reader=True) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _memfd_holders(proc.pid), "the reader memory is not where the test looks"
        os.kill(proc.pid, sig)
        proc.communicate(timeout=60)
        psutil.wait_procs([child], timeout=20)
        assert not child.is_running()
        assert _memfd_holders(proc.pid) == []
    finally:
        hub.set_throttle(None, None)


def test_the_reader_ends_when_the_run_fails(hub):
    proc = _streamer(SOURCE, "alice/failed", "--scheme", "NO_SUCH_SCHEME", env=dict(os.environ))
    child = _reader_of(proc)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 2 and b"NO_SUCH_SCHEME" in err, err.decode()[-3000:]
    psutil.wait_procs([child], timeout=20)
    assert not child.is_running()
    assert _memfd_holders(proc.pid) == []


def test_the_readers_bytes_count_against_the_memory_budget(hub):
    """--max-memory bounds the run with the reader too: what it holds is reserved in the budget
    (half of it at most) until the run has taken it."""
    budget = 8_000_000
    proc = _streamer(SOURCE, "alice/bounded", "--scheme", "FP8_DYNAMIC", "--max-memory", str(budget), "--json",
                     env=dict(os.environ))  # fmt: skip
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err.decode()[-3000:]
    summary = json.loads(out)
    assert _shard_gets(hub.request_log, reader=True)  # the reader did read
    assert budget // 2 <= summary["peak_buffered_bytes"] <= budget


def test_a_small_file_read_before_the_commit_is_known_is_kept_only_from_that_commit(hub, llama_ckpt):
    """The index and config.json are asked for at the revision's name while the file list
    resolves it: bytes the Hub answered from another commit (the branch moved in between) are
    read again at the commit the run reads."""
    import mmap as mmap_module

    from huggingface_hub.utils import build_hf_headers

    commit = hub.commits(SOURCE)[0].sha
    name = "config.json"
    want = (llama_ckpt / name).read_bytes()
    reports = []
    config = {"repo_id": SOURCE, "revision": None, "endpoint": hub.url, "resuming": False, "limit": 1 << 20,
              "headers": build_hf_headers(token=ALICE, user_agent={"streamer": "prefetch"})}  # fmt: skip
    reader = prefetch._Reader(config, mmap_module.mmap(-1, 1 << 20), lambda **r: reports.append(r))
    assert reader.peek(name) == (commit, want)  # main's commit, named by the Hub's answer
    reader.commit = commit

    asked = len(hub.request_log)
    assert reader.keep(name, len(want), commit, want) == want  # the same commit: kept as it came
    assert len(hub.request_log) == asked
    assert reader.keep(name, len(want), "0" * 40, b"{}") == want  # another commit: read again
    again = hub.request_log[asked:]
    assert [r.revision for r in again] == [commit] and again[0].range is not None
    assert [r["got"][:3] for r in reports if "got" in r] == [[name, 0, len(want)]] * 2


def test_no_reader_behind_a_proxy(hub, monkeypatch):
    """The reader speaks to the Hub directly only: behind a proxy it is not started, and the run
    reads through huggingface_hub (which honours the proxy) alone."""
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    before = {p.pid for p in psutil.Process().children()}
    assert prefetch.Prefetch.launch(SOURCE, None, token=ALICE, limit=1 << 20) is None
    assert prefetch.claim(SOURCE, None, hub.url) is None
    assert all(not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
               for p in psutil.Process().children() if p.pid not in before)  # fmt: skip
    assert _memfd_holders(os.getpid()) == []

"""Progress as the bytes move: "quantized" per tensor, "uploaded" per chunk of an upload (LFS
and Xet), exact totals whatever the retries, and a cancel that ends uploads in flight."""

from __future__ import annotations

import os
import threading
import time

import huggingface_hub
import pytest
from huggingface_hub import constants

from streamer.engine import pipeline
from streamer.engine.convert import convert
from streamer.engine.progress import Progress, ProgressEvent
from streamer.errors import Cancelled
from streamer.io.hub_sink import HubSink, _DirectXet
from streamer.localhub import LocalHub

ALICE = "hf_alice_token_0123456789"
SOURCE = "acme/medium-llama"

# huggingface_hub itself passes file objects as `data=` to httpx for LFS PUTs.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")


@pytest.fixture
def hub(tmp_path, monkeypatch):
    with LocalHub(tmp_path / "hub") as h:
        h.add_user("alice", ALICE, orgs=["acme"])
        monkeypatch.setenv("HF_ENDPOINT", h.url)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
        monkeypatch.setattr(huggingface_hub.constants, "HF_HOME", str(tmp_path / "hf_home"))
        monkeypatch.setenv("HF_TOKEN", ALICE)
        monkeypatch.setattr(constants, "ENDPOINT", h.url)
        monkeypatch.setattr(
            constants, "HUGGINGFACE_CO_URL_TEMPLATE", h.url + "/{repo_id}/resolve/{revision}/{filename}"
        )
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_PROGRESS_BARS", True)
        yield h


@pytest.fixture(params=["lfs", "xet"])
def transfer(request, monkeypatch):
    """Uploads through LFS (hf_xet disabled) or through Xet (streamer's own upload commit)."""
    if request.param == "xet":
        pytest.importorskip("hf_xet")
        monkeypatch.delenv("HF_HUB_DISABLE_XET", raising=False)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)
        assert _DirectXet.load() is not None, "the installed hf_xet/huggingface_hub lack the upload commit API"
    else:
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        assert _DirectXet.load() is None
    return request.param


def _shard(sink: HubSink, size: int):
    """A shard of SIZE random bytes (Xet would deduplicate repeats away), written and ready to close."""
    writer = sink.open_shard("model.safetensors", size)
    writer.write_at(0, os.urandom(size))
    return writer


def _sink(hub, repo: str) -> HubSink:
    sink = HubSink(repo, token=ALICE, endpoint=hub.url)
    sink.check()
    sink.begin()
    return sink


# --------------------------------------------------------------------------------------------
# quantized: per tensor
# --------------------------------------------------------------------------------------------


def test_quantized_moves_per_tensor_and_sums_to_each_piece(llama_ckpt, tmp_path, monkeypatch):
    events: list[ProgressEvent] = []
    progress = Progress(listeners=[lambda e: events.append(e) if e.stage == "quantize" else None])
    pieces = []
    quantize = pipeline.Runner._quantize

    def watched(self, piece, *args):
        # one piece at a time (the quantizing thread): the events between are this piece's
        before = len(events)
        quantize(self, piece, *args)
        pieces.append((piece, [e.done for e in events[before:]], events[before - 1].done if before else 0))

    monkeypatch.setattr(pipeline.Runner, "_quantize", watched)
    result = convert(str(llama_ckpt), str(tmp_path / "out"), scheme="FP8_DYNAMIC", device="cpu", progress=progress)
    assert pieces and result.stats.pieces == len(pieces)
    assert max(len(p.quantize) + len(p.passthrough) for p, _, _ in pieces) >= 4  # pieces of several tensors
    for piece, dones, start in pieces:
        tensors = len(piece.quantize) + len(piece.passthrough)
        assert len(dones) == tensors, (tensors, dones)  # one advance per tensor
        steps = [b - a for a, b in zip([start, *dones], dones)]
        assert all(s > 0 for s in steps)
        assert sum(steps) == piece.bytes_in  # exactly the piece's bytes, as before
    final = events[-1]
    assert final.done == final.total == result.plan.bytes_in


# --------------------------------------------------------------------------------------------
# uploaded: per chunk, exact, never past the shard
# --------------------------------------------------------------------------------------------


def test_a_shard_upload_reports_its_bytes_as_they_go(hub, transfer):
    """24 MB at 6 MB/s: the sink reports the shard's bytes several times on the way, the first
    long before the end, and exactly its size in all."""
    size = 24_000_000
    sink = _sink(hub, f"alice/chunks-{transfer}")
    writer = _shard(sink, size)
    calls: list[int] = []
    writer.on_bytes = calls.append
    hub.set_throttle(up_bytes_per_s=6_000_000)
    try:
        writer.close().result(timeout=120)
    finally:
        hub.set_throttle(None, None)
    assert len(calls) >= 4, calls
    assert all(n > 0 for n in calls) and sum(calls) == size
    assert calls[0] < size / 2  # the first report came with most of the shard still to send
    sink.put_file("config.json", b"{}")
    sink.commit("x")
    assert hub.files(f"alice/chunks-{transfer}")["model.safetensors"] == size
    sink.close()


def test_a_retried_upload_counts_each_byte_once(hub, monkeypatch):
    """The first PUT is sent whole, then its answer is lost (the connection drops) and the
    upload is sent again: the bytes of both attempts count once, exactly the shard in all."""
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr("streamer.io.hub_http.backoff_delay", lambda *a, **k: 0.0)
    size = 8_000_000
    sink = _sink(hub, "alice/retried")
    writer = _shard(sink, size)
    calls: list[int] = []
    writer.on_bytes = calls.append
    hub.clear_log()
    hub.set_faults(every=1, kinds=("drop",), only_paths=None, methods=("PUT",), max_faults=1)
    try:
        writer.close().result(timeout=60)
    finally:
        hub.set_faults(None)
    puts = [r for r in hub.request_log if r.method == "PUT"]
    assert len(puts) == 2 and puts[0].fault, puts  # the shard's bytes went out twice
    assert sum(calls) == size and all(n > 0 for n in calls)
    sink.abort()
    sink.close()


def test_pipeline_upload_progress_is_per_chunk_and_exact(hub, transfer, checkpoint, tmp_path):
    """Hub to Hub on a link of 8 MB/s: "upload" moves several times per shard, never past its
    total, ends exactly at it, and its rate never reads far above the link; what is committed
    is the converted model."""
    ckpt = checkpoint("llama", max_shard_size="40MB", hidden_size=1024, intermediate_size=4096,
                      num_hidden_layers=2, vocab_size=1024)  # fmt: skip
    hub.seed_repo(SOURCE, ckpt)
    events: list[ProgressEvent] = []
    lock = threading.Lock()

    def listener(e):
        if e.stage == "upload":
            with lock:
                events.append(e)

    link = 8_000_000
    hub.set_throttle(up_bytes_per_s=link)
    try:
        result = convert(SOURCE, "alice/medium-fp8", scheme="FP8_DYNAMIC", device="cpu",
                         progress=Progress(listeners=[listener]), token=ALICE)  # fmt: skip
    finally:
        hub.set_throttle(None, None)
    shards = len(result.plan.jobs)
    moved = [e for e in events if e.done > 0]
    assert len(moved) > 2 * shards, (len(moved), shards)
    dones = [e.done for e in moved]
    assert dones == sorted(dones) and all(e.done <= e.total for e in moved)
    assert moved[-1].done == moved[-1].total == result.plan.bytes_out
    # bytes counted as they leave, not per finished shard: no early rate far above the link
    assert all(e.rate <= 2 * link for e in moved if e.steady and e.done < e.total), [e.rate for e in moved]
    files = hub.files("alice/medium-fp8")
    assert all(files[j.shard] == j.bytes_out + len(pipeline.shard_header(j)[0]) for j in result.plan.jobs)


# --------------------------------------------------------------------------------------------
# cancel: uploads in flight end, nothing is committed
# --------------------------------------------------------------------------------------------


def test_cancel_ends_an_upload_in_flight(hub, transfer):
    """A 40 MB shard on a 1 MB/s link (40 s of transfer): a cancelling abort returns at once,
    the upload itself ends within a few seconds, the repo created for the run is gone, and
    nothing can be committed after it."""
    repo = f"alice/cancel-{transfer}"
    size = 40_000_000
    sink = _sink(hub, repo)
    writer = _shard(sink, size)
    first = threading.Event()
    sent: list[int] = []
    writer.on_bytes = lambda n: (sent.append(n), first.set())
    ended = threading.Event()
    real = sink._preupload

    def watched(*args, **kwargs):
        try:
            return real(*args, **kwargs)
        finally:
            ended.set()

    sink._preupload = watched
    hub.set_throttle(up_bytes_per_s=1_000_000)
    try:
        fut = writer.close()
        assert first.wait(60)  # bytes are on their way
        t0 = time.monotonic()
        sink.abort(resumable=False)
        returned = time.monotonic() - t0
        sink.settle()  # a run that ended for good: what it created goes
        assert ended.wait(30), "the upload ran on after the cancel"
        stopped = time.monotonic() - t0
    finally:
        hub.set_throttle(None, None)
    print(f"{transfer}: abort returned in {returned:.3f} s, the upload ended {stopped:.3f} s after the cancel")
    assert stopped < 10  # the transfer alone would need 40 s
    with pytest.raises(Cancelled):
        fut.result(timeout=1)
    assert sum(sent) < size
    assert not hub.repo_exists(repo)
    with pytest.raises(Cancelled):
        sink.commit("late")
    assert not hub.repo_exists(repo)
    sink.close()

"""The streaming pipeline: stages in flight at once, read-ahead bounded by the budget, pieces,
progress events and the --json summary."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch
from safetensors import safe_open

from streamer.cli import main as cli
from streamer.engine import pipeline
from streamer.engine.convert import convert
from streamer.engine.progress import Progress, ProgressEvent
from streamer.io.source import LocalSource


def tensor_bytes(folder) -> dict[str, bytes]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as fh:
            for k in fh.keys():
                t = fh.get_tensor(k).contiguous()
                out[k] = t.reshape(-1).view(torch.uint8).numpy().tobytes()
    return out


class TimedSource(LocalSource):
    """A local source whose reads take a little while, like a network, and are logged."""

    def __init__(self, root, delay: float = 0.0):
        super().__init__(root)
        self.delay = delay
        self.fetches: list[tuple[float, float]] = []
        self.done = threading.Semaphore(0)

    def read_spans_into(self, path, spans, outs):
        t0 = time.monotonic()
        time.sleep(self.delay)
        super().read_spans_into(path, spans, outs)
        self.fetches.append((t0, time.monotonic()))
        self.done.release()


def test_small_pieces_give_identical_output(llama_ckpt, tmp_path, monkeypatch):
    whole = convert(str(llama_ckpt), str(tmp_path / "whole"), scheme="NVFP4A16", device="cpu")
    monkeypatch.setattr(pipeline, "PIECE_BYTES", 100_000)
    cut = convert(str(llama_ckpt), str(tmp_path / "cut"), scheme="NVFP4A16", device="cpu")
    # the budget is large: only the piece cap cut the jobs
    assert whole.stats.pieces == len(whole.plan.jobs)
    assert cut.stats.pieces > 2 * len(cut.plan.jobs)
    assert tensor_bytes(tmp_path / "whole") == tensor_bytes(tmp_path / "cut")


def test_fetch_runs_ahead_of_a_slow_quantizer_within_the_budget(llama_ckpt, tmp_path, monkeypatch):
    """While the first piece is being quantized, later pieces keep downloading (more of them
    than there are fetch workers), and everything held stays within --max-memory."""
    monkeypatch.setattr(pipeline, "PIECE_BYTES", 100_000)
    source = TimedSource(llama_ckpt, delay=0.01)
    workers = 2
    ahead = {}
    quantize = pipeline.Runner._quantize

    def slow_first(self, piece, *args):
        if not ahead:
            # Wait (bounded) until the fetch stage has run well ahead of this piece.
            deadline = time.monotonic() + 10
            got = 0
            while got < 4 * workers and time.monotonic() < deadline:
                got += source.done.acquire(timeout=0.1)
            ahead["fetched"] = len(source.fetches)
        return quantize(self, piece, *args)

    monkeypatch.setattr(pipeline.Runner, "_quantize", slow_first)
    budget = 64_000_000
    result = convert(source, str(tmp_path / "out"), scheme="FP8_DYNAMIC", device="cpu", workers=workers,
                     max_memory=budget)  # fmt: skip
    assert result.stats.pieces > 4 * workers + 1
    assert ahead["fetched"] >= 4 * workers  # the old depth (workers + 1) would stall at 3
    assert result.stats.peak_budget <= budget


def test_fetch_and_quantize_overlap(llama_ckpt, tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "PIECE_BYTES", 200_000)
    source = TimedSource(llama_ckpt, delay=0.02)
    spans: list[tuple[float, float]] = []
    quantize = pipeline.Runner._quantize

    def timed(self, piece, *args):
        t0 = time.monotonic()
        quantize(self, piece, *args)
        time.sleep(0.02)
        spans.append((t0, time.monotonic()))

    monkeypatch.setattr(pipeline.Runner, "_quantize", timed)
    convert(source, str(tmp_path / "out"), scheme="FP8_DYNAMIC", device="cpu")
    overlapping = [(q, f) for q in spans for f in source.fetches if f[0] < q[1] and q[0] < f[1]]
    assert len(overlapping) >= len(spans) // 2


def test_progress_events_cover_every_stage(llama_ckpt, tmp_path):
    events: list[ProgressEvent] = []
    lock = threading.Lock()

    def listener(e):
        with lock:
            events.append(e)

    result = convert(str(llama_ckpt), str(tmp_path / "out"), scheme="FP8_DYNAMIC", device="cpu",
                     progress=Progress(listeners=[listener]))  # fmt: skip
    final = {}
    for e in events:
        if e.stage != "log":
            final[e.stage] = e
    assert set(final) == {"read", "quantize", "upload"}
    for stage, e in final.items():
        assert e.total > 0 and e.done == e.total, stage
    assert final["quantize"].total == result.plan.bytes_in
    assert final["upload"].total == result.plan.bytes_out
    # rates and ETAs while running
    running = [e for e in events if e.stage == "read" and 0 < e.done < e.total]
    assert running and all(e.rate > 0 and e.eta is not None and e.eta > 0 for e in running)
    messages = [e.message for e in events if e.stage == "log"]
    assert any(m.startswith("converting ") for m in messages) and any(m.startswith("done: ") for m in messages)


def test_json_summary_and_quiet(llama_ckpt, tmp_path, capsys):
    assert cli.main([str(llama_ckpt), str(tmp_path / "a"), "--scheme", "FP8_DYNAMIC", "--device", "cpu", "--json"]) == 0
    out, err = capsys.readouterr()
    summary = json.loads(out)
    assert summary["bytes_read"] == summary["bytes_in"] > 0
    assert summary["bytes_written"] == summary["bytes_out"] > 0
    assert set(summary["stage_seconds"]) == {"read", "quantize", "upload"}
    assert summary["seconds"] > 0 and summary["url"] == str(tmp_path / "a")
    assert summary["shards"] == sorted(p.name for p in (tmp_path / "a").glob("*.safetensors"))
    assert 0 < summary["peak_buffered_bytes"]

    assert cli.main([str(llama_ckpt), str(tmp_path / "b"), "--scheme", "FP8_DYNAMIC", "--device", "cpu", "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert out == "" and err == ""


@pytest.mark.parametrize("encoding", ["gzip", "br"])
def test_range_reads_refuse_encoded_bodies(encoding):
    from streamer.io.hub_source import HubSource, RangeError
    from streamer.io.source import Span

    class Response:
        status_code = 206
        headers = {"content-range": "bytes 0-9/100", "content-length": "10", "content-encoding": encoding}

    source = HubSource.__new__(HubSource)
    with pytest.raises(RangeError, match=encoding):
        source._check_range(Response(), "model.safetensors", Span(0, 10))


def test_default_budget_counts_reclaimable_page_cache():
    import os

    from streamer.engine.budget import available_memory, default_memory_budget

    free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    # MemAvailable includes the page cache the kernel would drop; free pages alone do not
    assert available_memory() >= 0.9 * free
    assert default_memory_budget() == max(available_memory() // 2, 1 << 30) or abs(
        default_memory_budget() - available_memory() // 2
    ) < 256 * 1024**2  # memory moves a little between the two reads

"""Fan-out: one read of the source, several targets, each byte for byte what it is alone."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from streamer.cli import main as cli
from streamer.engine.convert import Target, convert, convert_many
from streamer.engine.progress import Progress
from streamer.errors import Cancelled, StreamerError
from streamer.io.sink import LocalSink
from streamer.io.source import LocalSource
from test_hub import SOURCE, _safetensors_gets, _streamer_commits, hub  # noqa: F401 (hub: a fixture)

SCHEMES = ["FP8_DYNAMIC", "W4A16", "NVFP4A16"]


class CountingSource(LocalSource):
    """A local folder that records every byte range read from its weight files."""

    def __init__(self, root):
        super().__init__(root)
        self.spans: list[tuple[str, int, int]] = []
        self._lock = threading.Lock()

    def read_into(self, path, span, out):
        if path.endswith(".safetensors"):
            with self._lock:
                self.spans.append((path, span.start, span.end))
        super().read_into(path, span, out)


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def overlaps(spans) -> list:
    """Byte ranges read more than once."""
    out = []
    last: dict[str, int] = {}
    for path, start, end in sorted(spans):
        if start < last.get(path, 0):
            out.append((path, start, last[path]))
        last[path] = max(last.get(path, 0), end)
    return out


def singles(src: Path, root: Path, schemes) -> dict[str, dict[str, bytes]]:
    out = {}
    for s in schemes:
        dst = root / "single" / s / "model"  # the card names the folder: same name as the fan-out's
        convert(str(src), str(dst), scheme=s, device="cpu")
        out[s] = files_of(dst)
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe"])
def test_each_target_equals_its_single_run_and_every_byte_is_read_once(arch, checkpoint, tmp_path):
    src = checkpoint(arch)
    alone = singles(src, tmp_path, SCHEMES)
    source = CountingSource(src)
    progress = Progress()
    # a budget small enough that the fastest target must wait for the others now and then
    result = convert_many(
        source, [(tmp_path / "fan" / s / "model", s) for s in SCHEMES], device="cpu", max_memory=12_000_000,
        progress=progress,
    )  # fmt: skip
    assert result.ok and result.exit_code == 0, [t.error for t in result.targets]
    for s in SCHEMES:
        assert files_of(tmp_path / "fan" / s / "model") == alone[s], s
    # each byte read once (headers, then tensors), for all three targets; every needed byte read
    assert overlaps(source.spans) == []
    plan = result.targets[0].result.plan
    assert result.bytes_read == plan.bytes_in
    assert sum(e - s for _, s, e in source.spans) == plan.bytes_in + plan.catalog.header_bytes
    assert result.bytes_shared == 2 * plan.bytes_in  # the two other targets took copies
    # one set of bars: read counts each byte once; quantized and written add up the targets
    read, quantized, written = (progress.snapshot(s) for s in ("read", "quantize", "upload"))
    assert read.done == read.total == plan.bytes_in
    assert quantized.done == quantized.total == 3 * plan.bytes_in
    assert written.done == written.total == sum(t.result.plan.bytes_out for t in result.targets)
    assert result.peak_shared_bytes <= 3_000_000
    # each target's own statistics and quality report are its own
    reports = {t.result.plan.recipe.name: t.result.quality.overall.relative_error for t in result.targets}
    assert reports["FP8_DYNAMIC"] < reports["NVFP4A16"] and reports["FP8_DYNAMIC"] < reports["W4A16"]


def test_a_failing_target_does_not_stop_the_others(llama_ckpt, tmp_path, monkeypatch):
    alone = singles(llama_ckpt, tmp_path, ["FP8_DYNAMIC", "W4A16"])
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    real_open = LocalSink.open_shard
    opened = []

    def open_shard(self, name, size):  # the W8A16 target's disk "fails" at its second shard
        if "broken" in str(self.label):
            opened.append(name)
            if len(opened) == 2:
                raise OSError(28, "No space left on device")
        return real_open(self, name, size)

    monkeypatch.setattr(LocalSink, "open_shard", open_shard)
    result = convert_many(
        str(llama_ckpt),
        [
            Target(str(tmp_path / "fan" / "FP8_DYNAMIC" / "model"), scheme="FP8_DYNAMIC"),
            Target(str(tmp_path / "bad-scheme"), scheme="NOT_A_SCHEME"),
            Target(str(occupied), scheme="W4A16"),  # not streamer's folder: refused before the run
            Target(str(tmp_path / "broken"), scheme="W8A16"),
            {"dst": str(tmp_path / "fan" / "W4A16" / "model"), "scheme": "W4A16"},
        ],
        device="cpu",
    )
    status = {Path(t.target.dst).name if "fan" not in t.target.dst else t.target.scheme: t for t in result.targets}
    assert status["FP8_DYNAMIC"].ok and status["W4A16"].ok
    assert files_of(tmp_path / "fan" / "FP8_DYNAMIC" / "model") == alone["FP8_DYNAMIC"]
    assert files_of(tmp_path / "fan" / "W4A16" / "model") == alone["W4A16"]
    assert status["bad-scheme"].exit_code == 2 and "NOT_A_SCHEME" in str(status["bad-scheme"].error)
    assert status["occupied"].exit_code == 2 and [p.name for p in occupied.iterdir()] == ["notes.txt"]
    assert isinstance(status["broken"].error, OSError) and status["broken"].exit_code == 1
    assert not (tmp_path / "broken").exists() and not (tmp_path / "bad-scheme").exists()
    assert result.exit_code == 2  # the first failed target's
    lines = result.summary()["targets"]
    assert [line["status"] for line in lines] == ["ok", "failed", "failed", "failed", "ok"]
    assert "No space left" in lines[3]["error"]


def test_cancel_stops_every_target_and_publishes_nothing(llama_ckpt, tmp_path):
    cancel = threading.Event()
    progress = Progress()
    progress.listeners.append(lambda e: cancel.set() if e.stage == "upload" and e.done else None)
    result = convert_many(
        str(llama_ckpt), [(tmp_path / s, s) for s in SCHEMES], device="cpu", cancel=cancel, progress=progress
    )
    assert cancel.is_set()
    assert all(isinstance(t.error, Cancelled) and t.exit_code == 130 for t in result.targets)
    assert not any((tmp_path / s).exists() for s in SCHEMES)


def test_refused_before_anything_is_written(llama_ckpt, tmp_path):
    with pytest.raises(StreamerError, match="two targets write to"):
        convert_many(str(llama_ckpt), [(tmp_path / "a", "W4A16"), (tmp_path / "a", "FP8_DYNAMIC")])
    with pytest.raises(StreamerError, match="too small for 2 targets") as e:
        convert_many(str(llama_ckpt), [(tmp_path / "a", "W4A16"), (tmp_path / "b", "FP8_DYNAMIC")], max_memory=20_000)
    assert e.value.hints[0].setting == "max_memory"
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    with pytest.raises(StreamerError, match="at least 1"):
        convert_many(str(llama_ckpt), [(tmp_path / "a", "W4A16"), (tmp_path / "b", "FP8_DYNAMIC")], max_memory=0)
    with pytest.raises(StreamerError, match="convert_many"):
        convert(str(llama_ckpt), [(tmp_path / "a", "W4A16")])


def test_cli_to_targets_json_and_exit_status(llama_ckpt, tmp_path, capsys):
    code = cli.main([
        str(llama_ckpt), str(tmp_path / "fp8"), "--scheme", "FP8_DYNAMIC",
        "--to", str(tmp_path / "w4"), "W4A16", "--to", str(tmp_path / "nope"), "NOT_A_SCHEME",
        "--device", "cpu", "--json",
    ])  # fmt: skip
    out = json.loads(capsys.readouterr().out)
    assert code == 2
    assert [(Path(t["target"]).name, t["status"], t["exit"]) for t in out["targets"]] == [
        ("fp8", "ok", 0), ("w4", "ok", 0), ("nope", "failed", 2),
    ]  # fmt: skip
    # the command line's words for the hint, for a --to target: its SCHEME, not --scheme-file
    assert "unknown scheme 'NOT_A_SCHEME'" in out["targets"][2]["error"]
    assert "as that --to's SCHEME" in out["targets"][2]["error"] and "--scheme-file" not in out["targets"][2]["error"]
    # the same words without --json
    code = cli.main([str(llama_ckpt), "--to", str(tmp_path / "nope2"), "NOT_A_SCHEME", "--device", "cpu", "-q"])
    err = capsys.readouterr().err
    assert code == 2 and "error: " in err and "as that --to's SCHEME" in err and "--scheme-file" not in err
    assert out["bytes_read"] == out["targets"][0]["bytes_in"]
    # --dry-run prints every target's plan and writes nothing
    code = cli.main([str(llama_ckpt), "--to", str(tmp_path / "d1"), "W4A16", "--to", str(tmp_path / "d2"), "NVFP4A16", "--dry-run"])
    text = capsys.readouterr().out
    assert code == 0 and text.count("output shard(s)") == 2 and "(NVFP4A16)" in text
    assert not (tmp_path / "d1").exists()
    # --scheme without a positional destination is a mistake, said as such
    assert cli.main([str(llama_ckpt), "--scheme", "W4A16", "--to", str(tmp_path / "x"), "FP8_DYNAMIC"]) == 2
    assert "--scheme names the scheme of DST" in capsys.readouterr().err


def test_hub_fanout_reads_the_source_once_and_commits_once_per_target(hub, tmp_path):  # noqa: F811
    targets = {"alice/tiny-fp8": "FP8_DYNAMIC", "alice/tiny-nvfp4": "NVFP4A16", "acme/tiny-w4a16": "W4A16"}
    for repo, scheme in targets.items():  # each alone, to compare with
        assert cli.main([SOURCE, repo + "-alone", "--scheme", scheme, "--device", "cpu", "-q"]) == 0
    hub.clear_log()
    args = [SOURCE]
    for repo, scheme in targets.items():
        args += ["--to", repo, scheme]
    assert cli.main([*args, "--device", "cpu", "-q"]) == 0
    from streamer.engine.convert import prepare

    _, plan = prepare(SOURCE, scheme="W4A16")
    fetched = sum(r.bytes_out for r in _safetensors_gets(hub.request_log))
    assert fetched <= 1.01 * (plan.catalog.header_bytes + plan.bytes_in), fetched
    for repo in targets:
        assert len(_streamer_commits(hub, repo)) == 1
        files = hub.files(repo)
        assert set(files) == set(hub.files(repo + "-alone"))
        for f in files:
            if f != "README.md":  # the card names its own repo
                assert hub.read_file(repo, f) == hub.read_file(repo + "-alone", f), (repo, f)


def test_a_target_that_already_holds_its_conversion_is_left_out_of_the_read(hub, capsys):  # noqa: F811
    """A fan-out rerun after one target was published alone: that target is up to date (its
    card, its shard sizes), reads nothing and gets no commit; the other is converted."""
    assert cli.main([SOURCE, "alice/done-fp8", "--scheme", "FP8_DYNAMIC", "--device", "cpu", "-q"]) == 0
    before = [c.sha for c in hub.commits("alice/done-fp8")]
    hub.clear_log()
    args = [SOURCE, "--to", "alice/done-fp8", "FP8_DYNAMIC", "--to", "alice/new-w8", "W8A16"]
    assert cli.main([*args, "--device", "cpu", "-q", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    done, new = summary["targets"]
    assert done["up_to_date"] is True and done["status"] == "ok" and done["url"].endswith(before[0])
    assert new["up_to_date"] is False and new["status"] == "ok"
    assert [c.sha for c in hub.commits("alice/done-fp8")] == before
    assert not [r for r in hub.request_log if r.repo_id == "alice/done-fp8" and r.method == "POST"]  # no upload, no commit
    assert len(_streamer_commits(hub, "alice/new-w8")) == 1
    from streamer.engine.convert import prepare

    _, plan = prepare(SOURCE, scheme="W8A16")
    fetched = sum(r.bytes_out for r in _safetensors_gets(hub.request_log))
    assert summary["bytes_read"] <= plan.bytes_in and fetched <= 1.01 * (plan.catalog.header_bytes + plan.bytes_in)


def test_a_target_running_ahead_waits_for_the_others(tmp_path):
    """The copies kept for a slower target stay near the reader's limit: the leader waits."""
    from streamer.engine.fanout import SharedReader
    from streamer.io.catalog import TensorInfo
    from streamer.io.source import Span

    size, n = 1000, 8
    blob = bytes(range(256)) * (size * n // 256 + 1)
    (tmp_path / "w.safetensors").write_bytes(blob[: size * n])
    source = CountingSource(tmp_path)
    tensors = [TensorInfo(f"t{i}", "w.safetensors", "U8", (size,), Span(i * size, (i + 1) * size)) for i in range(n)]
    reader = SharedReader(source, targets=2, cache_limit=2 * size, cancel=threading.Event(), progress=Progress())
    a, b = reader.view(0), reader.view(1)
    for view in (a, b):
        view.will_read([[t] for t in tensors])
    got_a: list[bytes] = []

    def lead():
        for t in tensors:
            buf = bytearray(size)
            a.read_into(t.file, t.span, memoryview(buf))
            got_a.append(bytes(buf))

    leader = threading.Thread(target=lead)
    leader.start()
    for _ in range(100):  # until it has read 3 tensors (3 copies held, more than the 2 allowed)
        if len(got_a) >= 3:
            break
        leader.join(0.1)
    leader.join(0.5)
    assert leader.is_alive() and len(got_a) == 3  # ... where it waits
    got_b = []
    for t in tensors:  # the slow target catches up, taking copies; it never waits itself
        buf = bytearray(size)
        b.read_into(t.file, t.span, memoryview(buf))
        got_b.append(bytes(buf))
    leader.join(5.0)
    assert not leader.is_alive()
    assert got_a == got_b == [blob[i * size : (i + 1) * size] for i in range(n)]
    assert overlaps(source.spans) == [] and reader.fetched == size * n
    assert reader.peak <= 3 * size and reader.held == 0


def test_a_failed_fetch_is_fetched_again_by_the_target_waiting_for_it(tmp_path):
    from streamer.engine.fanout import SharedReader
    from streamer.io.catalog import TensorInfo
    from streamer.io.source import Span

    (tmp_path / "w.safetensors").write_bytes(bytes(range(200)))
    go, first = threading.Event(), threading.Event()

    class Flaky(CountingSource):
        fail = True

        def read_into(self, path, span, out):
            if self.fail:
                self.fail = False
                first.set()
                go.wait(10)
                raise OSError("connection reset")
            super().read_into(path, span, out)

    t = TensorInfo("t", "w.safetensors", "U8", (100,), Span(50, 150))
    reader = SharedReader(Flaky(tmp_path), targets=2, cancel=threading.Event(), cache_limit=1000, progress=Progress())
    a, b = reader.view(0), reader.view(1)
    a.will_read([[t]])
    b.will_read([[t]])
    errors, got = [], bytearray(100)

    def read_a():
        try:
            a.read_into(t.file, t.span, memoryview(bytearray(100)))
        except OSError as e:
            errors.append(e)

    ta = threading.Thread(target=read_a)
    ta.start()
    assert first.wait(10)  # A is fetching t; B now waits for A's fetch
    tb = threading.Thread(target=lambda: b.read_into(t.file, t.span, memoryview(got)))
    tb.start()
    tb.join(0.3)
    assert tb.is_alive()
    go.set()  # A's fetch fails: B fetches t itself
    ta.join(10)
    tb.join(10)
    assert [str(e) for e in errors] == ["connection reset"] and bytes(got) == bytes(range(50, 150))
    a.close()
    assert reader.held == 0


def test_a_target_has_its_own_ignore_list_besides_the_common_one(llama_ckpt, tmp_path):
    result = convert_many(
        str(llama_ckpt),
        [Target(str(tmp_path / "a"), scheme="W4A16", ignore=("model.layers.0.mlp.down_proj",)), (tmp_path / "b", "W4A16")],
        ignore=["model.layers.1.mlp.down_proj"], device="cpu",
    )  # fmt: skip
    ignored = {Path(t.target.dst).name: t.result.plan.config_ignore for t in result.targets}
    assert "model.layers.0.mlp.down_proj" in ignored["a"] and "model.layers.0.mlp.down_proj" not in ignored["b"]
    assert all("model.layers.1.mlp.down_proj" in v for v in ignored.values())
    alone = convert(str(llama_ckpt), str(tmp_path / "alone" / "a"), scheme="W4A16", device="cpu",
                    ignore=["model.layers.1.mlp.down_proj", "model.layers.0.mlp.down_proj"])  # fmt: skip
    assert files_of(tmp_path / "a") == files_of(tmp_path / "alone" / "a")
    assert alone.plan.config_ignore == ignored["a"]

"""Local folders at both ends: a destination streamer wrote is refreshed in one atomic swap,
staging folders of killed runs are cleaned up (never a live run's), and a local source never
reads a file outside itself through a link."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from streamer.cli import main as cli
from streamer.io import sink as sink_mod
from streamer.engine.convert import convert
from streamer.errors import InputError, TargetError
from streamer.io.sink import LocalSink, written_by_streamer
from streamer.io.source import LocalSource

ROOT = Path(__file__).resolve().parent.parent


def tree(folder: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under FOLDER (what a user would see)."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def leftovers(dst: Path) -> list[str]:
    """Staging folders, lock files and moved-aside folders beside DST."""
    return sorted(p.name for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}.streamer-"))


def scheme_of(folder: Path) -> str:
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    return qc["format"]


# --- a destination streamer wrote is refreshed ----------------------------------------------


def test_second_run_refreshes_a_folder_streamer_wrote(llama_ckpt, tmp_path):
    dst = tmp_path / "out"
    convert(str(llama_ckpt), str(dst), scheme="FP8_DYNAMIC", device="cpu")
    assert written_by_streamer(dst)
    assert scheme_of(dst) == "float-quantized"
    # the README promises a rerun refreshes the target, with no --overwrite
    assert cli.main([str(llama_ckpt), str(dst), "--scheme", "W4A16", "--device", "cpu", "-q"]) == 0
    assert scheme_of(dst) == "pack-quantized"
    assert not any(dst.glob("*.streamer-*"))
    assert leftovers(dst) == []  # the replaced folder and the lock are gone


def test_folder_streamer_did_not_write_still_needs_overwrite(llama_ckpt, tmp_path, capsys):
    dst = tmp_path / "mine"
    dst.mkdir()
    (dst / "README.md").write_text("---\nlicense: mit\n---\n# my notes\n")  # a card, not streamer's
    (dst / "notes.txt").write_text("precious")
    before = tree(dst)
    code = cli.main([str(llama_ckpt), str(dst), "--scheme", "FP8_DYNAMIC", "--device", "cpu", "-q"])
    err = capsys.readouterr().err
    assert code == 2 and "streamer did not write it" in err and "--overwrite" in err
    assert tree(dst) == before

    # a README.md that is a link to a streamer card elsewhere does not make the folder streamer's
    other = tmp_path / "other"
    convert(str(llama_ckpt), str(other), scheme="FP8_DYNAMIC", device="cpu")
    (dst / "README.md").unlink()
    (dst / "README.md").symlink_to(other / "README.md")
    with pytest.raises(TargetError, match="did not write"):
        convert(str(llama_ckpt), str(dst), scheme="FP8_DYNAMIC", device="cpu")

    assert cli.main([str(llama_ckpt), str(dst), "--scheme", "FP8_DYNAMIC", "--device", "cpu", "-q", "--overwrite"]) == 0
    assert not (dst / "notes.txt").exists() and written_by_streamer(dst)


def test_refresh_uses_an_atomic_exchange(llama_ckpt, tmp_path, monkeypatch):
    """The swap is one renameat2(RENAME_EXCHANGE): no instant without a complete destination."""
    dst = tmp_path / "out"
    convert(str(llama_ckpt), str(dst), scheme="FP8_DYNAMIC", device="cpu")
    seen = []
    real = sink_mod._exchange

    def spy(a, b):
        seen.append((Path(a).name, Path(b).name, sorted(p.name for p in Path(a).iterdir())))
        real(a, b)
        # right after the swap, DST already holds the new conversion
        seen.append(scheme_of(Path(b)))

    monkeypatch.setattr(sink_mod, "_exchange", spy)
    convert(str(llama_ckpt), str(dst), scheme="W4A16", device="cpu")
    assert len(seen) == 2 and seen[0][1] == "out" and seen[0][0].startswith(".out.streamer-")
    assert "config.json" in seen[0][2]  # the staging folder was complete before the swap
    assert seen[1] == "pack-quantized"
    assert leftovers(dst) == []


_KILLED_MID_SWAP = textwrap.dedent(
    """
    import errno, os, signal, sys
    import streamer.io.sink as sink
    def no_exchange(a, b):
        raise OSError(errno.ENOSYS, "renameat2 is not available")
    sink._exchange = no_exchange
    real_rename = os.rename
    def rename(a, b):
        real_rename(a, b)
        if str(a) == sys.argv[2]:  # DST was just moved aside: die before the new one moves in
            os.kill(os.getpid(), signal.SIGKILL)
    sink.os.rename = rename
    from streamer.engine.convert import convert
    convert(sys.argv[1], sys.argv[2], scheme="W4A16", device="cpu")
    """
)


def test_fallback_swap_killed_between_renames_is_repaired(llama_ckpt, tmp_path, monkeypatch):
    """Without renameat2 the swap is two renames. A run killed between them leaves DST moved
    aside; the next run puts the old folder back before it does anything else."""
    dst = tmp_path / "out"
    convert(str(llama_ckpt), str(dst), scheme="FP8_DYNAMIC", device="cpu")
    before = tree(dst)
    proc = subprocess.run(
        [sys.executable, "-c", _KILLED_MID_SWAP, str(llama_ckpt), str(dst)], cwd=ROOT, timeout=300
    )
    assert proc.returncode == -signal.SIGKILL
    assert not dst.exists()
    (old,) = [n for n in leftovers(dst) if n.endswith(".old")]
    assert tree(tmp_path / old) == before

    # the next run (also without renameat2) first restores DST, then refreshes it
    monkeypatch.setattr(sink_mod, "_exchange", lambda a, b: (_ for _ in ()).throw(OSError(errno.ENOSYS, "no")))
    sink = LocalSink(dst)
    sink.remove_stale()
    assert tree(dst) == before
    convert(str(llama_ckpt), str(dst), scheme="W4A16", device="cpu")
    assert scheme_of(dst) == "pack-quantized"
    assert leftovers(dst) == []


def test_fallback_swap_interrupted_between_renames_puts_the_old_folder_back(llama_ckpt, tmp_path, monkeypatch):
    dst = tmp_path / "out"
    convert(str(llama_ckpt), str(dst), scheme="FP8_DYNAMIC", device="cpu")
    before = tree(dst)
    monkeypatch.setattr(sink_mod, "_exchange", lambda a, b: (_ for _ in ()).throw(OSError(errno.ENOSYS, "no")))
    real_rename = os.rename

    interrupted = []

    def rename(a, b):
        if Path(b) == dst and not interrupted:  # Ctrl-C just as the new folder would move in
            interrupted.append(a)
            raise KeyboardInterrupt
        real_rename(a, b)

    monkeypatch.setattr(sink_mod.os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        convert(str(llama_ckpt), str(dst), scheme="W4A16", device="cpu")
    monkeypatch.setattr(sink_mod.os, "rename", real_rename)
    assert interrupted and Path(interrupted[0]).name.startswith(".out.streamer-")
    assert tree(dst) == before
    assert leftovers(dst) == []


# --- staging folders of killed runs -----------------------------------------------------------


_KILLABLE = textwrap.dedent(
    """
    import sys, time
    import streamer.engine.pipeline as pipeline
    from streamer.engine.convert import convert
    real = pipeline.quantize_weight
    calls = []
    def slow(*a, **k):
        calls.append(1)
        if len(calls) == 3:  # a shard is open in the staging folder by now: stop here
            print("STAGED", flush=True)
            time.sleep(600)
        return real(*a, **k)
    pipeline.quantize_weight = slow
    convert(sys.argv[1], sys.argv[2], scheme="FP8_DYNAMIC", device="cpu")
    """
)


def _start_run(src: Path, dst: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLABLE, str(src), str(dst)],
        stdout=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip
    assert proc.stdout.readline().strip() == "STAGED"
    return proc


def test_killed_run_staging_is_removed_by_the_next_run_but_a_live_runs_is_not(llama_ckpt, tmp_path):
    dst = tmp_path / "out"
    dead = _start_run(llama_ckpt, dst)
    dead.send_signal(signal.SIGKILL)
    dead.wait(timeout=60)
    stale = leftovers(dst)
    # a staging folder holding a shard, and its lock file (with the pid of the dead run)
    assert len(stale) == 2 and stale[1] == stale[0] + ".lock"
    assert any((dst.parent / stale[0]).glob("*.safetensors"))
    assert (dst.parent / stale[1]).read_text().strip() == str(dead.pid)

    live = _start_run(llama_ckpt, dst)
    try:
        mine = [n for n in leftovers(dst) if n not in stale]
        assert len(mine) == 2
        convert(str(llama_ckpt), str(dst), scheme="FP8_DYNAMIC", device="cpu")
        # the dead run's folder is gone, the live run's is untouched
        assert leftovers(dst) == mine
        assert any((dst.parent / mine[0]).glob("*.safetensors"))
    finally:
        live.kill()
        live.wait(timeout=60)
    assert written_by_streamer(dst)
    # and once that run is dead too, the next run cleans its folder up as well
    convert(str(llama_ckpt), str(dst), scheme="FP8_DYNAMIC", device="cpu")
    assert leftovers(dst) == []


def test_live_lock_in_this_process_is_respected(tmp_path):
    """flock locks belong to an open file, so even another sink in the same process (a mirror
    running two jobs) cannot take a live staging folder for a stale one."""
    dst = tmp_path / "out"
    a = LocalSink(dst)
    staging = a._staging()
    b = LocalSink(dst)
    assert b.remove_stale() == []
    assert staging.is_dir()
    a.abort()
    assert leftovers(dst) == []


def test_unowned_staging_folder_is_reported_not_removed(llama_ckpt, tmp_path, caplog):
    dst = tmp_path / "out"
    legacy = tmp_path / ".out.streamer-abcd1234"  # what streamer versions before locks left
    legacy.mkdir()
    (legacy / "model-00001-of-00006.safetensors").write_bytes(b"\0" * 64)
    convert(str(llama_ckpt), str(dst), scheme="FP8_DYNAMIC", device="cpu")
    assert legacy.is_dir()  # its owner cannot be known: it might be a live older run
    assert any("no owner record" in r.getMessage() and legacy.name in r.getMessage() for r in caplog.records)


# --- a local source reads only its own regular files ----------------------------------------


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_link_to_a_file_outside_the_source_is_refused(llama_ckpt, tmp_path, capsys):
    src = _copy(llama_ckpt, tmp_path / "src")
    secret = tmp_path / "token"
    secret.write_text("hf_secret")
    (src / "tokenizer_extra.json").symlink_to(secret)
    dst = tmp_path / "out"
    code = cli.main([str(src), str(dst), "--scheme", "FP8_DYNAMIC", "--device", "cpu", "-q"])
    err = capsys.readouterr().err
    assert code == 2 and "tokenizer_extra.json" in err and "outside the folder" in err
    assert not dst.exists() and leftovers(dst) == []


@pytest.mark.parametrize("kind", ["etc_hostname", "shard_outside", "dangling", "fifo", "folder_outside"])
def test_files_that_are_not_regular_files_inside_are_refused(llama_ckpt, tmp_path, kind):
    src = _copy(llama_ckpt, tmp_path / "src")
    if kind == "etc_hostname":
        target = Path("/etc/hostname") if Path("/etc/hostname").exists() else Path("/etc/passwd")
        (src / "generation_config.json").unlink()
        (src / "generation_config.json").symlink_to(target)
        name, word = "generation_config.json", "outside the folder"
    elif kind == "shard_outside":
        shard = next(src.glob("model-00002*.safetensors"))
        moved = tmp_path / shard.name
        shutil.move(shard, moved)
        shard.symlink_to(moved)
        name, word = shard.name, "outside the folder"
    elif kind == "dangling":
        (src / "extra.json").symlink_to(src / "missing.json")
        name, word = "extra.json", "cannot be read"
    elif kind == "fifo":
        os.mkfifo(src / "added_tokens.json")  # reading it would block forever
        name, word = "added_tokens.json", "named pipe"
    else:
        outside = tmp_path / "elsewhere"
        outside.mkdir()
        (outside / "secret.txt").write_text("x")
        (src / "original").symlink_to(outside)
        name, word = "original", "outside the source"
    with pytest.raises(InputError) as err:
        convert(str(src), str(tmp_path / "out"), scheme="FP8_DYNAMIC", device="cpu")
    assert name in str(err.value) and word in str(err.value)
    assert not (tmp_path / "out").exists()


def test_links_inside_the_source_and_hf_cache_snapshots_are_read(llama_ckpt, tmp_path):
    # an HF cache: snapshots/<rev>/<file> -> ../../blobs/<hash>
    repo = tmp_path / "hub" / "models--org--llama"
    snap = repo / "snapshots" / "0123abcd"
    blobs = repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for f in sorted(llama_ckpt.iterdir()):
        blob = blobs / hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copy(f, blob)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    # and a link inside the folder itself
    (snap / "tokenizer_copy.json").symlink_to("tokenizer.json")
    dst = tmp_path / "out"
    convert(str(snap), str(dst), scheme="FP8_DYNAMIC", device="cpu")
    assert (dst / "tokenizer_copy.json").read_bytes() == (llama_ckpt / "tokenizer.json").read_bytes()
    assert not (dst / "tokenizer_copy.json").is_symlink()

    # a sibling repo's blobs are not this snapshot's
    other = tmp_path / "hub" / "models--org--other" / "blobs"
    other.mkdir(parents=True)
    (other / "x").write_text("{}")
    (snap / "stolen.json").symlink_to(other / "x")
    with pytest.raises(InputError, match="stolen.json"):
        LocalSource(snap).files()


def test_file_swapped_for_a_link_after_listing_is_not_followed(llama_ckpt, tmp_path):
    src = _copy(llama_ckpt, tmp_path / "src")
    source = LocalSource(src)
    source.files()
    secret = tmp_path / "secret.json"
    secret.write_text('{"token": "hf_x"}')
    (src / "tokenizer_config.json").unlink()
    (src / "tokenizer_config.json").symlink_to(secret)
    with pytest.raises(InputError, match="tokenizer_config.json"):
        source.read_file("tokenizer_config.json")
    source.close()

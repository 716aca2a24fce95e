"""The command line as a person sees it: the CLI runs in a pseudo-terminal against localhub.

In a terminal: one set of three bars (read, quantized, uploaded), each log line once and whole
above them, no huggingface_hub bars, no ETA before there is signal for one. --quiet prints
nothing, --json only the JSON, `mirror --quiet` only its summary.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import select
import struct
import subprocess
import sys
import termios
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from streamer.localhub import LocalHub

REPO_ROOT = Path(__file__).resolve().parents[1]
ALICE = "hf_alice_token_0123456789"
SOURCE = "acme/tiny-llama"
COLUMNS, ROWS = 160, 40
THROTTLE = 500_000  # bytes/s each way: the run lasts long enough (~7 s) for a steady ETA


@pytest.fixture
def hub(tmp_path, llama_ckpt):
    with LocalHub(tmp_path / "hub") as h:
        h.add_user("alice", ALICE, orgs=["acme"])
        h.seed_repo(SOURCE, llama_ckpt)
        yield h


@pytest.fixture
def env(hub, tmp_path):
    """The child's environment: the client pointed at localhub, a terminal that can draw bars."""
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": ALICE, "HF_HOME": str(tmp_path / "hf_home"),
           "HF_HUB_DISABLE_XET": "1", "PYTHONPATH": str(REPO_ROOT), "TERM": "xterm-256color"}  # fmt: skip
    # settings that would hide what is tested (huggingface_hub's bars) or size the bars for us
    for name in ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_HUB_OFFLINE", "COLUMNS", "LINES"):
        env.pop(name, None)
    return env


# --------------------------------------------------------------------------------------------
# running a command in a pseudo-terminal
# --------------------------------------------------------------------------------------------


@dataclass
class Run:
    rc: int
    tty: str  # everything written to the terminal, escape sequences and all
    stdout: str  # what went to a pipe instead (empty when stdout was the terminal)
    stderr: str


def run_streamer(args: list[str], env: dict, cwd: Path, *, on_tty=("stdout", "stderr"), timeout: float = 300) -> Run:
    """`python -m streamer ARGS` with stdin and the streams in `on_tty` on a 160x40 terminal, the
    other streams on pipes; every stream is drained while it runs, so none can fill and block."""
    master, slave = os.openpty()
    # a new pty is 0x0, and tqdm would draw bars zero columns wide
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLUMNS, 0, 0))
    streams = {name: slave if name in on_tty else subprocess.PIPE for name in ("stdout", "stderr")}
    proc = subprocess.Popen([sys.executable, "-m", "streamer", *args], stdin=slave, **streams, env=env,
                            cwd=cwd, start_new_session=True)  # fmt: skip
    os.close(slave)  # the child holds the only copy: its exit ends the terminal's output
    readers = {master: "tty"}
    for name in ("stdout", "stderr"):
        if getattr(proc, name) is not None:
            readers[getattr(proc, name).fileno()] = name
    got = {name: b"" for name in ("tty", "stdout", "stderr")}
    deadline = time.monotonic() + timeout
    try:
        while readers:
            if time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(f"streamer {' '.join(args)} ran past {timeout} s:\n{got}")
            for fd in select.select(list(readers), [], [], 1.0)[0]:
                try:
                    data = os.read(fd, 1 << 16)
                except OSError:  # EIO: the terminal has no writer left
                    data = b""
                if data:
                    got[readers[fd]] += data
                else:
                    del readers[fd]
    finally:
        os.close(master)
    rc = proc.wait(timeout=60)
    for pipe in (proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()
    text = {name: data.decode(errors="replace") for name, data in got.items()}
    return Run(rc, text["tty"], text["stdout"], text["stderr"])


_TOKEN = re.compile(r"(\x1b\[[0-9;?]*[A-Za-z]|\r|\n)")


def screen(raw: str) -> list[str]:
    """The lines a terminal shows after RAW, scrollback included: carriage returns and cursor-up
    redraws overwrite what was there, as they do on screen. A line cut by a bar stays cut."""
    lines: list[list[str]] = [[]]
    row = col = 0
    for token in _TOKEN.split(raw):
        if token == "\r":
            col = 0
        elif token == "\n":
            row += 1
        elif token.startswith("\x1b["):
            n = int(token[2:-1]) if token[2:-1].isdigit() else 1
            if token[-1] == "A":
                row = max(row - n, 0)
            elif token[-1] == "B":
                row += n
            elif token[-1] == "K":
                del lines[row][col:]
            # colours and the like change no text
        else:
            while len(lines) <= row:
                lines.append([])
            line = lines[row]
            line.extend(" " * (col + len(token) - len(line)))
            line[col : col + len(token)] = token
            col += len(token)
        while len(lines) <= row:
            lines.append([])
    return ["".join(line).rstrip() for line in lines]


def drawn(raw: str) -> list[str]:
    """Every line as it was drawn, including ones that a redraw later replaced."""
    return [re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", s) for s in re.split(r"[\r\n]+", raw) if s.strip()]


BAR = re.compile(
    r"(?P<label>read|quantized|uploaded)\s+(?P<pct>\d+)%\|.*\|\s+(?P<done>[\d.]+ k?M?B) / (?P<total>[\d.]+ k?M?B)"
    r"\s+·\s+(?P<rate>–|[\d.]+ k?M?B/s) · (?P<eta>ETA –|ETA (?:\d+:)?\d+:\d\d|done)\s*$"
)


def seconds(eta: str) -> int:
    parts = [int(p) for p in eta.removeprefix("ETA ").split(":")]
    return sum(p * 60**i for i, p in enumerate(reversed(parts)))


def to_bytes(text: str) -> float:
    number, unit = text.split()
    return float(number) * {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9}[unit.removesuffix("/s")]


# --------------------------------------------------------------------------------------------
# in a terminal
# --------------------------------------------------------------------------------------------


def test_a_terminal_shows_each_line_once_above_three_bars(hub, env, tmp_path):
    hub.set_throttle(THROTTLE, THROTTLE)
    # The subject is a read the link paces: without the start-up reader, which would have the
    # tiny model in memory before the engine asks (its bytes show as done, unrated).
    env = {**env, "STREAMER_PREFETCH": "0"}
    run = run_streamer([SOURCE, "alice/tiny-fp8", "--scheme", "FP8_DYNAMIC", "--device", "cpu"], env, tmp_path)
    assert run.rc == 0, run.tty
    lines = screen(run.tty)

    # each log line once, whole, on a line of its own (not twice, not cut by a bar redraw)
    def one_line(pattern: str) -> str:
        hits = [ln for ln in lines if re.search(pattern, ln)]
        assert len(hits) == 1, (pattern, hits, run.tty)
        assert run.tty.count(hits[0]) == 1, hits[0]  # and written in one piece
        return hits[0]

    one_line(r"^converting acme/tiny-llama -> alice/tiny-fp8: 6 shard\(s\), \d+ weights with FP8_DYNAMIC on cpu$")
    for k in range(1, 7):
        one_line(rf"^wrote model-0000{k}-of-00006\.safetensors \([\d.]+ kB\)$")
    done = one_line(r"^done: http://127\.0\.0\.1:\d+/alice/tiny-fp8/commit/[0-9a-f]{40}$")
    url = done.removeprefix("done: ")

    # no bar but ours (huggingface_hub's "7:  40%|…", "Upload 0 LFS files: 0it"), not even one
    # drawn and then wiped
    every = drawn(run.tty)
    foreign = [s for s in every if "LFS files" in s or re.match(r"\s*\d+:", s) or "it/s" in s
               or (re.search(r"\d+%\|", s) and not re.match(r"(read|quantized|uploaded)\s", s))]  # fmt: skip
    assert not foreign, foreign
    # nothing but log lines, our bars and the URL, and no line twice
    words = [ln for ln in lines if ln and not BAR.search(ln)]
    known = re.compile(r"(converting|wrote|target|done:|quality:|http:) ?")
    assert all(known.match(ln) for ln in words), [ln for ln in words if not known.match(ln)]
    assert len(set(words)) == len(words), words

    # the screen ends with the three bars, finished, then the URL on stdout
    tail = [ln for ln in lines if ln][-4:]
    assert [BAR.search(ln)["label"] for ln in tail[:3]] == ["read", "quantized", "uploaded"], tail
    assert all(BAR.search(ln)["pct"] == "100" and ln.endswith("done") for ln in tail[:3]), tail
    assert tail[3] == url

    # rates are honest from the start, and an ETA appears only once there is signal for one
    renders = [m for m in map(BAR.search, every) if m]
    assert {m["label"] for m in renders} == {"read", "quantized", "uploaded"}
    first = {}
    for m in renders:
        first.setdefault(m["label"], m)
    assert all(m["eta"] in ("ETA –", "done") for m in first.values()), [m[0] for m in first.values()]
    rates = [to_bytes(m["rate"]) for m in renders if m["label"] == "read" and m["rate"] != "–"]
    assert rates and max(rates) < 2 * THROTTLE, rates  # a throttled link shows no 50x burst
    etas = [m for m in renders if m["eta"].startswith("ETA ") and m["eta"] != "ETA –"]
    assert any(m["label"] == "read" for m in etas), "no read ETA in a ~7 s read"
    for m in etas:  # seconds, never hours: the whole run moves 3.4 MB at 0.5 MB/s
        assert seconds(m["eta"]) <= 60, m[0]
    for m in (m for m in etas if m["label"] == "read"):  # the link bounds reading: its ETA is near the
        left = (to_bytes(m["total"]) - to_bytes(m["done"])) / THROTTLE  # truth (slack for a busy machine)
        assert seconds(m["eta"]) <= 4 * left + 5, m[0]


def test_rate_and_eta_follow_a_window_from_the_stage_start(monkeypatch):
    """Bytes arrive in whole pieces: a rate must span time, never one piece over microseconds."""
    from streamer.engine import progress as p

    clock = [100.0]
    monkeypatch.setattr(p.time, "monotonic", lambda: clock[0])
    prog = p.Progress()
    prog.set_total("read", 200_000_000)

    def pieces(n: int, every: float) -> p.ProgressEvent:
        for _ in range(n):
            clock[0] += every
            prog.advance("read", 10_000_000)
        return prog.snapshot("read")

    first = pieces(1, 10)  # the first 10 MB lands 10 s after reading could start
    assert first.rate == pytest.approx(1e6) and first.eta == pytest.approx(190)
    assert not first.steady  # one advance: no ETA to show yet
    faster = pieces(5, 2)  # the link speeds up to 5 MB/s: the last 20 s moved 60 MB
    assert faster.steady and faster.rate == pytest.approx(3e6) and faster.eta == pytest.approx(140e6 / 3e6)
    fast = pieces(5, 2)  # the slow start has left the window
    assert fast.rate == pytest.approx(5e6) and fast.eta == pytest.approx(18)

    clock[0] += p.WINDOW_S  # a stall: the rate falls and the ETA grows, both finite
    stalled = prog.snapshot("read")
    assert 0 < stalled.rate < fast.rate / 5 and stalled.eta > 10 * fast.eta

    prog.advance("read", 90_000_000)  # finished: the whole stage's average, 200 MB in 50 s
    done = prog.snapshot("read")
    assert done.steady and done.eta is None and done.rate == pytest.approx(4e6)


def test_bytes_handed_over_count_as_done_but_not_in_the_rate(monkeypatch):
    """A start-up reader's bytes arrive at memory speed: done at once, but the rate and ETA are
    the link's alone."""
    from streamer.engine import progress as p

    clock = [100.0]
    monkeypatch.setattr(p.time, "monotonic", lambda: clock[0])
    prog = p.Progress()
    prog.set_total("read", 100_000_000)
    clock[0] += 1
    prog.advance("read", 60_000_000, rated=False)  # held since the imports
    clock[0] += 4
    prog.advance("read", 8_000_000)  # the link: 8 MB in 5 s
    ev = prog.snapshot("read")
    assert ev.done == 68_000_000 and ev.rate == pytest.approx(1.6e6)
    assert ev.eta == pytest.approx(32e6 / 1.6e6)
    clock[0] += 20
    prog.advance("read", 32_000_000)  # finished: the average of what the link moved, 40 MB in 25 s
    assert prog.snapshot("read").rate == pytest.approx(1.6e6)


def test_bar_shows_no_eta_until_steady():
    from streamer.cli.terminal import bar_stats
    from streamer.engine.progress import ProgressEvent

    early = ProgressEvent("read", 1_000_000, 9_000_000, 1e6, 8.0, steady=False)
    later = ProgressEvent("read", 5_000_000, 9_000_000, 1e6, 4.0, steady=True)
    assert bar_stats(early).split("·")[-1].strip() == "ETA –"
    assert bar_stats(later).split("·")[-1].strip() == "ETA 0:04"
    assert bar_stats(ProgressEvent("upload", 0, 0)).split("·")[-1].strip() == "done"  # all resumed


# --------------------------------------------------------------------------------------------
# quiet
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tty", [True, False], ids=["terminal", "pipes"])
def test_quiet_prints_nothing(hub, env, tmp_path, tty):
    on_tty = ("stdout", "stderr") if tty else ()
    run = run_streamer([SOURCE, "alice/q", "--scheme", "FP8_DYNAMIC", "--device", "cpu", "--quiet"], env, tmp_path,
                       on_tty=on_tty)  # fmt: skip
    assert run.rc == 0, run
    assert (run.tty, run.stdout, run.stderr) == ("", "", "")
    assert "model-00006-of-00006.safetensors" in hub.files("alice/q")  # it did run


def test_json_quiet_prints_only_the_json(hub, env, tmp_path):
    # stderr on the terminal, where huggingface_hub's bars would draw; stdout to a program
    run = run_streamer([SOURCE, "alice/j", "--scheme", "FP8_DYNAMIC", "--device", "cpu", "--json", "--quiet"],
                       env, tmp_path, on_tty=("stderr",))  # fmt: skip
    assert run.rc == 0, run
    assert run.tty == ""
    summary = json.loads(run.stdout)
    assert summary["bytes_written"] == summary["bytes_out"] > 0 and "/alice/j/commit/" in summary["url"]


def test_mirror_quiet_prints_only_its_summary(hub, env, tmp_path):
    jobs = tmp_path / "jobs.toml"
    jobs.write_text(
        f'[[job]]\nname = "tiny-fp8"\nsource = "{SOURCE}"\ntarget = "alice/m"\nscheme = "FP8_DYNAMIC"\ndevice = "cpu"\n'
    )
    run = run_streamer(["mirror", str(jobs), "--quiet"], env, tmp_path, on_tty=("stderr",))
    assert run.rc == 0, run
    assert run.tty == ""
    table = run.stdout.splitlines()
    assert table[0].split()[:2] == ["job", "status"] and table[1].split()[:2] == ["tiny-fp8", "converted"], run.stdout
    assert len(table) == 3 and table[-1].startswith("1 job(s): 1 converted"), run.stdout

"""Helpers shared by the benchmarks: child processes with exact peak RSS, page cache, sizes, tables."""

from __future__ import annotations

import json
import mmap
import os
import shutil
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
WORK = Path(os.environ.get("STREAMER_BENCH_DIR", "/tmp/streamer-bench"))
PY = sys.executable
MB = 1_000_000
GB = 1_000_000_000


@dataclass
class Proc:
    """A finished child process: exit code, output, wall time and kernel accounting (wait4)."""

    cmd: list[str]
    rc: int
    stdout: str
    stderr: str
    wall: float
    maxrss: int  # bytes, exact peak RSS of the child (ru_maxrss), not of its own children
    written: int  # bytes the child wrote to storage (ru_oublock * 512)
    tree_peak: int = 0  # peak of the summed RSS of the child and its descendants (psutil polling)
    cpu: float = 0.0  # user + system CPU seconds of the child
    extra: dict = field(default_factory=dict)

    def result_json(self, marker: str = "@@RESULT ") -> dict:
        for line in reversed(self.stdout.splitlines()):
            if line.startswith(marker):
                return json.loads(line[len(marker):])
            if marker == "" and line.startswith("{"):
                return json.loads(line)
        raise RuntimeError(f"no {marker!r} line in the output of {' '.join(self.cmd)}:\n{self.stdout[-2000:]}\n{self.stderr[-4000:]}")

    def check(self) -> "Proc":
        if self.rc != 0:
            raise RuntimeError(f"{' '.join(self.cmd)} failed (exit {self.rc}):\n{self.stderr[-6000:]}")
        return self


def run(cmd: list[str], *, env: dict | None = None, cwd: str | Path | None = None, poll: float = 0.02,
        timeout: float | None = None) -> Proc:
    """Run CMD, capture its output, and report its wall time, ru_maxrss and bytes written.

    The RSS of the whole process tree is also polled (psutil) every POLL seconds, as a cross-check
    and for commands that start their own children.
    """
    import psutil

    t0 = time.perf_counter()
    # pipes, not files: the child's own disk writes are measured (ru_oublock)
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=cwd)
    chunks: dict[str, list[bytes]] = {"out": [], "err": []}

    def drain(stream, key: str) -> None:
        for block in iter(lambda: stream.read1(1 << 16), b""):
            chunks[key].append(block)

    readers = [threading.Thread(target=drain, args=(p.stdout, "out"), daemon=True),
               threading.Thread(target=drain, args=(p.stderr, "err"), daemon=True)]
    for r in readers:
        r.start()
    peak = 0
    stop = threading.Event()

    def watch() -> None:
        nonlocal peak
        try:
            proc = psutil.Process(p.pid)
        except psutil.Error:
            return
        while not stop.is_set():
            try:
                total = proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(recursive=True))
                peak = max(peak, total)
            except psutil.Error:
                pass
            stop.wait(poll)

    th = threading.Thread(target=watch, daemon=True)
    th.start()
    try:
        if timeout is None:
            _, status, ru = os.wait4(p.pid, 0)
        else:
            deadline = time.monotonic() + timeout
            while True:
                pid, status, ru = os.wait4(p.pid, os.WNOHANG)
                if pid:
                    break
                if time.monotonic() > deadline:
                    p.kill()
                    _, status, ru = os.wait4(p.pid, 0)
                    break
                time.sleep(0.05)
    except BaseException:
        p.kill()
        p.wait()
        raise
    finally:
        stop.set()
        th.join()
    wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    for r in readers:
        r.join()
    p.stdout.close()
    p.stderr.close()
    stdout = b"".join(chunks["out"]).decode(errors="replace")
    stderr = b"".join(chunks["err"]).decode(errors="replace")
    return Proc(cmd, p.returncode, stdout, stderr, wall, ru.ru_maxrss * 1024, ru.ru_oublock * 512, peak,
                ru.ru_utime + ru.ru_stime)


def safetensors_files(folder: Path) -> list[Path]:
    return sorted(Path(folder).glob("*.safetensors"))


def _read_all(paths, view: memoryview) -> None:
    """Read each file whole through one reusable buffer (the bytes are thrown away)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            pos = 0
            while n := os.preadv(fd, [view], pos):
                pos += n
        finally:
            os.close(fd)


def warm(folder: Path) -> float:
    """Read every file of FOLDER once (page cache warm); returns the seconds it took."""
    t0 = time.perf_counter()
    _read_all([p for p in sorted(Path(folder).rglob("*")) if p.is_file()], memoryview(bytearray(64 << 20)))
    return time.perf_counter() - t0


def page_cache_read_speed(folder: Path, repeats: int = 3) -> float:
    """Bytes/s of reading every shard of FOLDER with os.preadv into one 64 MiB buffer (cache warm)."""
    files = safetensors_files(folder)
    total = sum(f.stat().st_size for f in files)
    view = memoryview(bytearray(64 << 20))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        _read_all(files, view)
        best = min(best, time.perf_counter() - t0)
    return total / best


def tree_bytes(folder: Path) -> int:
    """Bytes of local disk a folder tree takes (allocated blocks), 0 if it does not exist."""
    folder = Path(folder)
    if not folder.exists():
        return 0
    total = 0
    for dirpath, _, files in os.walk(folder):
        for fn in files:
            try:
                total += os.lstat(os.path.join(dirpath, fn)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total


def source_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in safetensors_files(folder))


def rm(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def make_checkpoint(dst: Path, gb: float, *extra: str, quiet: bool = True) -> Path:
    """bench/make_checkpoint.py DST --gb GB, unless DST already holds a checkpoint of that size."""
    dst = Path(dst)
    if (dst / "config.json").exists() and abs(source_bytes(dst) / GB - gb) < 0.15 * gb + 0.05:
        return dst
    print(f"# writing a {gb:g} GB Llama-shaped checkpoint to {dst} ...", file=sys.stderr, flush=True)
    cmd = [PY, str(BENCH / "make_checkpoint.py"), str(dst), "--gb", str(gb), "--force", *extra]
    r = subprocess.run(cmd, capture_output=quiet, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"make_checkpoint failed:\n{r.stderr}")
    if quiet:
        print("#", r.stdout.strip(), file=sys.stderr, flush=True)
    return dst


def _header(path: Path) -> tuple[dict, int]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)), 8 + n


def compare_fast(a: Path, b: Path) -> list[str]:
    """Differences between two checkpoints, tensor bytes compared through mmap (bounded memory).

    Same rules as tests/reference.py compare_checkpoints: shard names, each tensor's file, dtype,
    shape and raw bytes, the index weight_map and total_size, config.json (quantization_config
    keys config_groups/format/ignore/quant_method, and every other key). Used instead of
    compare_checkpoints for checkpoints too large to hold in memory twice.
    """
    out: list[str] = []
    fa = {p.name for p in safetensors_files(a)}
    fb = {p.name for p in safetensors_files(b)}
    if fa != fb:
        out.append(f"safetensors files differ: only in a {sorted(fa - fb)}, only in b {sorted(fb - fa)}")
    loc_a: dict[str, tuple] = {}
    loc_b: dict[str, tuple] = {}
    for folder, loc in ((a, loc_a), (b, loc_b)):
        for p in safetensors_files(folder):
            header, base = _header(p)
            for name, info in header.items():
                if name != "__metadata__":
                    loc[name] = (p, info["dtype"], tuple(info["shape"]), base + info["data_offsets"][0],
                                 base + info["data_offsets"][1])
    if set(loc_a) != set(loc_b):
        out.append(f"tensor names differ: only in a {sorted(set(loc_a) - set(loc_b))[:10]}, "
                   f"only in b {sorted(set(loc_b) - set(loc_a))[:10]}")
    maps: dict[Path, mmap.mmap] = {}

    def view(p: Path) -> mmap.mmap:
        if p not in maps:
            with open(p, "rb") as f:
                maps[p] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return maps[p]

    try:
        for name in sorted(set(loc_a) & set(loc_b)):
            pa, da, sa, s0, s1 = loc_a[name]
            pb, db, sb, t0, t1 = loc_b[name]
            if pa.name != pb.name:
                out.append(f"{name}: file {pa.name} != {pb.name}")
            if (da, sa) != (db, sb):
                out.append(f"{name}: {da}{list(sa)} != {db}{list(sb)}")
                continue
            ma, mb = view(pa), view(pb)
            step = 64 << 20
            for off in range(0, s1 - s0, step):
                n = min(step, s1 - s0 - off)
                if ma[s0 + off : s0 + off + n] != mb[t0 + off : t0 + off + n]:
                    out.append(f"{name}: data differs")
                    break
    finally:
        for m in maps.values():
            m.close()

    def js(p: Path):
        try:
            return json.loads(p.read_text())
        except FileNotFoundError:
            return None

    ia, ib = js(a / "model.safetensors.index.json"), js(b / "model.safetensors.index.json")
    if (ia is None) != (ib is None):
        out.append("index present in one only")
    elif ia is not None:
        if ia.get("weight_map") != ib.get("weight_map"):
            out.append("index weight_map differs")
        if ia.get("metadata", {}).get("total_size") != ib.get("metadata", {}).get("total_size"):
            out.append("index total_size differs")
    ca, cb = js(a / "config.json"), js(b / "config.json")
    if (ca is None) != (cb is None):
        out.append("config.json present in one only")
    elif ca is not None:
        qa, qb = ca.pop("quantization_config", None) or {}, cb.pop("quantization_config", None) or {}
        for k in ("config_groups", "format", "ignore", "quant_method"):
            if qa.get(k) != qb.get(k):
                out.append(f"quantization_config.{k} differs")
        if ca != cb:
            out.append(f"config.json differs in {sorted(k for k in set(ca) | set(cb) if ca.get(k) != cb.get(k))}")
    return out


def compare(a: Path, b: Path) -> list[str]:
    """tests/reference.py compare_checkpoints when both fit in memory easily, else compare_fast."""
    size = source_bytes(a) + source_bytes(b)
    if size < 3 * GB:
        sys.path.insert(0, str(REPO / "tests"))
        from reference import compare_checkpoints

        return compare_checkpoints(a, b)
    return compare_fast(a, b)


def table(rows: list[list], header: list[str]) -> str:
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = []
    for k, r in enumerate(cells):
        lines.append("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def mb(n: float) -> str:
    return f"{n / MB:,.0f} MB"


def gb(n: float) -> str:
    return f"{n / GB:.2f} GB"


def load_line() -> str:
    """Machine context printed with every result: cores, load average, torch threads."""
    try:
        la = os.getloadavg()
        load = f"load avg {la[0]:.1f}/{la[1]:.1f}"
    except OSError:
        load = "load n/a"
    return f"{os.cpu_count()} cores, {load}"

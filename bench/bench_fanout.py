"""Fan-out (issue 18): one read of the source for three schemes, against separate runs.

    python bench/bench_fanout.py                   # 2.1 GB, 8 shards, 200 MB/s down / 100 MB/s up, CPU
    python bench/bench_fanout.py --quick           # a 0.3 GB checkpoint, 2 shards: a smoke check
    python bench/bench_fanout.py --device auto     # on a GPU machine
    python bench/bench_fanout.py --schemes FP8_DYNAMIC,W4A16,NVFP4A16 --single FP8_DYNAMIC --down 200 --up 100

A Llama-shaped bf16 checkpoint (bench/make_checkpoint.py, reused when already there) is seeded
into a localhub server (`streamer.localhub`, its own process) whose link is throttled per
direction. Every conversion is `python -m streamer ... --device D --json` in a fresh process,
timed as a whole (interpreter start-up and imports included, as a user waits for them):

1. one single-scheme run (--single, default FP8_DYNAMIC), on its own server;
2. three separate single-scheme runs, one per scheme of --schemes, one after the other on one
   server (their outputs differ, so none finds its content already uploaded);
3. one fan-out run: `python -m streamer SRC --to DST1 S1 --to DST2 S2 --to DST3 S3`, on a fresh
   server (it would otherwise find the separate runs' identical shards already there).

Bytes downloaded are counted by the server (its request log: the body bytes of every GET of a
`.safetensors` file, start-up reader included), uploaded bytes likewise (every request body).
The source's size is the sum of its `.safetensors` files: tensor bytes + headers. Printed: a
row per run with its wall time, the pipeline's own seconds, bytes down and up, downloaded /
source, the transfer floor max(down bytes / down rate, up bytes / up rate) for what it must
move, and CPU seconds; then fan-out / one run, fan-out / three separate runs, the downloaded
ratios, the fan-out's shared-read figures from its `--json`, and whether each fan-out target
holds the same files as the separate run of its scheme (LFS sha256 / git blob id of every file
but README.md, whose card names its own repo). Wall times move with the machine's load (printed).

Figures use MB = 10^6 bytes; the throttle rates are MB/s.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import GB, MB, PY, REPO, WORK, load_line, make_checkpoint, rm, run, safetensors_files, table  # noqa: E402

TOKEN = "hf_bench_token_0123456789"
ORG = "bench"
SRC_REPO = f"{ORG}/llama-bf16"
LOG_FIELDS = ("method", "file", "status", "bytes_out", "bytes_in")

# localhub in its own process, whose request log the bench can read: each line written to its
# stdin names a file, where the log so far is written as JSON (answered "ok"); EOF stops it, so
# it does not outlive the bench.
HUB_MAIN = f"""
import json, sys
from streamer.localhub.__main__ import build_parser, build_hub
args = build_parser().parse_args(sys.argv[1:])
hub = build_hub(args).start()
print(f"localhub serving {{args.root}} on {{hub.url}}", flush=True)
for line in sys.stdin:
    with open(line.strip(), "w") as f:
        json.dump([{{k: getattr(r, k) for k in {LOG_FIELDS!r}}} for r in hub.request_log], f)
    print("ok", flush=True)
hub.stop()
"""


@dataclass
class Traffic:
    """What the server saw during one run."""

    downloaded: int  # body bytes of GETs of .safetensors files
    uploaded: int  # request body bytes of every request (LFS uploads, commits)


def traffic(records: list[dict]) -> Traffic:
    """Bytes down (safetensors GETs, as tests/test_fanout.py counts them) and up in RECORDS."""
    down = sum(r["bytes_out"] for r in records if r["method"] == "GET" and (r["file"] or "").endswith(".safetensors"))
    return Traffic(down, sum(r["bytes_in"] for r in records))


class Server:
    """A seeded, throttled localhub in its own process; `requests()` returns the log since the last call."""

    def __init__(self, root: Path, src: Path, down: float, up: float):
        rm(root)
        root.mkdir(parents=True)
        cmd = [PY, "-c", HUB_MAIN, "--root", str(root), "--user", f"bench:{TOKEN}:{ORG}",
               "--seed", f"{SRC_REPO}={src}", "--throttle-down", str(down), "--throttle-up", str(up)]  # fmt: skip
        self.root = root
        self.logfile = root.parent / f"{root.name}-requests.json"
        self.stderr = open(root.parent / f"{root.name}.log", "w+")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
                                     text=True, cwd=REPO)
        self.url = None
        self.seen = 0
        for line in self.proc.stdout:
            if line.startswith("localhub serving"):
                self.url = line.split(" on ")[-1].strip()
                break
        if self.url is None:
            self.stderr.seek(0)
            raise RuntimeError(f"localhub did not start:\n{self.stderr.read()[-3000:]}")

    def env(self, home: Path) -> dict:
        env = dict(os.environ)
        # LFS, as bench_hub.py: Xet uploads would be reassembled in Python on the timed cores.
        env.update(HF_ENDPOINT=self.url, HF_HUB_DISABLE_XET="1", HF_TOKEN=TOKEN, HF_HOME=str(home),
                   HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
        return env

    def requests(self) -> list[dict]:
        """The requests the server saw since the previous call, in arrival order."""
        self.proc.stdin.write(f"{self.logfile}\n")
        self.proc.stdin.flush()
        if self.proc.stdout.readline().strip() != "ok":
            raise RuntimeError("localhub did not write its request log")
        log = json.loads(self.logfile.read_text())
        new, self.seen = log[self.seen:], len(log)
        return new

    def files(self, repo: str, env: dict) -> dict[str, str]:
        """path -> LFS sha256 (or git blob id for small files) on the repo's main branch."""
        code = ("import json; from huggingface_hub import HfApi; "
                f"i = HfApi().model_info({repo!r}, files_metadata=True); "
                "print(json.dumps({s.rfilename: s.lfs.sha256 if s.lfs else s.blob_id for s in i.siblings}))")
        r = subprocess.run([PY, "-c", code], capture_output=True, text=True, env=env, check=True)
        return json.loads(r.stdout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()
        self.stderr.close()
        rm(self.root)
        self.logfile.unlink(missing_ok=True)
        Path(self.stderr.name).unlink(missing_ok=True)


@dataclass
class Run:
    """One conversion process, as timed and as the server saw it."""

    label: str
    wall: float  # process wall time, start-up and imports included
    seconds: float  # the conversion's own seconds (--json)
    cpu: float  # user + system CPU seconds of the process
    traffic: Traffic
    summary: dict  # its --json


def header_bytes(folder: Path) -> int:
    """Bytes of the safetensors headers (8-byte length + JSON) of FOLDER's shards."""
    total = 0
    for p in safetensors_files(folder):
        with open(p, "rb") as f:
            total += 8 + struct.unpack("<Q", f.read(8))[0]
    return total


def convert(server: Server, home: Path, label: str, args: list[str], opts: argparse.Namespace) -> Run:
    """Run `python -m streamer SRC_REPO *ARGS --json` in a fresh process against SERVER."""
    env = server.env(home)
    if opts.threads:
        env["OMP_NUM_THREADS"] = str(opts.threads)
    cmd = [PY, "-m", "streamer", SRC_REPO, *args, "--device", opts.device, "--json"]
    if opts.max_memory:
        cmd += ["--max-memory", opts.max_memory]
    print(f"# {label}: {' '.join(cmd[2:])}", file=sys.stderr, flush=True)
    p = run(cmd, env=env, cwd=REPO).check()
    summary = json.loads(p.stdout[p.stdout.index("{"):])
    t = traffic(server.requests())
    r = Run(label, p.wall, float(summary.get("seconds") or 0.0), p.cpu, t, summary)
    print(f"#   {r.wall:.1f} s, {t.downloaded / MB:,.0f} MB down, {t.uploaded / MB:,.0f} MB up", file=sys.stderr, flush=True)
    return r


def repo_for(kind: str, scheme: str) -> str:
    return f"{ORG}/fanout-{kind}-{scheme.lower().replace('_', '-')}"


def same_files(a: dict[str, str], b: dict[str, str]) -> str:
    """'yes (N files)' when A and B hold the same files (README.md aside), else what differs."""
    a = {k: v for k, v in a.items() if k != "README.md"}
    b = {k: v for k, v in b.items() if k != "README.md"}
    diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return f"yes ({len(a)} files)" if a and not diff else f"NO: {diff or 'no files'}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", type=Path, help="an existing bf16 checkpoint folder (default: generate one)")
    ap.add_argument("--gb", type=float, help="size of the generated checkpoint (default 2.1; 0.3 with --quick)")
    ap.add_argument("--shards", type=int, help="shards of the generated checkpoint (default 8; 2 with --quick)")
    ap.add_argument("--quick", action="store_true", help="a small checkpoint (0.3 GB, vocab 8000): a smoke check")
    ap.add_argument("--down", type=float, default=200, help="download limit, MB/s (default 200)")
    ap.add_argument("--up", type=float, default=100, help="upload limit, MB/s (default 100)")
    ap.add_argument("--schemes", default="FP8_DYNAMIC,W4A16,NVFP4A16", help="the fan-out's schemes, comma-separated")
    ap.add_argument("--single", default="FP8_DYNAMIC", help="the scheme of the single-scheme run (default FP8_DYNAMIC)")
    ap.add_argument("--device", default="cpu", help="streamer --device (cpu; auto on a GPU machine)")
    ap.add_argument("--max-memory", help="streamer --max-memory (e.g. 4GB)")
    ap.add_argument("--threads", type=int, help="OMP_NUM_THREADS for every conversion (default: unset)")
    args = ap.parse_args(argv)
    schemes = [s.strip() for s in args.schemes.split(",") if s.strip()]
    gb_, shards = args.gb or (0.3 if args.quick else 2.1), args.shards or (2 if args.quick else 8)

    WORK.mkdir(parents=True, exist_ok=True)
    if args.src:
        src = args.src
    elif args.quick and not args.gb:
        src = make_checkpoint(WORK / f"ckpt-{gb_:g}gb-{shards}s-v8000", gb_, "--shards", str(shards), "--vocab", "8000")
    else:
        src = make_checkpoint(WORK / f"ckpt-{gb_:g}gb-{shards}s", gb_, "--shards", str(shards))
    files = safetensors_files(src)
    src_bytes = sum(f.stat().st_size for f in files)  # tensor bytes + headers
    hdr = header_bytes(src)
    down, up = args.down * MB, args.up * MB
    home = WORK / "fanout-hf_home"  # fresh: no upload journal of an earlier bench run
    rm(home)
    print(f"# source {src}: {src_bytes / GB:.3f} GB in {len(files)} shards ({hdr:,} B of headers); link "
          f"{args.down:g} MB/s down, {args.up:g} MB/s up; schemes {','.join(schemes)}; single {args.single}; "
          f"device {args.device}; {load_line()}", flush=True)

    def floor(t: Traffic) -> float:
        return max(t.downloaded / down, t.uploaded / up)

    # 1. one single-scheme run
    server = Server(WORK / "fanout-hub-single", src, args.down, args.up)
    try:
        single = convert(server, home, f"one run ({args.single})", [repo_for("one", args.single), "--scheme", args.single], args)
    finally:
        server.stop()

    # 2. three separate runs, one server (distinct outputs: nothing is found already uploaded)
    server = Server(WORK / "fanout-hub-separate", src, args.down, args.up)
    try:
        separate = [convert(server, home, f"separate: {s}", [repo_for("sep", s), "--scheme", s], args) for s in schemes]
        sep_files = {s: server.files(repo_for("sep", s), server.env(home)) for s in schemes}
    finally:
        server.stop()

    # 3. the fan-out, on a fresh server
    server = Server(WORK / "fanout-hub-fanout", src, args.down, args.up)
    try:
        targets = [a for s in schemes for a in ("--to", repo_for("fan", s), s)]
        fan = convert(server, home, f"fan-out ({len(schemes)} schemes)", targets, args)
        fan_files = {s: server.files(repo_for("fan", s), server.env(home)) for s in schemes}
    finally:
        server.stop()
    rm(home)

    sep_total = Run(f"{len(schemes)} separate runs, total", sum(r.wall for r in separate),
                    sum(r.seconds for r in separate), sum(r.cpu for r in separate),
                    Traffic(sum(r.traffic.downloaded for r in separate), sum(r.traffic.uploaded for r in separate)), {})
    floors = {id(r): floor(r.traffic) for r in [single, *separate, fan]}
    floors[id(sep_total)] = sum(floors[id(r)] for r in separate)  # one after the other
    rows = []
    for r in [single, *separate, sep_total, fan]:
        rows.append([r.label, f"{r.wall:.1f}", f"{r.seconds:.1f}", f"{r.traffic.downloaded / MB:,.1f}",
                     f"{r.traffic.downloaded / src_bytes:.3f}x", f"{r.traffic.uploaded / MB:,.1f}",
                     f"{floors[id(r)]:.1f}", f"{r.cpu:.1f}"])
    print()
    print(f"Fan-out through localhub, {src_bytes / GB:.2f} GB bf16 ({len(files)} shards), {','.join(schemes)}; "
          f"link {args.down:g} MB/s down / {args.up:g} MB/s up; --device {args.device} ({load_line()})")
    print(table(rows, ["run", "wall s", "convert s", "down MB (.safetensors GET)", "down / source", "up MB",
                       "transfer floor s", "CPU s"]))
    print(f"source = {src_bytes:,} B (.safetensors files: tensor bytes + {hdr:,} B of headers)")
    slowest = max(separate, key=lambda r: r.wall)
    ratios = [(f"fan-out / one run ({args.single})", fan.wall, single.wall),
              (f"fan-out / {len(schemes)} separate runs", fan.wall, sep_total.wall),
              (f"fan-out / slowest separate run ({slowest.label.split(': ')[-1]})", fan.wall, slowest.wall)]
    width = max(len(name) for name, _, _ in ratios)
    for name, a, b in ratios:
        print(f"{name.ljust(width)} = {a / b:.2f}x  ({a:.1f} s / {b:.1f} s)")
    print(f"downloaded / source: fan-out {fan.traffic.downloaded / src_bytes:.3f}x, {len(schemes)} separate runs "
          f"{sep_total.traffic.downloaded / src_bytes:.3f}x, one run {single.traffic.downloaded / src_bytes:.3f}x")
    s = fan.summary
    print(f"fan-out --json: bytes_read {s.get('bytes_read', 0):,} B, bytes_shared {s.get('bytes_shared', 0):,} B, "
          f"peak_shared_bytes {s.get('peak_shared_bytes', 0) / MB:,.1f} MB; "
          f"targets {[(t.get('scheme'), t.get('status')) for t in s.get('targets', [])]}")
    for sch in schemes:
        print(f"identical to the separate run ({sch}): {same_files(fan_files[sch], sep_files[sch])}")
    print("expectation (issue 18): downloaded = one source (+ headers); fan-out well under 3x one run "
          "when the download is the limit")
    return 0


if __name__ == "__main__":
    sys.exit(main())

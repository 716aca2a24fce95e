"""How long the command line takes before it does anything: the fast paths of issue 15.

    python bench/bench_startup.py [--runs 5]

Wall time (median of RUNS fresh interpreters) of:
  - `python -m streamer --help` and `python -m streamer mirror --help`;
  - one mirroring tick whose jobs are all up to date, against a localhub on loopback (two jobs:
    the source's commit and each target's card are read, nothing else);
  - `python -c "import streamer.engine.convert"`: what any conversion pays before its first byte.
Then `python -X importtime` of that engine import: the 5 modules with the largest cumulative
import time, and the 5 largest third-party packages. tests/test_startup.py checks that the first three import neither torch nor
compressed-tensors; this prints what they cost.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PY, REPO, load_line, table  # noqa: E402

TOKEN = "hf_bench_local_only_token"
JOBS = """
[defaults]
scheme = "FP8_DYNAMIC"
device = "cpu"

[[job]]
name = "fp8"
source = "org/tiny"
target = "bench/tiny-FP8"

[[job]]
name = "w4"
source = "org/tiny"
target = "bench/tiny-W4A16"
scheme = "W4A16"
"""


def timed(cmd: list[str], runs: int, env: dict | None = None) -> tuple[float, float]:
    """(median, min) wall seconds of RUNS runs of CMD, each in a fresh process; a failure stops."""
    walls = []
    for _ in range(runs):
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
        walls.append(time.perf_counter() - t0)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return statistics.median(walls), min(walls)


def import_times(module: str) -> list[tuple[str, float, float]]:
    """(module, cumulative s, self s) of every import made when MODULE is imported in a fresh
    interpreter (`python -X importtime`), in the order they finished."""
    proc = subprocess.run([PY, "-X", "importtime", "-c", f"import {module}"], capture_output=True,
                          text=True, cwd=REPO, check=True)  # fmt: skip
    rows = []
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        self_us, cum_us, name = (part.strip() for part in line[len("import time:"):].split("|"))
        rows.append((name, int(cum_us) / 1e6, int(self_us) / 1e6))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5, help="fresh processes per command (default 5)")
    args = ap.parse_args(argv)

    from streamer.cli.demo import write_tiny_llama
    from streamer.localhub import LocalHub

    print(f"# bench_startup: {load_line()}, python {sys.version.split()[0]}, {args.runs} runs each")
    rows = []
    for label, cmd in (
        ("python -m streamer --help", [PY, "-m", "streamer", "--help"]),
        ("python -m streamer mirror --help", [PY, "-m", "streamer", "mirror", "--help"]),
    ):
        rows.append([label, *(f"{s:.3f}" for s in timed(cmd, args.runs))])

    with tempfile.TemporaryDirectory(prefix="streamer-bench-startup-") as tmp:
        root = Path(tmp)
        with LocalHub(root / "hub") as hub:
            hub.add_user("bench", TOKEN, orgs=["org"])
            hub.seed_repo("org/tiny", write_tiny_llama(root / "tiny", hidden=128, intermediate=256, layers=2, vocab=512))
            env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN, "HF_HOME": str(root / "hf_home")}
            env.pop("HF_HUB_OFFLINE", None)
            (root / "jobs.toml").write_text(JOBS)
            tick = [PY, "-m", "streamer", "mirror", str(root / "jobs.toml"), "--quiet"]
            first = subprocess.run(tick, capture_output=True, text=True, env=env, cwd=REPO)
            if first.returncode != 0 or "2 converted" not in first.stdout:
                raise SystemExit(f"the first mirroring run did not publish both jobs:\n{first.stdout}{first.stderr[-2000:]}")
            rows.append(["mirror tick, 2 jobs up to date (localhub)", *(f"{s:.3f}" for s in timed(tick, args.runs, env))])

    engine = "streamer.engine.convert"
    rows.append([f'python -c "import {engine}"', *(f"{s:.3f}" for s in timed([PY, "-c", f"import {engine}"], args.runs))])
    print(table(rows, ["command", "median s", "min s"]))
    times = import_times(engine)
    largest = sorted(times, key=lambda r: -r[1])[:5]
    # the same, one line per third-party package: the nested chain above names the same cost
    # several times (convert > plan > schemes > compressed_tensors > …)
    packages = sorted((r for r in times if "." not in r[0] and r[0] != "streamer"), key=lambda r: -r[1])[:5]
    for title, rows in (("largest cumulative imports", largest), ("largest third-party packages", packages)):
        print(f"\n# python -X importtime -c 'import {engine}': {title}")
        print(table([[name, f"{cum:.3f}", f"{own:.3f}"] for name, cum, own in rows], ["module", "cumulative s", "self s"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

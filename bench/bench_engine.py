"""Engine throughput, local -> local: streamer vs llm-compressor's model_free_ptq, same checkpoint, same run.

    python bench/bench_engine.py                       # ~1 GB checkpoint, CPU, FP8_DYNAMIC + NVFP4A16
    python bench/bench_engine.py --device cuda --gb 9  # GPU machine: the Llama-8B-shaped ~9 GB checkpoint

For each scheme: the source's page cache is warmed (every file read once), streamer runs
(bench/_timed_convert.py: `streamer.engine.convert.convert` in a fresh process), the cache is warmed again,
then the reference runs (bench/_ref_timed.py: llm-compressor's `model_free_ptq`, the same call as
tests/refscripts/model_free_ptq.py, with tests/reference.py's python and environment). Both times
are the library call only, interpreter start-up and imports excluded, timed inside each process
around `convert()` / `model_free_ptq()`; each also reports the call's process CPU time (all
threads), steadier than wall time on a shared machine. Process wall times are printed too.

MB/s = source safetensors bytes / seconds. The outputs are compared tensor by tensor (raw bytes,
dtypes, shapes, shard names, index, quantization_config): "identical" means no difference.
The raw page-cache read speed (all shard bytes read with os.preadv into one buffer) is the
ceiling for a local conversion; the engine's fraction of it is printed.

Targets: streamer >= 2x the reference on the 2-core CPU (FP8_DYNAMIC and NVFP4A16) with identical
output; >= 3x on one GPU with the 9 GB checkpoint. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    BENCH, GB, MB, PY, REPO, WORK, compare, load_line, make_checkpoint, page_cache_read_speed, rm, run,
    source_bytes, table, warm,
)

sys.path.insert(0, str(REPO / "tests"))
import reference  # noqa: E402


def run_streamer(src: Path, dst: Path, scheme: str, args) -> dict:
    rm(dst)
    cmd = [PY, str(BENCH / "_timed_convert.py"), str(src), str(dst), scheme, "--device", args.device,
           "--workers", str(args.workers), "--ignore", json.dumps(args.ignore)]
    if args.max_memory:
        cmd += ["--max-memory", str(args.max_memory)]
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    p = run(cmd, cwd=REPO, env=env).check()
    res = p.result_json()
    return {"seconds": res["seconds"], "cpu": res["cpu_seconds"], "wall": p.wall, "maxrss": p.maxrss,
            "summary": res["summary"], "threads": res.get("threads")}


def run_ref(src: Path, dst: Path, scheme: str, workers: int, args) -> dict:
    """model_free_ptq in the reference venv (tests/reference.py's python and environment), timed
    around the call by bench/_ref_timed.py (wall and process CPU time, imports excluded)."""
    rm(dst)
    py = reference._python_or_raise(None)
    cmd = [str(py), str(BENCH / "_ref_timed.py"), str(src), str(dst), scheme, "--ignore", json.dumps(args.ignore),
           "--max-workers", str(workers), "--device", args.device]
    env = reference._env()
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    p = run(cmd, env=env, cwd=BENCH).check()
    res = p.result_json()
    return {"seconds": res["seconds"], "cpu": res["cpu_seconds"], "wall": p.wall, "maxrss": p.maxrss}


def verdict(diffs: list[str]) -> tuple[str, list[str]]:
    """'yes' when nothing differs but quantization_config keys that one side writes as null / {}
    (compressed-tensors 0.19 in the reference venv serializes unset fields, 0.20 omits them)."""
    nulls = [d for d in diffs if d.startswith("quantization_config.") and re.search(r"only in [ab] = (null|\{\})$", d)]
    rest = [d for d in diffs if d not in nulls]
    if rest:
        return f"NO ({len(rest)} diffs)", rest
    return ("yes" + (f" (+{len(nulls)} null cfg keys)" if nulls else "")), []


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", type=Path, help="an existing bf16 checkpoint folder (default: generate one)")
    ap.add_argument("--gb", type=float, default=1.0, help="size of the generated checkpoint (default 1.0; 9 = Llama-8B-shaped)")
    ap.add_argument("--schemes", default="FP8_DYNAMIC,NVFP4A16")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (both sides run on it)")
    ap.add_argument("--workers", type=int, default=4, help="streamer --workers (default 4)")
    ap.add_argument("--max-memory", type=int, help="streamer byte budget (default: its own default)")
    ap.add_argument("--ref-workers", default=None,
                    help="model_free_ptq max_workers, comma-separated, best is used (default 1,2 on cpu, 8 on cuda)")
    ap.add_argument("--ignore", type=json.loads, default=[], help='JSON list, e.g. \'["lm_head"]\' (both sides)')
    ap.add_argument("--threads", type=int,
                    help="OMP_NUM_THREADS for both sides (default: streamer's torch default = all cores; "
                         "the reference's tests/reference.py environment = min(cores, 4))")
    ap.add_argument("--repeat", type=int, default=1, help="runs per side; the fastest counts")
    ap.add_argument("--no-reference", action="store_true", help="streamer only")
    ap.add_argument("--keep", action="store_true", help="keep the outputs under the work dir")
    args = ap.parse_args(argv)
    ref_workers = [int(w) for w in (args.ref_workers or ("1,2" if args.device == "cpu" else "8")).split(",")]
    if not args.no_reference and reference.reference_python() is None:
        print(f"# no reference venv at {reference.reference_venv()}: streamer only", file=sys.stderr)
        args.no_reference = True

    WORK.mkdir(parents=True, exist_ok=True)
    src = args.src or make_checkpoint(WORK / f"ckpt-{args.gb:g}gb", args.gb)
    nbytes = source_bytes(src)
    out = WORK / "engine-out"
    out.mkdir(exist_ok=True)

    warm(src)
    cache_bps = page_cache_read_speed(src)
    print(f"# source {src}: {nbytes / GB:.3f} GB in {len(list(src.glob('*.safetensors')))} shards; "
          f"device {args.device}; {load_line()}", flush=True)

    rows = []
    for scheme in args.schemes.split(","):
        s_best, r_best = None, {}
        for _ in range(args.repeat):
            warm(src)
            s = run_streamer(src, out / f"{scheme}-streamer", scheme, args)
            print(f"  streamer {scheme}: {s['seconds']:.2f} s, CPU {s['cpu']:.1f} s (process {s['wall']:.1f} s, "
                  f"peak RSS {s['maxrss'] / GB:.2f} GB, torch threads {s['threads']}, "
                  f"stages {s['summary'].get('stage_seconds')})", flush=True)
            if s_best is None or s["seconds"] < s_best["seconds"]:
                s_best = s
            if args.no_reference:
                continue
            for w in ref_workers:
                warm(src)
                r = run_ref(src, out / f"{scheme}-ref-w{w}", scheme, w, args)
                print(f"  reference {scheme} max_workers={w}: {r['seconds']:.2f} s, CPU {r['cpu']:.1f} s "
                      f"(process {r['wall']:.1f} s, peak RSS {r['maxrss'] / GB:.2f} GB)", flush=True)
                if w not in r_best or r["seconds"] < r_best[w]["seconds"]:
                    r_best[w] = r
        identical = "-"
        if not args.no_reference:
            w_best = min(r_best, key=lambda w: r_best[w]["seconds"])
            diffs = compare(out / f"{scheme}-streamer", out / f"{scheme}-ref-w{ref_workers[0]}")
            identical, shown = verdict(diffs)
            for d in shown[:10]:
                print(f"    diff: {d}")
        s_mbs = nbytes / s_best["seconds"] / MB
        row = [scheme, f"{s_best['seconds']:.2f}", f"{s_mbs:.0f}", f"{s_best['cpu']:.1f}", f"{s_best['maxrss'] / GB:.2f}",
               f"{100 * nbytes / s_best['seconds'] / cache_bps:.1f}%"]
        if args.no_reference:
            row += ["-"] * 6
        else:
            r = r_best[w_best]
            row += [f"{r['seconds']:.2f} (w={w_best})", f"{nbytes / r['seconds'] / MB:.0f}", f"{r['cpu']:.1f}",
                    f"{r['seconds'] / s_best['seconds']:.2f}x", f"{r['cpu'] / s_best['cpu']:.2f}x", identical]
        rows.append(row)
        if not args.keep:
            for p in out.glob(f"{scheme}-*"):
                rm(p)

    print()
    print(f"engine throughput, local -> local, {nbytes / GB:.2f} GB bf16 Llama-shaped, device {args.device}, "
          f"page cache warm ({load_line()})")
    print(f"raw page-cache read (os.preadv, 64 MiB buffer): {cache_bps / MB:,.0f} MB/s")
    print(table(rows, ["scheme", "streamer s", "MB/s", "CPU s", "peak RSS GB", "of cache read",
                       "reference s", "MB/s", "CPU s", "speed-up", "CPU-time ratio", "identical"]))
    target = 2 if args.device == "cpu" else 3
    print(f"target: speed-up >= {target}x with identical output.  speed-up = reference s / streamer s (wall of "
          f"the library call, imports excluded); CPU-time ratio = reference CPU s / streamer CPU s (process CPU "
          f"time of the call, all threads: steadier than wall time on a shared machine)")
    if not args.keep:
        rm(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

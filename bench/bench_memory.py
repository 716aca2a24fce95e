"""Peak memory of a conversion at two model sizes under the same --max-memory.

    python bench/bench_memory.py                         # 1 GB and 4 GB models, --max-memory 1GB, local and Hub
    python bench/bench_memory.py --sizes 1,4 --max-memory 1GB --modes local,hub --scheme FP8_DYNAMIC

For each size a Llama-shaped bf16 checkpoint is generated (bench/make_checkpoint.py, 4 shards:
the 4 GB model's shards are ~1 GB in, ~0.5 GB out in FP8, larger than budget/3 and than the whole
budget's share a Hub upload may hold, so jobs must be cut into pieces). Then

- local: `python -m streamer SRC DST --scheme S --device cpu --max-memory B --json`
- hub:   the same from a localhub repo to another (`python -m streamer.localhub`, unthrottled); the
         Hub sink holds each output shard in memory until it is uploaded

and the child's exact peak RSS (ru_maxrss from wait4) is compared with the budget plus the fixed
overhead: the peak RSS of an idle `python -c "import streamer.engine.convert, torch"` (local) or
`... streamer.io.hub_sink, streamer.io.hub_source` (hub). Target: the larger model stays within
budget + overhead, and its peak is not larger than the smaller model's by more than noise (peak RSS
independent of model size).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import GB, MB, PY, REPO, WORK, load_line, make_checkpoint, rm, run, source_bytes, table  # noqa: E402


def parse_size(text: str) -> int:
    sys.path.insert(0, str(REPO))
    from streamer.formats import parse_size as ps

    return ps(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1,4", help="model sizes in GB, comma-separated (default 1,4)")
    ap.add_argument("--max-memory", default="1GB", help="the budget passed to streamer (default 1GB)")
    ap.add_argument("--modes", default="local,hub", help="local, hub or both (default both)")
    ap.add_argument("--scheme", default="FP8_DYNAMIC")
    ap.add_argument("--shards", type=int, default=4, help="shards per generated model (default 4)")
    ap.add_argument("--threads", type=int, help="OMP_NUM_THREADS for streamer (default: unset)")
    ap.add_argument("--keep-checkpoints", action="store_true")
    args = ap.parse_args(argv)
    budget = parse_size(args.max_memory)
    sizes = [float(s) for s in args.sizes.split(",")]
    modes = args.modes.split(",")
    WORK.mkdir(parents=True, exist_ok=True)
    import os

    base_env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    if args.threads:
        base_env["OMP_NUM_THREADS"] = str(args.threads)

    overhead = {
        "local": run([PY, "-c", "import streamer.engine.convert, torch"], cwd=REPO, env=base_env).check().maxrss,
        "hub": run([PY, "-c", "import streamer.engine.convert, streamer.io.hub_sink, streamer.io.hub_source, torch, huggingface_hub"], cwd=REPO, env=base_env).check().maxrss,
    }
    print(f"# budget {budget / MB:,.0f} MB; fixed overhead (idle imports): local {overhead['local'] / MB:,.0f} MB, "
          f"hub {overhead['hub'] / MB:,.0f} MB; {load_line()}", flush=True)

    rows = []
    peaks: dict[tuple, int] = {}
    for size in sizes:
        src = make_checkpoint(WORK / f"mem-{size:g}gb", size, "--shards", str(args.shards))
        nbytes = source_bytes(src)
        largest = max(f.stat().st_size for f in src.glob("*.safetensors"))
        for mode in modes:
            cmd_tail = ["--scheme", args.scheme, "--device", "cpu", "--max-memory", str(budget), "--json"]
            if mode == "local":
                dst = WORK / f"mem-out-{size:g}"
                rm(dst)
                p = run([PY, "-m", "streamer", str(src), str(dst), *cmd_tail], cwd=REPO, env=base_env)
                rm(dst)
            else:
                sys.path.insert(0, str(Path(__file__).resolve().parent))
                from bench_hub import SRC_REPO, Server

                server = Server(WORK / "hub-mem", src, 0, 0)
                try:
                    env = {**server.env(WORK / "hf_home"), **{k: v for k, v in base_env.items() if k == "OMP_NUM_THREADS"}}
                    p = run([PY, "-m", "streamer", SRC_REPO, "bench/mem-out", *cmd_tail], cwd=REPO, env=env)
                finally:
                    server.stop()
            if p.rc != 0:
                err = p.stderr.strip().splitlines()[-1] if p.stderr.strip() else f"exit {p.rc}"
                print(f"  {mode} {size:g} GB: FAILED: {err}", flush=True)
                rows.append([f"{size:g} GB", mode, f"{nbytes / GB:.2f}", f"{largest / MB:,.0f}", "failed", "-", "-", "-", "-"])
                continue
            summary = json.loads(p.stdout[p.stdout.index("{"):])
            peaks[(mode, size)] = p.maxrss
            limit = budget + overhead[mode]
            print(f"  {mode} {size:g} GB: peak RSS {p.maxrss / MB:,.0f} MB (tree poll {p.tree_peak / MB:,.0f} MB), "
                  f"budget peak {summary.get('peak_buffered_bytes', 0) / MB:,.0f} MB, {p.wall:.1f} s", flush=True)
            rows.append([f"{size:g} GB", mode, f"{nbytes / GB:.2f}", f"{largest / MB:,.0f}", f"{p.maxrss / MB:,.0f}",
                         f"{summary.get('peak_buffered_bytes', 0) / MB:,.0f}", f"{limit / MB:,.0f}",
                         f"{(p.maxrss - overhead[mode]) / budget:.2f}", "yes" if p.maxrss <= limit else "NO"])
        if not args.keep_checkpoints:
            rm(src)

    print()
    print(f"peak RSS, {args.scheme}, --max-memory {budget / MB:,.0f} MB ({load_line()})")
    print(table(rows, ["model", "mode", "GB in", "largest shard MB", "peak RSS MB", "budget peak MB",
                       "budget+overhead MB", "(RSS-overhead)/budget", "within"]))
    for mode in modes:
        have = [(s, peaks[(mode, s)]) for s in sizes if (mode, s) in peaks]
        if len(have) >= 2:
            (s0, r0), (s1, r1) = have[0], have[-1]
            print(f"{mode}: {s1:g} GB model peak / {s0:g} GB model peak = {r1 / r0:.2f}x "
                  f"(model {s1 / s0:.0f}x larger)")
    print("target: the larger model stays within budget + overhead")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Hub -> Hub through localhub on a throttled link: streamer vs download + quantize + upload.

    python bench/bench_hub.py                        # 2.1 GB checkpoint, 8 shards, 200 MB/s down, 100 MB/s up
    python bench/bench_hub.py --down 200 --up 100 --gb 2.1 --shards 8 --scheme FP8_DYNAMIC

A Llama-shaped bf16 checkpoint (bench/make_checkpoint.py) is seeded into a localhub server
(`python -m streamer.localhub`, its own process) whose link is throttled per direction. Then:

1. streamer: `python -m streamer SRC_REPO DST_REPO --scheme S --device cpu --json` (range reads,
   shards uploaded as they are ready, one commit). Wall time of the process vs the floor
   max(source bytes / down, output bytes / up); target <= 1.15x. Local disk written by it
   (the process's block-output count) is printed: target 0. Also printed: the whole-shard
   floor (the transfers alone when each output shard can only be uploaded once it is complete,
   as LFS requires), and the wall time less interpreter start-up and imports. Fast start (issue
   15): when the first range request reached the server, counted from the process start (the
   server logs each request's time; target <= 0.5 s: the reader of streamer/io/prefetch.py reads
   while the engine imports), and streamer against the whole-shard floor including start-up
   (target <= 1.25x). --no-prefetch runs streamer without that reader, for comparison.
2. moving the bytes alone (`bench/_transfer_only.py`): the same client code, server and link
   read every source shard and upload output shards of the sizes streamer produced, nothing
   quantized: what the machine's HTTP stack and the link allow, the practical floor.
3. the path users take today, on the same server and link: `snapshot_download` the whole repo,
   quantize the folder locally (streamer's local engine; with --reference-quantize also
   llm-compressor's model_free_ptq, timed alone and added to the same download and upload
   times), `upload_folder`. Target: streamer <= 0.6x its time.

Each path runs against a fresh server root seeded with the same checkpoint, so neither finds
the other's uploads already on the server (LFS skips content the server has). Both targets are
checked to hold identical shards (LFS sha256 of every *.safetensors, the index and config.json).

Figures use MB = 10^6 bytes; the throttle rates are MB/s.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    BENCH, GB, MB, PY, REPO, WORK, load_line, make_checkpoint, rm, run, source_bytes, table,
)
from _hubserver import ORG, HubServer  # noqa: E402

SRC_REPO = f"{ORG}/llama-bf16"


class Server(HubServer):
    """The shared localhub server (bench/_hubserver.py), seeded with SRC as SRC_REPO, throttled to
    DOWN / UP MB/s (0: no limit), logging each request's time."""

    def __init__(self, root: Path, src: Path, down: float, up: float):
        super().__init__(root, seed={SRC_REPO: src}, down=down or None, up=up or None, log_requests=True)


def whole_shard_floor(sizes_in: list[int], sizes_out: list[int], down: float, up: float) -> float:
    """The transfer time alone when each output shard can only be uploaded once complete (LFS
    needs its sha256 first): shard i's upload starts when its download has finished and the
    previous upload is done. Shards in the run's order; no start-up, no compute."""
    downloaded = uploaded = 0.0
    for n_in, n_out in zip(sizes_in, sizes_out):
        downloaded += n_in / down
        uploaded = max(uploaded, downloaded) + n_out / up
    return uploaded


def model_files(shas: dict) -> dict:
    return {k: v for k, v in shas.items() if k.endswith(".safetensors") or k in ("model.safetensors.index.json", "config.json")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", type=Path, help="an existing bf16 checkpoint folder (default: generate one)")
    ap.add_argument("--gb", type=float, default=2.1, help="size of the generated checkpoint (default 2.1)")
    ap.add_argument("--shards", type=int, default=8, help="shards of the generated checkpoint (default 8)")
    ap.add_argument("--down", type=float, default=200, help="download limit, MB/s (default 200)")
    ap.add_argument("--up", type=float, default=100, help="upload limit, MB/s (default 100)")
    ap.add_argument("--scheme", default="FP8_DYNAMIC")
    ap.add_argument("--workers", type=int, help="streamer --workers")
    ap.add_argument("--max-memory", help="streamer --max-memory (e.g. 4GB)")
    ap.add_argument("--threads", type=int, help="OMP_NUM_THREADS for streamer and the baseline (default: unset)")
    ap.add_argument("--reference-quantize", action="store_true",
                    help="also time llm-compressor's model_free_ptq on the downloaded snapshot (baseline variant)")
    ap.add_argument("--no-prefetch", action="store_true",
                    help="run streamer without its start-up reader (STREAMER_PREFETCH=0), for comparison")
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--skip-transfer", action="store_true", help="do not time moving the bytes alone")
    args = ap.parse_args(argv)

    WORK.mkdir(parents=True, exist_ok=True)
    src = args.src or make_checkpoint(WORK / f"ckpt-{args.gb:g}gb-{args.shards}s", args.gb, "--shards", str(args.shards))
    src_bytes = source_bytes(src)
    n_shards = len(list(src.glob("*.safetensors")))
    down, up = args.down * MB, args.up * MB
    print(f"# source {src}: {src_bytes / GB:.3f} GB in {n_shards} shards; link {args.down:g} MB/s down, "
          f"{args.up:g} MB/s up; {args.scheme}; {load_line()}", flush=True)
    home = WORK / "hf_home"
    rows = []
    results: dict = {}

    # 1. streamer, Hub -> Hub
    server = Server(WORK / "hub-a", src, args.down, args.up)
    try:
        print(f"# localhub at {server.url} (seeded in {server.seed_seconds:.1f} s)", flush=True)
        env = server.env(home)
        if args.threads:
            env["OMP_NUM_THREADS"] = str(args.threads)
        if args.no_prefetch:
            env["STREAMER_PREFETCH"] = "0"
        dst = f"{ORG}/llama-streamer"
        cmd = [PY, "-m", "streamer", SRC_REPO, dst, "--scheme", args.scheme, "--device", "cpu", "--json"]
        if args.workers:
            cmd += ["--workers", str(args.workers)]
        if args.max_memory:
            cmd += ["--max-memory", args.max_memory]
        imp = run([PY, "-c", "import streamer.engine.convert, streamer.io.hub_sink, streamer.io.hub_source"], env=env, cwd=REPO).check()
        srv_cpu = server.cpu()
        started = time.time()
        p = run(cmd, env=env, cwd=REPO).check()
        srv_cpu = server.cpu() - srv_cpu
        first_range = min((t for t in server.request_times('" 206 ') if t >= started), default=float("nan")) - started
        # The engine's own request for the source's file list (the reader's, when there is one,
        # comes first): when its imports were done, to compare with the imports alone.
        ready = max(server.request_times(f'"GET /api/models/{SRC_REPO}[/?]'), default=float("nan")) - started
        summary = json.loads(p.stdout[p.stdout.index("{"):])
        out_bytes = summary["bytes_out"]
        s_files = server.files(dst)
        s_shas = model_files({k: sha for k, (sha, _) in s_files.items()})
    finally:
        server.stop()
    out_files = out_bytes  # tensor bytes; headers are a few KB
    floor = max(src_bytes / down, out_files / up)
    shard_names = summary["shards"]  # in the order the jobs ran
    shard_sizes = [(src / n).stat().st_size for n in shard_names]
    shard_floor = whole_shard_floor(shard_sizes, [s_files[n][1] for n in shard_names], down, up)
    results["streamer"] = p.wall
    print(f"  streamer: {p.wall:.2f} s (pipeline {summary.get('seconds')} s, stages {summary.get('stage_seconds')}, "
          f"peak RSS {p.maxrss / GB:.2f} GB, budget peak {summary.get('peak_buffered_bytes', 0) / GB:.2f} GB, "
          f"local disk written {p.written} B; CPU {p.cpu:.1f} s + server {srv_cpu:.1f} s of "
          f"{(os.cpu_count() or 1) * p.wall:.0f} core-s; interpreter start + imports {imp.wall:.1f} s; "
          f"first range request {first_range:.2f} s after the process started, the engine's first "
          f"request {ready:.2f} s after)", flush=True)
    rows.append(["streamer Hub->Hub", f"{p.wall:.1f}", "-", "-", "-", f"{p.wall / floor:.2f}x", f"{p.written / MB:.1f} MB",
                 f"{p.maxrss / GB:.2f} GB"])
    rows.append(["  same, less start-up + imports", f"{p.wall - imp.wall:.1f}", "-", "-", "-",
                 f"{(p.wall - imp.wall) / floor:.2f}x", "", ""])

    # 2. the same bytes moved with the same client, server and link, nothing quantized
    if not args.skip_transfer:
        server = Server(WORK / "hub-c", src, args.down, args.up)
        try:
            sizes = json.dumps([[n, s_files[n][1]] for n in shard_names])
            t = run([PY, str(BENCH / "_transfer_only.py"), SRC_REPO, f"{ORG}/llama-transfer", sizes],
                    env=server.env(home), cwd=REPO).check()
            moved = t.result_json()["seconds"]
            results["transfer"] = moved
        finally:
            server.stop()
        print(f"  moving the bytes alone: {moved:.2f} s (after imports; CPU {t.cpu:.1f} s)", flush=True)
        rows.append(["moving the bytes alone (no quantize)", f"{moved:.1f}", "-", "-", "-", f"{moved / floor:.2f}x",
                     "0 MB", f"{t.maxrss / GB:.2f} GB"])

    # 3. the baseline
    identical = "-"
    if not args.skip_baseline:
        server = Server(WORK / "hub-b", src, args.down, args.up)
        base_dir = WORK / "baseline"
        rm(base_dir)
        base_dir.mkdir()
        try:
            env = server.env(home)
            if args.threads:
                env["OMP_NUM_THREADS"] = str(args.threads)
            dst = f"{ORG}/llama-baseline"
            b = run([PY, str(BENCH / "_baseline_hub.py"), SRC_REPO, dst, str(base_dir), args.scheme], env=env, cwd=REPO).check()
            res = b.result_json()
            b_shas = model_files(server.shas(dst))
            identical = "yes" if b_shas == s_shas and s_shas else f"NO: {sorted(k for k in set(b_shas) | set(s_shas) if b_shas.get(k) != s_shas.get(k))}"
            total = res["total"]
            results["baseline"] = total
            results["baseline-process"] = b.wall
            print(f"  baseline: {total:.2f} s = download {res['download']:.2f} + quantize {res['quantize']:.2f} + "
                  f"upload {res['upload']:.2f} (process {b.wall:.1f} s); local disk {res['disk_bytes'] / GB:.2f} GB "
                  f"(snapshot {res['snapshot_bytes'] / GB:.2f} + output {res['output_bytes'] / GB:.2f})", flush=True)
            rows.append(["download+quantize+upload (streamer local engine)", f"{b.wall:.1f}", "-", "-", "-",
                         f"{b.wall / floor:.2f}x", f"{res['disk_bytes'] / MB:,.0f} MB", f"{b.maxrss / GB:.2f} GB"])
            rows.append(["  same, less start-up + imports", f"{total:.1f}", f"{res['download']:.1f}",
                         f"{res['quantize']:.1f}", f"{res['upload']:.1f}", f"{total / floor:.2f}x", "", ""])
            if args.reference_quantize:
                sys.path.insert(0, str(REPO / "tests"))
                import reference

                py = reference._python_or_raise(None)
                renv = reference._env()
                if args.threads:
                    renv["OMP_NUM_THREADS"] = str(args.threads)
                rout = base_dir / "reference"
                r = run([str(py), str(BENCH / "_ref_timed.py"), str(base_dir / "snapshot"), str(rout), args.scheme,
                         "--max-workers", "2"], env=renv, cwd=BENCH).check()
                rq = r.result_json()["seconds"]
                rtotal = res["download"] + rq + res["upload"]
                results["baseline-ref"] = rtotal
                rows.append(["download+model_free_ptq+upload", f"{rtotal:.1f}", f"{res['download']:.1f}", f"{rq:.1f}",
                             f"{res['upload']:.1f}*", f"{rtotal / floor:.2f}x", f"{res['disk_bytes'] / MB:,.0f} MB", "-"])
        finally:
            server.stop()
            rm(base_dir)

    print()
    print(f"Hub -> Hub through localhub, {src_bytes / GB:.2f} GB bf16 ({n_shards} shards) -> {out_files / GB:.2f} GB "
          f"{args.scheme}; link {args.down:g} MB/s down / {args.up:g} MB/s up ({load_line()})")
    print(f"floor = max(source {src_bytes / MB:,.0f} MB / {args.down:g} MB/s = {src_bytes / down:.1f} s, "
          f"output {out_files / MB:,.0f} MB / {args.up:g} MB/s = {out_files / up:.1f} s) = {floor:.1f} s")
    print(f"whole-shard floor = {shard_floor:.1f} s: transfers alone, each output shard uploaded once complete "
          f"(LFS needs its sha256 first), largest shard {max(shard_sizes) / MB:,.0f} MB in; "
          f"streamer = {results['streamer'] / shard_floor:.2f}x of it, "
          f"{results['streamer'] - shard_floor:.1f} s over it ({imp.wall:.1f} s of that is start-up + imports)")
    print(table(rows, ["path", "wall s", "download s", "quantize s", "upload s", "vs floor", "local disk", "peak RSS"]))
    # Like for like: whole process against whole process (the baseline pays its start-up once,
    # where a user running download, quantize and upload as three commands pays it three times),
    # and the work alone (each side less its interpreter start-up and imports).
    s_net = results["streamer"] - imp.wall
    if "transfer" in results:
        print(f"streamer / moving the bytes alone = {s_net / results['transfer']:.2f}x (less start-up + imports: "
              f"{s_net:.1f} s / {results['transfer']:.1f} s), {results['streamer'] / results['transfer']:.2f}x with them")
    if "baseline" in results:
        print(f"streamer / baseline (streamer engine) = {results['streamer'] / results['baseline-process']:.2f}x "
              f"(process wall: {results['streamer']:.1f} s / {results['baseline-process']:.1f} s), "
              f"{s_net / results['baseline']:.2f}x (less start-up + imports: {s_net:.1f} s / {results['baseline']:.1f} s)")
    if "baseline-ref" in results:
        print(f"streamer / baseline (model_free_ptq)  = {s_net / results['baseline-ref']:.2f}x (less start-up + imports; "
              "* upload time measured with the streamer engine's identical output)")
    print(f"identical shards on both targets: {identical}")
    print(f"streamer's local disk writes: {p.written:,} B (no model bytes; its upload journal under HF_HOME/streamer)")
    print(f"fast start: first range request {first_range:.2f} s after streamer's process started (target <= 0.5 s), "
          f"the engine's own first request {ready:.2f} s after (imports alone: {imp.wall:.1f} s); "
          f"streamer = {results['streamer'] / shard_floor:.2f}x the whole-shard floor with its start-up "
          f"(target <= 1.25x){' [run with --no-prefetch]' if args.no_prefetch else ''}")
    print("targets: streamer <= 1.15x the floor; streamer <= 0.6x the baseline, with 0 bytes of local disk")
    return 0


if __name__ == "__main__":
    sys.exit(main())

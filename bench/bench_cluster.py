"""Hub -> Hub on a Ray cluster of 1, 2 and 3 nodes, each node with its own throttled link.

    python bench/bench_cluster.py                      # 2.1 GB checkpoint, 12 shards, 20 MB/s down, 10 MB/s up per node
    python bench/bench_cluster.py --nodes 1 2 3 --down 20 --up 10 --gb 2.1 --shards 12 --scheme FP8_DYNAMIC

A Llama-shaped bf16 checkpoint (bench/make_checkpoint.py) is seeded into a localhub server
(`python -m streamer.localhub --host 0.0.0.0 --throttle-per-client`): every client address gets
its own link of --down / --up MB/s. For each cluster size N, a fresh server (so no run finds
another's uploads already there) and a fresh Ray cluster on this machine: a head that runs no
tasks, and N worker nodes with one CPU each, node k reaching the Hub as http://127.0.0.(k+1):PORT
(its own HF_ENDPOINT), so N nodes have N links. The driver runs
`python -m streamer SRC DST --scheme S --ray ADDRESS --json` and the time is the conversion's own
`seconds` (from the first task submitted to the last shard uploaded): cluster start-up, the
driver's imports, planning and the commit are excluded. Throughput = source bytes / seconds;
scaling = throughput / the one-node throughput; target >= 0.8 N while the per-node link is the
limit. Every run's shards are checked identical (LFS sha256) to the one-node run's.

On a machine with fewer cores than nodes the nodes share the CPU: pick links slow enough that
quantizing is not the limit (the default 20 MB/s down per node needs well under a core per node
for FP8), and read the printed CPU load next to the table.

Figures use MB = 10^6 bytes; the throttle rates are MB/s.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import GB, MB, PY, REPO, WORK, load_line, make_checkpoint, rm, source_bytes, table  # noqa: E402
from _hubserver import ORG, HubServer  # noqa: E402

SRC_REPO = f"{ORG}/llama-bf16"
RAY = str(Path(PY).parent / "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_env(server: HubServer, k: int, home: Path) -> dict:
    """The environment of the process on machine 127.0.0.K: its own link to the Hub, no Ray settings."""
    return {key: v for key, v in server.env(home, client=k).items() if not key.startswith("RAY_")}


class Cluster:
    """A head that runs no tasks, and N one-CPU worker nodes, node k on the Hub link 127.0.0.(k+1)."""

    def __init__(self, n: int, server: HubServer, root: Path, object_store: int):
        self.address = f"127.0.0.1:{free_port()}"
        self.workers: list[subprocess.Popen] = []
        common = [f"--object-store-memory={object_store}", "--disable-usage-stats"]
        subprocess.run(
            [RAY, "start", "--head", f"--port={self.address.split(':')[1]}", "--num-cpus=0",
             "--include-dashboard=false", *common],
            env=node_env(server, 1, root / "head"), check=True, capture_output=True, timeout=180,
        )  # fmt: skip
        import ray

        ray.init(address=self.address, logging_level="WARNING", log_to_driver=False)
        try:
            for k in range(2, n + 2):
                ports = [f"--{flag}={free_port()}" for flag in (
                    "node-manager-port", "object-manager-port", "metrics-export-port",
                    "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port")]  # fmt: skip
                self.workers.append(subprocess.Popen(
                    [RAY, "start", f"--address={self.address}", "--num-cpus=1", f'--resources={{"node{k}": 1}}',
                     "--block", *ports, *common],
                    env=node_env(server, k, root / f"node{k}"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                    start_new_session=True,
                ))  # fmt: skip
                deadline = time.time() + 120
                while sum(1 for x in ray.nodes() if x.get("Alive")) < k:
                    if time.time() > deadline:
                        raise RuntimeError(f"Ray node {k} did not come up")
                    time.sleep(0.5)
        finally:
            ray.shutdown()

    def stop(self) -> None:
        for p in self.workers:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()
        subprocess.run([RAY, "stop", "--force"], capture_output=True, timeout=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", type=Path, help="an existing bf16 checkpoint folder (default: generate one)")
    ap.add_argument("--gb", type=float, default=2.1, help="size of the generated checkpoint (default 2.1)")
    ap.add_argument("--shards", type=int, default=12, help="shards of the generated checkpoint (default 12)")
    ap.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 3], help="cluster sizes to run (default 1 2 3)")
    ap.add_argument("--down", type=float, default=20, help="download limit per node, MB/s (default 20)")
    ap.add_argument("--up", type=float, default=10, help="upload limit per node, MB/s (default 10)")
    ap.add_argument("--scheme", default="FP8_DYNAMIC")
    ap.add_argument("--max-memory", default="1GB", help="streamer --max-memory: each task's budget (default 1GB)")
    ap.add_argument("--no-quality", action="store_true",
                    help="streamer --no-quality: leave out the error measurement's CPU time, so that nodes sharing "
                         "a few cores are held by their links rather than by the CPU")
    args = ap.parse_args(argv)

    src = args.src or make_checkpoint(WORK / f"ckpt-{args.gb:g}gb-{args.shards}s", args.gb, "--shards", str(args.shards))
    total = source_bytes(src)
    shards = len(list(Path(src).glob("*.safetensors")))  # the generator may make fewer than asked
    print(f"# source {total / GB:.2f} GB in {shards} shards; per-node link {args.down:g} MB/s down, "
          f"{args.up:g} MB/s up; {os.cpu_count()} CPU core(s) shared by every node; "
          f"quality report {'off' if args.no_quality else 'on'}", file=sys.stderr)  # fmt: skip
    rows, base, ref = [], None, None
    for n in args.nodes:
        root = WORK / f"cluster-{n}"
        rm(root)
        server = HubServer(WORK / f"hub-cluster-{n}", seed={SRC_REPO: src}, down=args.down, up=args.up, per_client=True)
        cluster = None
        try:
            cluster = Cluster(n, server, root, object_store=100 * MB)
            dst = f"{ORG}/llama-{args.scheme.lower()}-{n}n"
            cmd = [PY, "-m", "streamer", SRC_REPO, dst, "--scheme", args.scheme, "--device", "cpu",
                   "--max-memory", args.max_memory, "--ray", cluster.address, "--json",
                   *(["--no-quality"] if args.no_quality else [])]  # fmt: skip
            t0 = time.monotonic()
            r = subprocess.run(cmd, capture_output=True, text=True, env=node_env(server, 1, root / "driver"), cwd=REPO)
            wall = time.monotonic() - t0
            if r.returncode != 0:
                raise RuntimeError(f"streamer --ray failed with {n} node(s):\n{r.stderr[-4000:]}")
            summary = json.loads(r.stdout)
            load = load_line()
            shas = {k: v for k, v in server.shas(dst).items() if k.endswith((".safetensors", ".json"))}
        finally:
            if cluster is not None:
                cluster.stop()
            server.stop()
        seconds = summary["seconds"]
        rate = total / seconds
        base = base or rate
        ref = ref or shas
        same = "yes" if {k: v for k, v in shas.items() if k != "README.md"} == ref else "NO"
        per_node = sorted(len(v["shards"]) for v in summary["nodes"].values())
        rows.append([n, f"{seconds:.1f}", f"{wall:.1f}", f"{rate / MB:.1f}", f"{rate / base:.2f}x",
                     f"{0.8 * n * base / MB:.1f}", "yes" if rate >= 0.8 * n * base else "no",
                     "/".join(map(str, per_node)), same])  # fmt: skip
        print(f"# {n} node(s): {seconds:.1f} s ({load})", file=sys.stderr, flush=True)
    print(table(rows, ["nodes", "seconds", "wall s", "MB/s", "scaling", "target MB/s", ">= 0.8N", "shards/node", "identical"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

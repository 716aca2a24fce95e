"""Hub -> Hub on a Ray cluster of 1, 2 and 3 nodes, each node with its own throttled link.

    python bench/bench_cluster.py                      # 2.1 GB checkpoint, 12 shards, 20 MB/s down, 10 MB/s up per node
    python bench/bench_cluster.py --nodes 1 2 3 --down 20 --up 10 --gb 2.1 --shards 12 --scheme FP8_DYNAMIC
    python bench/bench_cluster.py --down 10 --up 5 --shards 36 --split-layers   # the README's table

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

Next to each measured time the bench prints what the shard layout allows at best on those links
(`shard bound`): an LFS shard is uploaded once it is complete (and not at all when the Hub holds
its bytes already: an unquantized shard equal to the source's), so a node's upload link idles until
its first shard has arrived, and whole shards cannot even out the nodes' shares exactly. The
bound replays the engine's schedule on ideal links (shards submitted costliest first, each
started on the first node with a free task slot, one download at a time per node, uploads one
after another) and its scaling is the most this layout can show; a model with more, smaller
shards (`--shards 36 --split-layers`) comes closer to N.

On a machine with fewer cores than nodes the nodes share the CPU: pick links slow enough that
quantizing is not the limit (the default 20 MB/s down per node needs well under a core per node
for FP8), and read the printed CPU load next to the table.

Figures use MB = 10^6 bytes; the throttle rates are MB/s.
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import GB, MB, PY, REPO, WORK, load_line, make_checkpoint, rm, source_bytes, table  # noqa: E402
from _hubserver import ORG, HubServer  # noqa: E402

from streamer.engine.cluster import TASKS_PER_DEVICE  # noqa: E402

SRC_REPO = f"{ORG}/llama-bf16"
RAY = str(Path(PY).parent / "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_env(server: HubServer, k: int, home: Path) -> dict:
    """The environment of the process on machine 127.0.0.K: its own link to the Hub, no Ray settings."""
    return {key: v for key, v in server.env(home, client=k).items() if not key.startswith("RAY_")}


def shard_bound(shards: list[tuple[int, int]], nodes: int, down: float, up: float, slots: int) -> float:
    """Seconds to move SHARDS ((bytes in, bytes uploaded) each, in submission order) through
    NODES nodes with links of DOWN / UP MB/s and SLOTS tasks each, when nothing but the links and
    whole-shard uploads take time: a task downloads its shard once the node's download link is
    free, then uploads it once the node's upload link is free (a shard with nothing to upload
    ends with its download), and its slot then takes the next shard."""
    queue = list(shards)
    down_free, up_free = [0.0] * nodes, [0.0] * nodes
    ends: list[tuple[float, int]] = []

    def start(node: int, now: float) -> None:
        read, uploaded = queue.pop(0)
        down_free[node] = end = max(now, down_free[node]) + read / MB / down
        if uploaded:
            up_free[node] = end = max(end, up_free[node]) + uploaded / MB / up
        heapq.heappush(ends, (end, node))

    for _ in range(slots):  # the first wave: Ray fills every slot, a node at a time
        for node in range(nodes):
            if queue:
                start(node, 0.0)
    last = 0.0
    while ends:
        last, node = heapq.heappop(ends)
        if queue:
            start(node, last)
    return last


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
    ap.add_argument("--split-layers", action="store_true",
                    help="let the generated checkpoint's shard boundaries fall inside a layer (more shards than layers)")
    ap.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 3], help="cluster sizes to run (default 1 2 3)")
    ap.add_argument("--down", type=float, default=20, help="download limit per node, MB/s (default 20)")
    ap.add_argument("--up", type=float, default=10, help="upload limit per node, MB/s (default 10)")
    ap.add_argument("--scheme", default="FP8_DYNAMIC")
    ap.add_argument("--max-memory", default="1GB", help="streamer --max-memory: each task's budget (default 1GB)")
    ap.add_argument("--no-quality", action="store_true",
                    help="streamer --no-quality: leave out the error measurement's CPU time, so that nodes sharing "
                         "a few cores are held by their links rather than by the CPU")
    args = ap.parse_args(argv)

    split = ["--split-layers"] if args.split_layers else []
    src = args.src or make_checkpoint(
        WORK / f"ckpt-{args.gb:g}gb-{args.shards}s{'-split' if split else ''}", args.gb, "--shards", str(args.shards), *split
    )
    total = source_bytes(src)
    shards = len(list(Path(src).glob("*.safetensors")))  # the generator may make fewer than asked
    print(f"# source {total / GB:.2f} GB in {shards} shards; per-node link {args.down:g} MB/s down, "
          f"{args.up:g} MB/s up; {os.cpu_count()} CPU core(s) shared by every node; "
          f"quality report {'off' if args.no_quality else 'on'}", file=sys.stderr)  # fmt: skip
    rows, base, ref, bound_1 = [], None, None, None
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
            files = server.files(dst)
            seeded = {sha for sha, _ in server.files(SRC_REPO).values()}
            shas = {k: sha for k, (sha, _) in files.items() if k.endswith((".safetensors", ".json"))}
        finally:
            if cluster is not None:
                cluster.stop()
            server.stop()
        seconds = summary["seconds"]
        sizes_in = {p.name: p.stat().st_size for p in Path(src).glob("*.safetensors")}
        # output shards keep their names, submitted costliest first (bytes read plus written, as
        # the engine orders them); one whose bytes the Hub already holds (an unquantized shard
        # equal to the source's) is not uploaded again
        order = sorted(
            ((sizes_in[k], size, sha in seeded) for k, (sha, size) in files.items() if k in sizes_in),
            key=lambda s: -(s[0] + s[1]),
        )  # fmt: skip
        shards_io = [(read, 0 if held else size) for read, size, held in order]
        if not shards_io:
            raise RuntimeError(f"the output shards of {dst} are not named as the source's: no shard bound")
        bound = shard_bound(shards_io, n, args.down, args.up, TASKS_PER_DEVICE)
        bound_1 = bound_1 or shard_bound(shards_io, 1, args.down, args.up, TASKS_PER_DEVICE)
        rate = total / seconds
        base = base or rate
        ref = ref or shas
        same = "yes" if {k: v for k, v in shas.items() if k != "README.md"} == ref else "NO"
        per_node = sorted(len(v["shards"]) for v in summary["nodes"].values())
        rows.append([n, f"{seconds:.1f}", f"{wall:.1f}", f"{rate / MB:.1f}", f"{rate / base:.2f}x",
                     f"{0.8 * n * base / MB:.1f}", "yes" if rate >= 0.8 * n * base else "no",
                     f"{bound:.1f}", f"{bound_1 / bound:.2f}x", "/".join(map(str, per_node)), same])  # fmt: skip
        print(f"# {n} node(s): {seconds:.1f} s ({load})", file=sys.stderr, flush=True)
    heads = ["nodes", "seconds", "wall s", "MB/s", "scaling", "target MB/s", ">= 0.8N", "shard bound s", "bound scaling"]
    print(table(rows, [*heads, "shards/node", "identical"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

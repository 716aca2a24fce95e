"""Conversions on a real Ray cluster (three nodes on loopback) against localhub.

The cluster is small enough for a 2-core machine: a head and two worker nodes with one CPU
each, every node its own `ray start` process with a resource naming it, a 100 MB object store
and no dashboard. It is shut down in the fixture's finaliser whatever happens. One test adds a
fourth node in a mount namespace of its own, where the driver's checkpoint folder is an empty
tmpfs: a machine that does not see the folder.
"""

from __future__ import annotations

import difflib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import huggingface_hub
import pytest

from streamer.localhub import LocalHub

ray = pytest.importorskip("ray")

ALICE = "hf_alice_token_0123456789"
SOURCE = "acme/tiny-llama"
RAY = shutil.which("ray") or str(Path(sys.executable).parent / "ray")
COMMON = ["--num-cpus=1", "--object-store-memory=100000000", "--disable-usage-stats"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_env(home: Path) -> dict:
    """A node's environment: none of the test's Hub settings (the driver passes endpoint and
    token), its own HF_HOME (a resume record there would be lost with the node), LFS uploads."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "RAY_"))}
    env.update(HF_HOME=str(home), HF_HUB_DISABLE_XET="1", PYTHONUNBUFFERED="1")
    return env


class Cluster:
    """The test cluster: its address, and its worker nodes' `ray start --block` processes."""

    def __init__(self, root: Path):
        self.root = root
        self.address = f"127.0.0.1:{_free_port()}"
        self.client_address = f"ray://127.0.0.1:{_free_port()}"  # Ray Client, on the head
        self.workers: dict[str, subprocess.Popen] = {}

    def start(self) -> None:
        subprocess.run(
            [RAY, "start", "--head", f"--port={self.address.split(':')[1]}", "--node-ip-address=127.0.0.1",
             f"--ray-client-server-port={self.client_address.rsplit(':', 1)[1]}",
             '--resources={"head": 1}', "--include-dashboard=false", *COMMON],
            env=_node_env(self.root / "head"), check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        for n, name in enumerate(("w1", "w2"), start=2):
            self.add_worker(name)
            self.wait_nodes(n)  # one at a time: nodes starting together race for ports

    def add_worker(self, name: str, wrap: tuple[str, ...] = ()) -> None:
        """Start the worker node NAME (its resource is NAME), its command behind WRAP."""
        # its own session: killing the process group takes the raylet and its workers down at once
        # nodes on one machine: each its own ports (Ray's fixed defaults would collide)
        ports = [
            f"--{flag}={_free_port()}"
            for flag in ("node-manager-port", "object-manager-port", "metrics-export-port",
                         "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port")
        ]  # fmt: skip
        self.workers[name] = subprocess.Popen(
            [*wrap, RAY, "start", f"--address={self.address}", "--node-ip-address=127.0.0.1",
             f'--resources={{"{name}": 1}}', "--block", *ports, *COMMON],
            env=_node_env(self.root / name), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip

    def kill_worker(self, name: str) -> None:
        """The node dies at once: SIGKILL to its raylet's whole process group, and to every process
        it started (Ray's worker processes may sit in groups of their own, and would otherwise
        finish their task as orphans)."""
        import psutil

        proc = self.workers.pop(name)
        try:
            tree = psutil.Process(proc.pid).children(recursive=True)
        except psutil.Error:
            tree = []
        os.killpg(proc.pid, signal.SIGKILL)
        for child in tree:
            try:
                child.kill()
            except psutil.Error:
                pass
        proc.wait()

    def alive(self) -> list[dict]:
        return [n for n in ray.nodes() if n.get("Alive")]

    def wait_nodes(self, n: int, timeout: float = 90) -> None:
        if not ray.is_initialized():
            ray.init(address=self.address, logging_level="WARNING", log_to_driver=False)
        deadline = time.time() + timeout
        while len(self.alive()) < n:
            assert time.time() < deadline, f"only {len(self.alive())} of {n} Ray nodes came up"
            time.sleep(0.5)

    def wait_gone(self, node: str, timeout: float = 120) -> None:
        """Wait until the cluster has noticed that NODE died (no task is placed there any more)."""
        deadline = time.time() + timeout
        while any(n["NodeID"] == node for n in self.alive()):
            assert time.time() < deadline, f"Ray still sees the killed node {node[:8]} alive"
            time.sleep(0.5)

    def node_of(self, resource: str) -> str:
        return next(n["NodeID"] for n in self.alive() if resource in n["Resources"])

    def stop(self) -> None:
        try:
            if ray.is_initialized():
                ray.shutdown()
        finally:
            for name in list(self.workers):
                try:
                    self.kill_worker(name)
                except (ProcessLookupError, OSError):
                    pass
            subprocess.run([RAY, "stop", "--force"], capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("ray"))
    try:
        c.start()
        yield c
    finally:
        c.stop()


@pytest.fixture
def hub(tmp_path, monkeypatch, llama_ckpt, cluster):
    with LocalHub(tmp_path / "hub") as h:
        h.add_user("alice", ALICE, orgs=["acme"])
        h.seed_repo(SOURCE, llama_ckpt)
        home = tmp_path / "driver_home"
        monkeypatch.setenv("HF_ENDPOINT", h.url)
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
        monkeypatch.setenv("HF_HOME", str(home))
        monkeypatch.setattr(huggingface_hub.constants, "HF_HOME", str(home))
        monkeypatch.setenv("HF_TOKEN", ALICE)
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", h.url)
        monkeypatch.setattr(
            huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE", h.url + "/{repo_id}/resolve/{revision}/{filename}"
        )
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True, raising=False)
        yield h


def _convert(dst: str, scheme: str, executor=None, **kwargs):
    from streamer.engine.convert import convert

    return convert(SOURCE, dst, scheme=scheme, device="cpu", max_memory=256_000_000, executor=executor, **kwargs)


def _streamer_commits(hub, repo):
    return [c for c in hub.commits(repo) if "streamer" in c.message]


def _same_output(hub, a: str, b: str) -> None:
    """Every shard, the index and config.json of A and B are byte-identical (the cards name
    their own repo)."""
    fa, fb = hub.files(a), hub.files(b)
    assert fa.keys() == fb.keys()
    compared = [f for f in fa if f.endswith((".safetensors", ".json"))]
    assert any(f.endswith(".safetensors") for f in compared) and "config.json" in compared
    for f in compared:
        assert hub.read_file(a, f) == hub.read_file(b, f), f


def test_cluster_output_is_identical_in_one_commit(cluster, hub):
    from streamer.engine.cluster import RayExecutor

    from streamer.engine.progress import Progress

    last = {}
    progress = Progress(listeners=[lambda e: last.__setitem__(e.stage, e)])
    # the cluster first: the Hub keeps content it has seen, and the nodes must really upload
    # two shards per task: each task's pipeline uploads one while it downloads the next
    result = _convert("alice/cluster", "NVFP4A16", executor=RayExecutor(cluster.address, group=2), progress=progress)
    # the three bars, fed at the driver by what the nodes report, each reach their total
    for stage in ("read", "quantize", "upload"):
        assert last[stage].total > 0 and last[stage].done == last[stage].total, (stage, last[stage])
    _convert("alice/single", "NVFP4A16")
    _same_output(hub, "alice/single", "alice/cluster")
    # the card too (its quality report is made of what the nodes measured), but for its own name
    # (the repo's, in the title and the usage lines)
    card = hub.read_file("alice/cluster", "README.md").decode().replace("cluster", "single")
    single = hub.read_file("alice/single", "README.md").decode()
    assert card == single, [line for line in difflib.unified_diff(single.splitlines(), card.splitlines(), lineterm="")]
    assert result.quality is not None and result.summary()["quality"]
    assert len(_streamer_commits(hub, "alice/cluster")) == 1
    nodes = result.summary()["nodes"]
    # three tasks of two shards, spread: more than one node made shards, and every shard was made once
    assert len(nodes) >= 2, nodes
    made = sorted(s for n in nodes.values() for s in n["shards"])
    assert made == sorted(j.shard for j in result.plan.jobs)
    assert all(n["bytes_read"] > 0 and n["bytes_written"] > 0 and n["seconds"] > 0 for n in nodes.values())


def test_local_source_that_every_node_sees(cluster, hub, llama_ckpt):
    from streamer.engine.cluster import RayExecutor
    from streamer.engine.convert import convert

    convert(str(llama_ckpt), "alice/from-folder", scheme="W8A16", device="cpu", max_memory=256_000_000,
            executor=RayExecutor(cluster.address))  # fmt: skip
    _convert("alice/from-hub", "W8A16")
    _same_output(hub, "alice/from-hub", "alice/from-folder")


def test_a_ray_client_address(cluster, hub, tmp_path):
    """`--ray ray://head:PORT`, a Ray Client address (how a machine outside a KubeRay cluster
    reaches it), runs the same conversion: the same bytes, one commit."""
    env = {**os.environ, "HF_HOME": str(tmp_path / "client_home")}  # the Hub settings: the hub fixture's
    cmd = [sys.executable, "-m", "streamer", SOURCE, "alice/via-client", "--scheme", "W8A16", "--device", "cpu",
           "--max-memory", "256MB", "--ray", cluster.client_address, "--json"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout)
    made = sorted(s for n in summary["nodes"].values() for s in n["shards"])
    _convert("alice/single-w8", "W8A16")
    _same_output(hub, "alice/single-w8", "alice/via-client")
    assert made == sorted(f for f in hub.files("alice/via-client") if f.endswith(".safetensors"))
    assert len(_streamer_commits(hub, "alice/via-client")) == 1


def _hiding(folder: Path) -> tuple[str, ...]:
    """A command prefix that runs a process in its own mount namespace, where FOLDER is an empty
    tmpfs: a node started behind it is a machine that does not see the driver's folder."""
    mount = 'mount -t tmpfs none "$0" && exec "$@"'
    wrap = ("unshare", "--user", "--map-root-user", "--mount", "sh", "-c", mount, str(folder))
    probe = subprocess.run([*wrap, "ls", "-A", str(folder)], capture_output=True, text=True)
    if probe.returncode != 0 or probe.stdout.strip():
        pytest.skip(f"no unprivileged mount namespaces here (unshare: {probe.stderr.strip()[-200:]})")
    return wrap


def test_local_source_some_node_cannot_see_is_refused(cluster, hub, llama_ckpt):
    from streamer.engine.cluster import RayExecutor
    from streamer.engine.convert import convert
    from streamer.errors import StreamerError

    # a fourth node for which the checkpoint's folder is empty (same path, another filesystem)
    cluster.add_worker("w3", wrap=_hiding(llama_ckpt))
    try:
        cluster.wait_nodes(4)
        hub.clear_log()
        with pytest.raises(StreamerError) as e:
            convert(str(llama_ckpt), "alice/blind", scheme="W8A16", device="cpu", max_memory=256_000_000,
                    executor=RayExecutor(cluster.address))  # fmt: skip
    finally:
        node = cluster.node_of("w3") if any("w3" in n["Resources"] for n in cluster.alive()) else None
        cluster.kill_worker("w3")
        if node is not None:
            cluster.wait_gone(node)  # the next tests place no task there
    assert "not visible with the same files on 1 of the 4 node(s)" in e.value.message, e.value.message
    assert [h.setting for h in e.value.hints] == ["source"]
    # refused before any shard was made: nothing uploaded, nothing committed, no repo created
    assert not [r for r in hub.request_log if r.method == "PUT" or "/commit/" in r.path]
    assert not [r for r in hub.request_log if r.path.endswith("/repos/create")] and not hub.repo_exists("alice/blind")


def test_a_node_with_another_streamer_version_is_refused(cluster, hub, llama_ckpt, tmp_path):
    """Every node must run this streamer: a node whose `streamer` says another version (made so
    at its interpreters' start by a sitecustomize on its PYTHONPATH) stops the run before the
    target exists."""
    import streamer
    from streamer.engine.cluster import RayExecutor
    from streamer.engine.convert import convert
    from streamer.errors import StreamerError

    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text("import streamer\nstreamer.__version__ = '0.0.1'\n")
    cluster.add_worker("old", wrap=("env", f"PYTHONPATH={shim}"))
    try:
        cluster.wait_nodes(4)
        hub.clear_log()
        with pytest.raises(StreamerError) as e:
            convert(SOURCE, "alice/mixed", scheme="W8A16", device="cpu", max_memory=256_000_000,
                    executor=RayExecutor(cluster.address))  # fmt: skip
    finally:
        node = cluster.node_of("old") if any("old" in n["Resources"] for n in cluster.alive()) else None
        cluster.kill_worker("old")
        if node is not None:
            cluster.wait_gone(node)
    assert f"run streamer 0.0.1, this machine {streamer.__version__}" in e.value.message, e.value.message
    assert not [r for r in hub.request_log if r.path.endswith("/repos/create") or r.method == "PUT"]


def test_local_target_is_refused_with_ray(cluster, hub, tmp_path):
    from streamer.engine.cluster import RayExecutor
    from streamer.errors import StreamerError

    with pytest.raises(StreamerError) as e:
        _convert(str(tmp_path / "out"), "W8A16", executor=RayExecutor(cluster.address))
    assert "Hub repo" in e.value.message and not (tmp_path / "out").exists()


def test_shard_groups():
    from streamer.engine.cluster import GROUP_SHARDS, shard_groups

    shards = [f"s{i}" for i in range(7)]
    # GROUP_SHARDS shards per task, every shard once, in the plan's order when all cost the same
    groups = shard_groups(shards)
    assert [s for g in groups for s in g] == shards and {len(g) for g in groups} == {GROUP_SHARDS}
    assert shard_groups(shards, size=3) == [shards[0:3], shards[3:6], shards[6:7]]
    # the costliest first, so that the short ones even the nodes out at the end; ties keep their order
    costs = {s: 100 for s in shards} | {"s6": 250, "s0": 250, "s3": 1}
    assert [s for g in shard_groups(shards, costs=costs) for s in g] == ["s0", "s6", "s1", "s2", "s4", "s5", "s3"]
    assert shard_groups(shards, size=2, costs=costs) == [["s0", "s6"], ["s1", "s2"], ["s4", "s5"], ["s3"]]


def test_a_node_downloads_for_one_task_per_cpu_at_a_time():
    import threading

    from streamer.engine.cluster import DownloadTurn

    node = f"test-{os.getpid()}-{time.monotonic_ns()}"
    first, second, other = DownloadTurn(node, 1), DownloadTurn(node, 1), DownloadTurn(node + "-b", 1)
    first.acquire()
    other.acquire()  # another node's turn is its own
    got = threading.Event()
    waiter = threading.Thread(target=lambda: (second.acquire(), got.set()))
    waiter.start()
    assert not got.wait(0.5), "two tasks of a one-CPU node downloaded at once"
    first.release()  # the first task has read all its bytes (it still uploads)
    assert got.wait(10), "the second task did not get the turn the first gave back"
    waiter.join()
    second.release()
    other.release()
    two = [DownloadTurn(node, 2) for _ in range(2)]
    for turn in two:
        turn.acquire()  # a two-CPU node: two at once, without waiting
    for turn in two:
        turn.release()
    for path in {*first.paths, *other.paths, *two[0].paths}:
        os.unlink(path)


def test_losing_a_worker_node_mid_run(cluster, hub):
    """A node lost in the middle of its group: the shard it had uploaded is kept (not read or
    uploaded again), the others are made on another node; the bars never pass their totals."""
    import threading

    from streamer.engine.cluster import RayExecutor
    from streamer.engine.progress import Progress

    # two tasks of three shards; each uploads its shards one after the other, for seconds each
    hub.set_throttle(up_bytes_per_s=50_000)
    hub.clear_log()
    workers = {cluster.node_of(w)[:8]: w for w in ("w1", "w2")}
    killed: dict = {}
    wrote = threading.Event()
    events = []

    def listen(e) -> None:
        events.append(e)
        # "wrote <shard> on node <id>": the driver has adopted a shard a worker node uploaded
        if e.stage == "log" and e.message.startswith("wrote ") and not killed:
            name, node = e.message.split()[1], e.message.split()[-1]
            if node in workers:
                killed.update(name=name, node=node, worker=workers[node])
                wrote.set()

    def kill_after_its_first_shard():
        if wrote.wait(120):
            cluster.kill_worker(killed["worker"])
            killed["time"] = time.time()

    killer = threading.Thread(target=kill_after_its_first_shard)
    killer.start()
    try:
        executor = RayExecutor(cluster.address, group=3)
        result = _convert("alice/survived", "W8A16", executor=executor, progress=Progress(listeners=[listen]))
        run_log = hub.request_log
    finally:
        wrote.set()
        killer.join()
        hub.set_throttle(None, None)
        if "time" in killed:
            cluster.wait_gone(cluster_node(killed["node"]))
            cluster.add_worker(killed["worker"])  # the next tests get their three nodes back
            cluster.wait_nodes(3)
    assert "time" in killed, "no worker node uploaded a shard: none was killed mid-run"
    _convert("alice/clean", "W8A16")
    _same_output(hub, "alice/clean", "alice/survived")
    assert len(_streamer_commits(hub, "alice/survived")) == 1
    # its other shard was made again elsewhere; every shard is in the commit once
    assert result.stats.retried, "the killed node had finished its whole group"
    nodes = result.summary()["nodes"]
    made = sorted(s for n in nodes.values() for s in n["shards"])
    assert made == sorted(j.shard for j in result.plan.jobs)
    lost = next(n for k, n in nodes.items() if k.startswith(killed["node"]))
    assert killed["name"] in lost["shards"] and not set(result.stats.retried) & set(lost["shards"])
    # the kept shard (W8A16: output shard N is made from source shard N alone) is not read again
    late = [r for r in run_log if r.time > killed["time"] and r.method == "GET" and r.range and r.range[0] > 8]
    assert late and killed["name"] not in {r.file for r in late}, (killed, {r.file for r in late})
    # the retried shard's bytes were read twice, but each bar counts them once
    bars = [e for e in events if e.stage != "log"]
    assert all(e.done <= e.total for e in bars), max(bars, key=lambda e: e.done - e.total)
    for stage in ("read", "quantize", "upload"):
        last = [e for e in bars if e.stage == stage][-1]
        assert last.done == last.total > 0, last


def cluster_node(prefix: str) -> str:
    """The full id of the node whose id starts with PREFIX (as the driver's messages name it)."""
    return next(n["NodeID"] for n in ray.nodes() if n["NodeID"].startswith(prefix))


DRIVER = """
import sys
from streamer.engine.cluster import RayExecutor
from streamer.engine.convert import convert
convert(sys.argv[1], sys.argv[2], scheme="W4A16", device="cpu", max_memory=256_000_000, executor=RayExecutor(sys.argv[3]))
"""


def test_driver_killed_then_rerun_resumes(cluster, hub):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-c", DRIVER, SOURCE, "alice/resumed", cluster.address]
    hub.set_throttle(up_bytes_per_s=100_000)
    hub.clear_log()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # the resume record is the driver's (its HF_HOME), written as each node's shard arrives
    records = Path(os.environ["HF_HOME"]) / "streamer" / "uploads"
    deadline = time.time() + 180
    finished: set[str] = set()
    while time.time() < deadline and not finished and proc.poll() is None:
        for f in records.glob("*.json") if records.exists() else []:
            try:
                finished = set(json.loads(f.read_text()))
            except ValueError:
                pass
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert finished, f"no shard was recorded before the kill: {proc.stderr.read().decode()[-2000:]}"
    time.sleep(3)  # the dead driver's tasks are stopped by Ray; let their last requests end
    hub.set_throttle(None, None)
    assert _streamer_commits(hub, "alice/resumed") == []  # nothing committed before every shard is up
    first_puts = sum(r.bytes_in for r in hub.request_log if r.method == "PUT" and r.status == 200)

    hub.clear_log()
    run = subprocess.run(cmd, env=env, capture_output=True, timeout=300)
    assert run.returncode == 0, run.stderr.decode()[-3000:]
    rerun = hub.request_log
    shards = {f: s for f, s in hub.files("alice/resumed").items() if f.endswith(".safetensors")}
    # finished shards are neither read again (W4A16: output shard N is made from source shard N
    # alone) nor uploaded again
    tensor_reads = [r for r in rerun if r.method == "GET" and r.range and r.range[0] > 8]  # past the header
    reread = {r.file for r in tensor_reads if r.file in finished}
    assert not reread, (finished, reread)
    rerun_puts = sum(r.bytes_in for r in rerun if r.method == "PUT")
    assert rerun_puts <= sum(shards.values()) - sum(shards[f] for f in finished), (rerun_puts, first_puts)
    assert len(_streamer_commits(hub, "alice/resumed")) == 1
    _convert("alice/clean2", "W4A16")
    _same_output(hub, "alice/clean2", "alice/resumed")


def test_cli_ray_json_gives_per_node_bytes_and_times(cluster, hub, capsys):
    from streamer.cli import main as cli

    code = cli.main([SOURCE, "alice/cli", "--scheme", "FP8_DYNAMIC", "--device", "cpu", "--max-memory", "256MB",
                     "--ray", cluster.address, "--json"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    summary = json.loads(out)
    nodes = summary["nodes"]
    assert len(nodes) >= 2 and sum(n["bytes_written"] for n in nodes.values()) == summary["bytes_out"]
    assert all(n["bytes_read"] > 0 and n["seconds"] > 0 and n["shards"] for n in nodes.values())
    assert len(_streamer_commits(hub, "alice/cli")) == 1


def test_nan_weights_passed_through_on_the_nodes_are_named(cluster, hub, llama_ckpt, tmp_path, capsys):
    """A NaN weight quantized on a node (--nonfinite passthrough) is reported back with its
    shard: named in --json and on the card, as a run on one machine names it."""
    from fixtures import BF16_NAN, set_element
    from streamer.cli import main as cli
    from streamer.io.provenance import read_provenance

    src = tmp_path / "nan-src"
    shutil.copytree(llama_ckpt, src)
    name = "model.layers.1.mlp.up_proj.weight"
    set_element(src, name, 7, BF16_NAN)
    hub.seed_repo("acme/nan-llama", src)
    code = cli.main(["acme/nan-llama", "alice/nan-ray", "--scheme", "FP8_DYNAMIC", "--device", "cpu",
                     "--max-memory", "256MB", "--nonfinite", "passthrough", "--ray", cluster.address, "--json"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    assert json.loads(out)["nonfinite"] == [name]
    card = hub.read_file("alice/nan-ray", "README.md").decode()
    assert read_provenance(card)["nonfinite"] == [name] and "--nonfinite passthrough" in card


def test_mirror_with_ray_spreads_the_jobs_over_the_nodes(cluster, hub, tmp_path, capsys):
    from streamer.cli import main as cli

    jobs = tmp_path / "jobs.toml"
    jobs.write_text(
        '[defaults]\ndevice = "cpu"\n\n'
        f'[[job]]\nname = "a"\nsource = "{SOURCE}"\ntarget = "alice/mirror-a"\nscheme = "W8A16"\n\n'
        f'[[job]]\nname = "b"\nsource = "{SOURCE}"\ntarget = "alice/mirror-b"\nscheme = "FP8_DYNAMIC"\n'
    )
    code = cli.main(["mirror", str(jobs), "--parallel", "2", "--max-memory", "512MB", "--ray", cluster.address, "--json"])
    out = capsys.readouterr().out
    assert code == 0, out
    report = json.loads(out)
    assert [j["status"] for j in report["jobs"]] == ["converted", "converted"]
    used = [set(j["nodes"]) for j in report["jobs"]]
    # the jobs' shards ran on the cluster's nodes, not on one machine
    assert all(used) and len(used[0] | used[1]) >= 2, used
    for job in report["jobs"]:
        assert len(_streamer_commits(hub, job["target"])) == 1


def test_without_ray_the_flag_says_how_to_install_it(monkeypatch):
    from streamer.engine.cluster import RayExecutor
    from streamer.errors import StreamerError

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as when it is not installed
    with pytest.raises(StreamerError) as e:
        RayExecutor("auto").connect()
    assert "pip install 'streamer-quant[ray]'" in str(e.value)

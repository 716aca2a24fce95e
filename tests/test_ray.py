"""Conversions on a real Ray cluster (three nodes on loopback) against localhub.

The cluster is small enough for a 2-core machine: a head and two worker nodes with one CPU
each, every node its own `ray start` process with a resource naming it, a 100 MB object store
and no dashboard. It is shut down in the fixture's finaliser whatever happens.
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
        self.workers: dict[str, subprocess.Popen] = {}

    def start(self) -> None:
        subprocess.run(
            [RAY, "start", "--head", f"--port={self.address.split(':')[1]}", "--node-ip-address=127.0.0.1",
             '--resources={"head": 1}', "--include-dashboard=false", *COMMON],
            env=_node_env(self.root / "head"), check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        for n, name in enumerate(("w1", "w2"), start=2):
            self.add_worker(name)
            self.wait_nodes(n)  # one at a time: nodes starting together race for ports

    def add_worker(self, name: str) -> None:
        # its own session: killing the process group takes the raylet and its workers down at once
        # nodes on one machine: each its own ports (Ray's fixed defaults would collide)
        ports = [
            f"--{flag}={_free_port()}"
            for flag in ("node-manager-port", "object-manager-port", "metrics-export-port",
                         "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port")
        ]  # fmt: skip
        self.workers[name] = subprocess.Popen(
            [RAY, "start", f"--address={self.address}", "--node-ip-address=127.0.0.1",
             f'--resources={{"{name}": 1}}', "--block", *ports, *COMMON],
            env=_node_env(self.root / name), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip

    def kill_worker(self, name: str) -> None:
        """The node dies at once: SIGKILL to its raylet's whole process group."""
        proc = self.workers.pop(name)
        os.killpg(proc.pid, signal.SIGKILL)
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
    result = _convert("alice/cluster", "NVFP4A16", executor=RayExecutor(cluster.address), progress=progress)
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
    # one task per shard, spread: more than one node made shards, and every shard was made once
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


def test_local_target_is_refused_with_ray(cluster, hub, tmp_path):
    from streamer.engine.cluster import RayExecutor
    from streamer.errors import StreamerError

    with pytest.raises(StreamerError) as e:
        _convert(str(tmp_path / "out"), "W8A16", executor=RayExecutor(cluster.address))
    assert "Hub repo" in e.value.message and not (tmp_path / "out").exists()


def test_losing_a_worker_node_mid_run(cluster, hub):
    from streamer.engine.cluster import RayExecutor

    hub.set_throttle(up_bytes_per_s=100_000)
    hub.clear_log()
    import threading

    killed = threading.Event()

    def kill_when_uploading():
        # every node holds tasks once the first shard's upload has begun (six shards, two
        # tasks per CPU, three one-CPU nodes: all start at once)
        deadline = time.time() + 60
        while time.time() < deadline:
            if any(r.method == "PUT" for r in hub.request_log):
                cluster.kill_worker("w1")
                killed.set()
                return
            time.sleep(0.02)

    killer = threading.Thread(target=kill_when_uploading)
    killer.start()
    try:
        result = _convert("alice/survived", "W8A16", executor=RayExecutor(cluster.address))
    finally:
        killer.join()
        hub.set_throttle(None, None)
        if "w1" not in cluster.workers:
            cluster.add_worker("w1")  # the next tests get their three nodes back
            cluster.wait_nodes(3)
    assert killed.is_set(), "no upload began: the node was not killed mid-run"
    _convert("alice/clean", "W8A16")
    _same_output(hub, "alice/clean", "alice/survived")
    assert len(_streamer_commits(hub, "alice/survived")) == 1
    assert sorted(s for n in result.summary()["nodes"].values() for s in n["shards"]) == sorted(
        j.shard for j in result.plan.jobs
    )


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

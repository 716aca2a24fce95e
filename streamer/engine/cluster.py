"""Run a conversion's output shards on a Ray cluster (the optional `[ray]` extra).

The driver (the machine `convert` runs on) plans from headers as always. `RayExecutor.run` then
submits one Ray task per output shard that is not yet on the Hub. Each task runs on some node
of the cluster: it range-reads its own bytes from the source, quantizes them with the same
`Runner` as a single-machine run, uploads the finished shard itself (LFS or Xet) and returns
only what the commit needs (name, sha256, size, the 512-byte LFS sample). Shard bytes never
travel through the driver or Ray's object store, so N nodes have N links.

The driver records each returned shard in its own resume journal (the sink's, under the
driver's HF_HOME) as it arrives, then writes config.json, the index and the card and makes one
commit, exactly as a single-machine run: the bytes are the same. A task lost with its node is
run again on another node (Ray's task retries); a driver that dies leaves a journal from which
a rerun resumes without reading or uploading the finished shards again.

Progress: tasks send their byte counts to a small actor on the driver's node every half
second; the driver replays them into the run's `Progress` (the same three bars and callback
events) and keeps per-node bytes and times for the result (`nodes` in `--json`).

Where nodes reach the Hub: a node whose environment sets HF_ENDPOINT uses it (a per-node
proxy or mirror of the same Hub); every other node uses the driver's endpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from dataclasses import dataclass, field

from streamer.engine.pipeline import RunStats, Runner, notes_errors, shard_notes
from streamer.engine.progress import Progress
from streamer.errors import Cancelled, Hint, StreamerError, TargetError
from streamer.formats import human_bytes

log = logging.getLogger("streamer")

INSTALL_HINT = "pip install 'streamer-quant[ray]'"
# How often a task sends its byte counts to the driver, and the driver shows them.
REPORT_S = 0.5
# A task lost with its node (or its worker process) is run again this many times, elsewhere.
TASK_RETRIES = 3
# Tasks share a CPU (or GPU) two by two: a task uploads its finished shard while the next one
# on the same node downloads and quantizes, as one machine's pipeline overlaps them. One task per
# CPU would leave the node's download link idle during every upload (measured: about half the
# throughput on a link-bound node, bench/bench_cluster.py).
TASKS_PER_DEVICE = 2


def import_ray():
    """The `ray` module; a StreamerError saying how to install it when it is missing."""
    try:
        import ray
    except ImportError:
        raise StreamerError(f"running on a Ray cluster needs Ray: {INSTALL_HINT}") from None
    return ray


@dataclass
class NodeStats:
    """What one node of the cluster did in a run: its shards, bytes and busy seconds."""

    shards: list[str] = field(default_factory=list)
    bytes_read: int = 0
    bytes_written: int = 0
    seconds: float = 0.0  # summed over its tasks

    def as_dict(self) -> dict:
        """The figures as plain data (what `--json` prints under `nodes`)."""
        return {**dataclasses.asdict(self), "seconds": round(self.seconds, 3)}


@dataclass
class ClusterStats(RunStats):
    """RunStats of a cluster run, with what each node did (node id -> NodeStats)."""

    nodes: dict[str, NodeStats] = field(default_factory=dict)


class RayExecutor:
    """Runs a conversion's output shards as Ray tasks; hand it to `convert(executor=...)`.

    address: the cluster to join: "auto" (the one this machine belongs to: RAY_ADDRESS or a
      running `ray start`, else a new local cluster on this machine), "host:6379" or
      "ray://host:10001" (Ray Client, from outside the cluster).
    gpus: give each task a GPU and quantize there; None: when the cluster has GPUs.
    runtime_env: Ray's runtime environment for the tasks (env_vars, pip, …), as ray.init takes it.
    """

    def __init__(self, address: str | None = "auto", *, gpus: bool | None = None, runtime_env: dict | None = None):
        self.address = address
        self.gpus = gpus
        self.runtime_env = runtime_env
        self._lock = threading.Lock()

    # -- the cluster -----------------------------------------------------------------------

    def connect(self):
        """Join (or start) the cluster once per process; returns the `ray` module."""
        ray = import_ray()
        options = {
            "runtime_env": self.runtime_env, "include_dashboard": False,
            "logging_level": logging.WARNING, "log_to_driver": False,
        }  # fmt: skip
        with self._lock:
            if ray.is_initialized():
                return ray
            try:
                if self.address == "auto":
                    try:
                        ray.init(address="auto", **options)
                    except ConnectionError:  # no cluster to join: a local one on this machine
                        ray.init(**options)
                else:
                    ray.init(address=self.address, **options)
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise StreamerError(f"cannot join the Ray cluster at {self.address}: {e}") from None
        return ray

    def describe(self) -> str:
        """One line naming the cluster: its nodes, CPUs and GPUs."""
        ray = self.connect()
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        res = ray.cluster_resources()
        gpus = f", {int(res['GPU'])} GPU(s)" if res.get("GPU") else ""
        return f"Ray cluster: {len(nodes)} node(s), {int(res.get('CPU', 0))} CPU(s){gpus}"

    # -- one conversion --------------------------------------------------------------------

    def run(self, runner: Runner) -> ClusterStats:
        """Run RUNNER's plan on the cluster: the shards the sink does not hold yet are converted
        and uploaded by the nodes; their metadata is handed to the runner's sink, which the
        caller then commits. Returns the run's statistics with per-node figures."""
        ray = self.connect()
        plan, sink, progress = runner.plan, runner.sink, runner.progress
        progress.message(self.describe())
        source_spec = _source_spec(runner.source, ray)
        target = _target_spec(sink)
        t0 = time.monotonic()
        stats = ClusterStats()
        done: set[str] = set()
        if runner.fingerprint is not None:
            done = sink.resume(runner.fingerprint, [j.shard for j in plan.jobs])
            stats.resumed = sorted(done)
            for shard in done:
                stats.errors.update(notes_errors(sink.resumed_notes(shard)))
        jobs = [j for j in plan.jobs if j.shard not in done]
        runner.check_memory(jobs)
        for stage, total in runner.totals(jobs).items():
            progress.set_total(stage, total)

        gpus = self.gpus if self.gpus is not None else bool(ray.cluster_resources().get("GPU"))
        settings = {
            "device": "cuda" if gpus else "cpu",
            "max_memory": runner.budget.limit,
            "fetch_workers": runner.fetch_workers,
            "allow_nonfinite": runner.allow_nonfinite,
            "quality": runner.quality,
        }
        _check_feasible(ray, runner.budget.limit, gpus)
        relay = _relay_class(ray).options(
            num_cpus=0, scheduling_strategy=_here(ray),
        ).remote()  # fmt: skip
        task = ray.remote(convert_shards).options(
            num_cpus=1 / TASKS_PER_DEVICE, num_gpus=1 / TASKS_PER_DEVICE if gpus else 0, memory=runner.budget.limit,
            max_retries=TASK_RETRIES, retry_exceptions=False, scheduling_strategy="SPREAD",
        )  # fmt: skip
        plan_ref = ray.put(plan)
        sizes = {job.shard: job.bytes_out for job in jobs}  # what the upload bar counts
        pending = {
            task.remote(plan_ref, [job.shard], source_spec, target, settings, relay): job.shard for job in jobs
        }
        try:
            while pending:
                if runner.cancel.is_set():
                    raise Cancelled("cancelled")
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=REPORT_S)
                self._replay(ray, relay, progress)
                for ref in ready:
                    del pending[ref]
                    result = _result(ray, ref)
                    for name, info in result["uploaded"].items():
                        job = next(j for j in jobs if j.shard == name)
                        sink.adopt(name, info, shard_notes(result["errors"], job))
                        progress.advance("upload", sizes[name])
                        progress.message(f"wrote {name} on node {result['node'][:8]}")
                    node = stats.nodes.setdefault(result["node"], NodeStats())
                    node.shards += sorted(result["uploaded"])
                    node.bytes_read += result["bytes_read"]
                    node.bytes_written += result["bytes_written"]
                    node.seconds += result["seconds"]
                    stats.bytes_read += result["bytes_read"]
                    stats.bytes_written += result["bytes_written"]
                    stats.errors.update(result["errors"])  # the quality report's data, per weight
            self._replay(ray, relay, progress)
        except BaseException:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
        finally:
            ray.kill(relay)
        stats.seconds = time.monotonic() - t0
        stats.stage_seconds = progress.stage_seconds()
        stats.peak_budget = runner.budget.limit
        stats.shards = [j.shard for j in plan.jobs]
        return stats

    @staticmethod
    def _replay(ray, relay, progress: Progress) -> None:
        """Pass the byte counts the tasks reported since the last call on to PROGRESS."""
        try:
            counts = ray.get(relay.drain.remote(), timeout=10)
        except Exception as e:  # progress is for show: the run goes on without it
            log.debug("progress relay: %s", type(e).__name__)
            return
        for stage, n in counts.items():
            if n:
                progress.advance(stage, n)


def _here(ray):
    """A scheduling strategy that keeps an actor on the driver's node (a worker node may be lost)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=True)


def _check_feasible(ray, budget: int, gpus: bool) -> None:
    """Refuse a run no node can take a task of (it would wait forever)."""
    share = 1 / TASKS_PER_DEVICE
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    if any(
        r.get("CPU", 0) >= share and r.get("memory", 0) >= budget and (not gpus or r.get("GPU", 0) >= share)
        for r in nodes
    ):
        return
    most = max((r.get("memory", 0) for r in nodes), default=0)
    raise StreamerError(
        f"no node of the Ray cluster can take a shard: each task needs {share:g} CPU"
        f"{f', {share:g} GPU' if gpus else ''} and the whole memory budget ({human_bytes(budget)}); "
        f"the largest node offers {human_bytes(most)} of memory: give a smaller memory budget"
    )


def _result(ray, ref) -> dict:
    """A task's result; the error it raised, as raised (not wrapped in Ray's traceback text)."""
    from ray.exceptions import RayTaskError

    try:
        return ray.get(ref)
    except RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, BaseException):
            raise cause from None
        raise


# -- what the tasks need to open both ends -------------------------------------------------


def _token(api) -> str | bool | None:
    """The token the driver uses (given, HF_TOKEN or its login), passed on to the nodes, which
    may have none of their own. False stays False (send none)."""
    token = getattr(api, "token", None)
    if token is None:
        from huggingface_hub import get_token

        token = get_token()
    return token


def _source_spec(source, ray) -> dict:
    """How a node opens the source: a Hub repo pinned to the commit the plan was made from, or
    a local folder that every node sees with the same files."""
    if source.repo_id is not None:
        return {"repo_id": source.repo_id, "commit": source.commit, "token": _token(source.api), "endpoint": source.endpoint}
    files = {path: size for path, size in source.files().items() if path.endswith(".safetensors")}
    _check_shared(ray, source.label, files)
    return {"folder": source.label}


def _target_spec(sink) -> dict:
    """How a node uploads into the sink's repo and branch."""
    from streamer.io.hub_sink import HubSink  # the nodes upload, the driver adopts: a Hub sink only

    if not isinstance(sink, HubSink):
        raise TargetError(
            "on a Ray cluster each node uploads its shards to the Hub itself: the destination "
            "must be a Hub repo (convert to a local folder without Ray)",
            hints=(Hint("target", "org/name"),),
        )
    return {"repo_id": sink.repo_id, "revision": sink.revision, "token": _token(sink.api), "endpoint": sink.endpoint}


def _check_shared(ray, folder: str, files: dict[str, int]) -> None:
    """Refuse a local source folder that some node of the cluster does not see as this machine does."""
    nodes = [n for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU", 0) >= 1 / TASKS_PER_DEVICE]
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = ray.remote(_folder_files)
    refs = {
        n["NodeID"]: probe.options(
            num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False),
        ).remote(folder, list(files))
        for n in nodes
    }  # fmt: skip
    blind = [node for node, ref in refs.items() if ray.get(ref) != files]
    if blind:
        raise StreamerError(
            f"the source folder {folder} is not visible with the same files on {len(blind)} of the "
            f"{len(nodes)} node(s) of the Ray cluster: with Ray, a local folder must be on storage "
            "every node mounts at the same path; upload the checkpoint to the Hub, or convert without Ray",
            hints=(Hint("source", "org/name"),),
        )


def _folder_files(folder: str, names: list[str]) -> dict[str, int]:
    """On a node: the sizes of NAMES in FOLDER as this node sees them (missing ones left out)."""
    sizes = {}
    for name in names:
        try:
            sizes[name] = os.path.getsize(os.path.join(folder, name))
        except OSError:
            pass
    return sizes


# -- on the nodes -------------------------------------------------------------------------


def _relay_class(ray):
    """The progress relay actor class: tasks add byte counts, the driver drains them."""

    @ray.remote
    class ProgressRelay:
        def __init__(self):
            self.counts: dict[str, int] = {}

        def add(self, counts: dict[str, int]) -> None:
            for stage, n in counts.items():
                self.counts[stage] = self.counts.get(stage, 0) + n

        def drain(self) -> dict[str, int]:
            out, self.counts = self.counts, {}
            return out

    return ProgressRelay


class _RelayProgress(Progress):
    """A task's Progress: counts read and quantized bytes locally and sends them to the relay
    every REPORT_S. Totals are the driver's (it knows the whole run); uploads are counted by the
    driver when a task returns (its shards are then on the Hub)."""

    def __init__(self, relay):
        super().__init__()
        self.relay = relay
        self._pending: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="streamer-progress", daemon=True)
        self._thread.start()

    def set_total(self, stage: str, total: int) -> None:
        pass

    def advance(self, stage: str, n: int) -> None:
        if stage == "upload":
            return
        with self._lock:
            self._pending[stage] = self._pending.get(stage, 0) + n

    def message(self, text: str) -> None:
        log.info(text)

    def flush(self, wait: bool = False) -> None:
        """Send what was counted since the last flush; WAIT until the relay holds it (the task's
        last flush, so the driver has every byte by the time it sees the task's result)."""
        with self._lock:
            counts, self._pending = self._pending, {}
        if counts:
            try:
                ref = self.relay.add.remote(counts)
                if wait:
                    import ray

                    ray.get(ref, timeout=30)
            except Exception:  # the driver is gone: the task's result will not be collected anyway
                pass

    def _loop(self) -> None:
        while not self._stop.wait(REPORT_S):
            self.flush()

    def close(self) -> None:
        """Stop the sending thread and send the rest."""
        self._stop.set()
        self._thread.join()
        self.flush(wait=True)


def convert_shards(plan, shards: list[str], source_spec: dict, target: dict, settings: dict, relay) -> dict:
    """A Ray task: convert the output SHARDS of PLAN on this node and upload them to TARGET.

    source_spec, target: how to open both ends (see _source_spec, _target_spec). settings: the
    device, byte budget, read parallelism, NaN policy and quality measurement of the run. relay:
    the progress actor. Returns {"uploaded": name -> huggingface_hub UploadInfo, "node",
    "bytes_read", "bytes_written", "seconds", "errors": weight -> its quantization error sums};
    the shard bytes stay on the Hub."""
    import ray
    import torch

    from streamer.io.hub_sink import HubSink
    from streamer.io.hub_source import HubSource
    from streamer.io.source import LocalSource

    t0 = time.monotonic()
    node = ray.get_runtime_context().get_node_id()
    # a node's own HF_ENDPOINT (a proxy, a per-node link) wins over the driver's
    endpoint = os.environ.get("HF_ENDPOINT") or None
    if "folder" in source_spec:
        source = LocalSource(source_spec["folder"])
    else:
        source = HubSource(
            source_spec["repo_id"], revision=source_spec["commit"], token=source_spec["token"],
            endpoint=endpoint or source_spec["endpoint"],
        )  # fmt: skip
    sink = HubSink(
        target["repo_id"], token=target["token"], revision=target["revision"],
        endpoint=endpoint or target["endpoint"],
    )  # fmt: skip
    progress = _RelayProgress(relay)
    part = dataclasses.replace(plan, jobs=[j for j in plan.jobs if j.shard in shards])
    try:
        with source:
            runner = Runner(
                part, source, sink, device=torch.device(settings["device"]),
                max_memory=settings["max_memory"], fetch_workers=settings["fetch_workers"],
                progress=progress, allow_nonfinite=settings["allow_nonfinite"], quality=settings["quality"],
            )  # fmt: skip
            stats = runner.run()
    except BaseException:
        sink.abort()
        raise
    finally:
        sink.close()
        progress.close()
    return {
        "uploaded": sink.uploaded(),
        "node": node,
        "bytes_read": stats.bytes_read,
        "bytes_written": stats.bytes_written,
        "seconds": time.monotonic() - t0,
        "errors": stats.errors,
    }


"""Run a conversion's output shards on a Ray cluster (the optional `[ray]` extra).

The driver (the machine `convert` runs on) plans from headers as always. `RayExecutor.run` then
submits the output shards that are not yet on the Hub as Ray tasks, one shard each
(`shard_groups`), the costliest first. Each task runs on some node of the cluster: it
range-reads its own bytes from the source, quantizes them with the same `Runner` as a
single-machine run, uploads each finished shard itself (LFS or Xet) and reports only what the
commit needs (name, sha256, size, the 512-byte LFS sample) as soon as that shard is on the Hub.
Shard bytes never travel through the driver or Ray's object store, so N nodes have N links.

A node runs two tasks per CPU (or GPU) but downloads for one at a time (`DownloadTurn`): the
second task starts reading when the first has read everything, so its download overlaps the
first one's upload instead of splitting the link with it.

The driver adopts each reported shard into its sink and its resume journal (under the driver's
HF_HOME) as it arrives, then writes config.json, the index and the card and makes one commit,
exactly as a single-machine run: the bytes are the same. A task lost with its node (or its
worker process) is submitted again, elsewhere, for the shards of its group that were not
reported: the ones already on the Hub are kept, not made again. A driver that dies leaves a
journal from which a rerun resumes without reading or uploading the finished shards again.

Progress: tasks send their byte counts (and their finished shards) to a small actor on the
driver's node every half second; the driver replays them into the run's `Progress` (the same
three bars and callback events) and keeps per-node bytes and times for the result (`nodes` in
`--json`). Uploaded bytes count when the driver adopts a shard, so once. Bytes a lost task had
read and quantized for shards that are made again are held back from later counts, so a bar
never passes its total.

Where nodes reach the Hub: a node whose environment sets HF_ENDPOINT uses it (a per-node
proxy or mirror of the same Hub); every other node uses the driver's endpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass, field

from streamer.engine.pipeline import RunStats, Runner, restore_notes, shard_notes
from streamer.engine.progress import STAGES, Progress
from streamer.errors import Cancelled, Hint, StreamerError, TargetError
from streamer.formats import human_bytes

log = logging.getLogger("streamer")

INSTALL_HINT = "pip install 'streamer-quant[ray]'"
# How often a task sends its byte counts and finished shards to the driver.
REPORT_S = 0.5
# A group lost with its node (or its worker process) is run again this many times, elsewhere.
TASK_RETRIES = 3
# Tasks share a CPU (or GPU) two by two: one downloads while the other uploads its last shards
# (see DownloadTurn). One task per CPU would leave the node's download link idle during every
# task's last upload.
TASKS_PER_DEVICE = 2
# Shards per task: one. A node's two tasks already overlap each other (one downloads while the
# other uploads, see DownloadTurn), so a task needs no second shard to keep its links busy, and
# one-shard tasks handed out costliest first let the nodes finish together (bench_cluster.py, 18
# shards: 3 nodes 93-101 s against 100-103 s with two shards a task; 2 nodes 129-137 s against
# 125-126 s, one task start more per shard) and lose only the shards in flight with a node.
GROUP_SHARDS = 1
# The resource only the head node of a Ray cluster has.
HEAD = "node:__internal_head__"


def import_ray():
    """The `ray` module; a StreamerError saying how to install it when it is missing."""
    try:
        import ray
    except ImportError:
        raise StreamerError(f"running on a Ray cluster needs Ray: {INSTALL_HINT}") from None
    return ray


def shard_groups(shards: list[str], size: int | None = None, costs: dict[str, int] | None = None) -> list[list[str]]:
    """SHARDS cut into the groups the tasks convert, in the order to submit them: the costliest
    first (COSTS: each shard's bytes read plus written; shards of equal cost, or all without
    COSTS, in the plan's order), so that the long jobs start first and the short ones even the
    nodes out at the end (Ray starts queued tasks in the order they were submitted, each on the
    first node with room). SIZE: shards per group (None: GROUP_SHARDS)."""
    order = sorted(shards, key=lambda s: -costs[s]) if costs else list(shards)
    size = max(size or GROUP_SHARDS, 1)
    return [order[i : i + size] for i in range(0, len(order), size)]


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
    """RunStats of a cluster run, with what each node did (node id -> NodeStats) and the shards
    made again after their task was lost with its node."""

    nodes: dict[str, NodeStats] = field(default_factory=dict)
    retried: list[str] = field(default_factory=list)


@dataclass
class _Task:
    """One submitted task: its group, how often the group was lost before, and what the driver
    has heard from it so far."""

    shards: list[str]
    tries: int = 0
    node: str | None = None
    counts: dict[str, int] = field(default_factory=dict)  # bytes it reported per stage
    done: list[str] = field(default_factory=list)  # its shards adopted
    seconds: float = 0.0  # busy time, as it last reported
    lost: bool = False  # lost with its node: what it reports now is ignored


class _Counts:
    """The driver's side of the byte counts: passes the tasks' counts on to PROGRESS, less the
    bytes of lost tasks' unfinished shards (counted again by their retry), never past a total."""

    def __init__(self, progress: Progress, totals: dict[str, int]):
        self.progress = progress
        self.totals = totals
        self.shown = dict.fromkeys(STAGES, 0)
        self.owed = dict.fromkeys(STAGES, 0)  # bytes shown for work that is being done again

    def add(self, stage: str, n: int) -> None:
        """N more bytes done in STAGE by a live task."""
        held = min(n, self.owed[stage])
        self.owed[stage] -= held
        n = min(n - held, max(self.totals.get(stage, 0) - self.shown[stage], 0))
        if n > 0:
            self.shown[stage] += n
            self.progress.advance(stage, n)

    def lost(self, counted: dict[str, int], kept: dict[str, int]) -> None:
        """A task that COUNTED bytes is lost; KEPT of them belong to shards it finished."""
        for stage, n in counted.items():
            self.owed[stage] += max(n - kept.get(stage, 0), 0)


class RayExecutor:
    """Runs a conversion's output shards as Ray tasks; hand it to `convert(executor=...)`.

    address: the cluster to join: "auto" (the one this machine belongs to: RAY_ADDRESS or a
      running `ray start`, else a new local cluster on this machine), "host:6379" or
      "ray://host:10001" (Ray Client, from outside the cluster).
    gpus: give each task a GPU and quantize there; None: when the cluster has GPUs.
    runtime_env: Ray's runtime environment for the tasks (env_vars, pip, …), as ray.init takes it.
    group: shards per task (None: GROUP_SHARDS, one).
    """

    def __init__(
        self, address: str | None = "auto", *, gpus: bool | None = None, runtime_env: dict | None = None,
        group: int | None = None,
    ):  # fmt: skip
        self.address = address
        self.gpus = gpus
        self.runtime_env = runtime_env
        self.group = group
        self._lock = threading.Lock()
        # runner -> (source spec, target spec) of `check`, until its `run`. Per runner: one
        # executor serves the conversions a mirroring run makes at once.
        self._checked: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

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

    def check(self, runner: Runner) -> None:
        """Refuse, before the target is created, a conversion the cluster cannot run: a local
        source folder some node cannot see, a target the nodes cannot upload to, a node without
        this streamer version. The nodes' workers are started on the way (`_start_workers`)."""
        specs = self._prepare(runner)
        with self._lock:
            self._checked[runner] = specs

    def _prepare(self, runner: Runner) -> tuple[dict, dict]:
        """What `check` does; the (source spec, target spec) the tasks are given."""
        ray = self.connect()
        specs = (_source_spec(runner.source, ray), _target_spec(runner.sink))
        _start_workers(ray, runner.budget.limit, bool(self.gpus) if self.gpus is not None else None)
        return specs

    def run(self, runner: Runner) -> ClusterStats:
        """Run RUNNER's plan on the cluster: the shards the sink does not hold yet are converted
        and uploaded by the nodes; their metadata is handed to the runner's sink, which the
        caller then commits. Returns the run's statistics with per-node figures."""
        ray = self.connect()
        plan, sink, progress = runner.plan, runner.sink, runner.progress
        progress.message(self.describe())
        with self._lock:
            checked = self._checked.pop(runner, None)
        source_spec, target = checked or self._prepare(runner)
        t0 = time.monotonic()
        stats = ClusterStats()
        done: set[str] = set()
        if runner.fingerprint is not None:
            done = sink.resume(runner.fingerprint, [j.shard for j in plan.jobs])
            stats.resumed = sorted(done)
            for shard in done:
                restore_notes(stats, sink.resumed_notes(shard), allow_nonfinite=runner.allow_nonfinite)
        jobs = {j.shard: j for j in plan.jobs if j.shard not in done}
        runner.check_memory(list(jobs.values()))
        totals = runner.totals(list(jobs.values()))
        for stage, total in totals.items():
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
        # on the head node: the one the cluster cannot lose (a node the driver shares may be lost)
        relay = _relay_class(ray).options(num_cpus=0, resources={HEAD: 0.001}).remote()
        try:
            # up before the tasks: else their first reports (finished shards) wait for its process
            if not ray.wait([relay.drain.remote()], timeout=300)[0]:
                raise StreamerError("the Ray cluster did not start the progress actor on its head node in 5 minutes")
            # Ray does not retry a task: a lost group is submitted again for its unfinished shards only
            remote = ray.remote(convert_shards).options(
                num_cpus=1 / TASKS_PER_DEVICE, num_gpus=1 / TASKS_PER_DEVICE if gpus else 0,
                memory=runner.budget.limit, max_retries=0, scheduling_strategy="SPREAD",
            )  # fmt: skip
            plan_ref = ray.put(plan)
            driver = _Driver(
                ray, runner, jobs, stats, _Counts(progress, totals),
                lambda shards, tid: remote.remote(plan_ref, shards, source_spec, target, settings, relay, tid),
                relay,
            )  # fmt: skip
            costs = {name: job.bytes_in + job.bytes_out for name, job in jobs.items()}
            driver.run(shard_groups(list(jobs), self.group, costs))
        finally:
            ray.kill(relay)
        for task in driver.tasks.values():
            if task.node is not None:
                stats.nodes.setdefault(task.node, NodeStats()).seconds += task.seconds
        stats.seconds = time.monotonic() - t0
        stats.stage_seconds = progress.stage_seconds()
        stats.peak_budget = runner.budget.limit
        stats.shards = [j.shard for j in plan.jobs]
        return stats


class _Driver:
    """The driver's side of one cluster run: submits the groups, adopts each shard a task
    reports, submits again what a lost task left unfinished, and passes the byte counts on."""

    def __init__(self, ray, runner: Runner, jobs: dict, stats: ClusterStats, counts: _Counts, submit, relay):
        """jobs: shard name -> Job still to make; submit(shards, task id) -> the task's ObjectRef."""
        self.ray, self.runner, self.jobs, self.stats, self.counts = ray, runner, jobs, stats, counts
        self.progress, self.sink = runner.progress, runner.sink
        self._submit, self.relay = submit, relay
        self.tasks: dict[str, _Task] = {}  # task id -> task
        self.pending: dict = {}  # ObjectRef -> task id
        self.adopted: set[str] = set()
        self.draining: list = []  # the relay's answer not received yet (it holds what it drained)
        self.relay_lost = False

    def run(self, groups: list[list[str]]) -> None:
        """Submit GROUPS and wait until each of their shards is adopted (or raise)."""
        ray = self.ray
        for group in groups:
            self.submit(group)
        try:
            while self.pending:
                if self.runner.cancel.is_set():
                    raise Cancelled("cancelled")
                ready, _ = ray.wait(list(self.pending), num_returns=1, timeout=REPORT_S)
                self.replay()
                for ref in ready:
                    task = self.tasks[self.pending.pop(ref)]
                    try:
                        result = _result(ray, ref)
                    except _lost_errors() as e:
                        self.lost(task, e)
                        continue
                    self.finished(task, result)
            self.settle()
        except BaseException:
            for ref in self.pending:
                ray.cancel(ref, force=True)
            raise

    def submit(self, shards: list[str], tries: int = 0) -> None:
        """One task for SHARDS; TRIES: how often they were lost before."""
        tid = f"t{len(self.tasks)}"
        self.tasks[tid] = _Task(list(shards), tries)
        self.pending[self._submit(list(shards), tid)] = tid

    def adopt(self, task: _Task, name: str, info, notes: dict) -> None:
        """The shard NAME that TASK uploaded (INFO) goes into the commit and the resume record,
        with its NOTES (`shard_notes`: its weights' error sums and NaN/Inf weights)."""
        if name in self.adopted:  # reported twice (a report and the task's result): once is enough
            return
        job = self.jobs[name]
        self.sink.adopt(name, info, notes)
        restore_notes(self.stats, notes)
        self.adopted.add(name)
        task.done.append(name)
        node = self.stats.nodes.setdefault(task.node, NodeStats())
        node.shards.append(name)
        node.bytes_written += job.bytes_out
        self.stats.bytes_written += job.bytes_out
        self.counts.add("upload", job.bytes_out)
        self.progress.message(f"wrote {name} on node {task.node[:8]}")

    def replay(self, wait: float = 0) -> None:
        """Take the tasks' reports from the relay (waiting up to WAIT seconds for them): their
        byte counts and finished shards."""
        ray = self.ray
        if self.relay_lost:
            return
        if not self.draining:
            self.draining.append(self.relay.drain.remote())
        if not ray.wait(self.draining, timeout=wait)[0]:
            return  # a busy head node: the same answer is awaited next time, nothing is lost
        try:
            reports = ray.get(self.draining.pop())
        except Exception as e:  # the relay is gone: the shards still come with the tasks' results
            log.warning("warning: lost the progress actor (%s); the bars stop here", type(e).__name__)
            self.relay_lost = True
            return
        for tid, node, stage_counts, shards, seconds in reports:
            task = self.tasks[tid]
            if task.lost:  # its shards are being made again
                continue
            task.node = node
            task.seconds = max(task.seconds, seconds)
            for stage, n in stage_counts.items():
                task.counts[stage] = task.counts.get(stage, 0) + n
                self.counts.add(stage, n)
                if stage == "read":
                    self.stats.nodes.setdefault(node, NodeStats()).bytes_read += n
                    self.stats.bytes_read += n
            for name, (info, notes) in shards.items():
                self.adopt(task, name, info, notes)

    def settle(self) -> None:
        """Every report sent so far replayed (twice: an answer asked for earlier may predate the last ones)."""
        self.replay(wait=60)
        self.replay(wait=60)

    def finished(self, task: _Task, result: dict) -> None:
        """TASK returned: its shards are all on the Hub."""
        task.node = task.node or result["node"]
        task.seconds = result["seconds"]
        for name, (info, notes) in result["uploaded"].items():
            self.adopt(task, name, info, notes)
        missing = [s for s in task.shards if s not in self.adopted]
        if missing:  # cannot happen: a task that returns has uploaded its shards
            raise StreamerError(f"internal error: the Ray task for {', '.join(missing)} returned without them")

    def lost(self, task: _Task, error: BaseException) -> None:
        """TASK was lost with its node: keep the shards it reported, make the others again."""
        self.settle()  # what it reported before it was lost
        task.lost = True
        left = [s for s in task.shards if s not in self.adopted]
        self.counts.lost(task.counts, self.runner.totals([self.jobs[s] for s in task.done]))
        if not left:
            return
        if task.tries + 1 > TASK_RETRIES:
            raise StreamerError(
                f"the Ray task converting {', '.join(left)} was lost {task.tries + 1} times "
                f"(last: {type(error).__name__}); run again to resume"
            )
        self.stats.retried += left
        self.progress.message(
            f"lost a task on node {(task.node or '?')[:8]} ({type(error).__name__}): "
            f"{len(left)} shard(s) run again, {len(task.done)} kept"
        )
        self.submit(left, task.tries + 1)


def _lost_errors() -> tuple[type[BaseException], ...]:
    """Ray's errors for a task lost with its worker process or node (not an error of the task's own)."""
    from ray import exceptions as rx

    return (rx.WorkerCrashedError, rx.NodeDiedError, rx.LocalRayletDiedError, rx.ObjectLostError, rx.OutOfMemoryError)


def _check_feasible(ray, budget: int, gpus: bool) -> None:
    """Refuse a run no node of the cluster can take a task of (it would wait forever)."""
    share = 1 / TASKS_PER_DEVICE
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    able = sum(
        1 for r in nodes
        if r.get("CPU", 0) >= share and r.get("memory", 0) >= budget and (not gpus or r.get("GPU", 0) >= share)
    )  # fmt: skip
    if able:
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


def _start_workers(ray, budget: int, gpus: bool | None) -> None:
    """Start the worker processes the run's tasks will use, TASKS_PER_DEVICE per CPU (or GPU) of
    every node, each importing the engine (seconds of torch and compressed-tensors) and saying
    which streamer it runs: a node with another version is refused before anything is written,
    and the tasks then start converting at once, every node together."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from streamer import __version__

    if gpus is None:
        gpus = bool(ray.cluster_resources().get("GPU"))
    kind, share = ("GPU" if gpus else "CPU"), 1 / TASKS_PER_DEVICE
    nodes = [
        n for n in ray.nodes()
        if n.get("Alive") and n["Resources"].get(kind, 0) >= share and n["Resources"].get("memory", 0) >= budget
    ]  # fmt: skip
    warm = ray.remote(_engine_version)
    refs = [
        warm.options(
            num_cpus=share, num_gpus=share if gpus else 0, memory=budget,
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False),
        ).remote()
        for n in nodes
        for _ in range(max(1, int(n["Resources"].get(kind, 1))) * TASKS_PER_DEVICE)
    ]  # fmt: skip
    try:
        versions = ray.get(refs)
    except Exception as e:  # a node that cannot import streamer at all
        raise StreamerError(
            f"a node of the Ray cluster cannot run streamer: {type(e).__name__}: {str(e).splitlines()[-1][:300]}; "
            f"install it on every node (pip install 'streamer-quant[ray]=={__version__}')"
        ) from None
    other = sorted({v for v in versions if v != __version__})
    if other:
        raise StreamerError(
            f"the Ray cluster's nodes run streamer {', '.join(other)}, this machine {__version__}: "
            f"install the same version on every node (pip install 'streamer-quant[ray]=={__version__}')"
        )


def _engine_version() -> str:
    """On a node: import the engine (what a task needs first) and say which streamer this is."""
    import streamer.engine.pipeline  # noqa: F401  (torch, compressed-tensors: seconds, once per worker)
    from streamer import __version__

    return __version__


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
    """The progress relay actor class: tasks add their reports, the driver drains them (in the
    order each task sent them)."""

    @ray.remote
    class ProgressRelay:
        def __init__(self):
            self.reports: list[tuple] = []

        def report(self, task: str, node: str, counts: dict[str, int], shards: dict, seconds: float) -> None:
            self.reports.append((task, node, counts, shards, seconds))

        def drain(self) -> list[tuple]:
            out, self.reports = self.reports, []
            return out

    return ProgressRelay


class DownloadTurn:
    """One of a node's download turns (as many as it has CPUs, or GPUs): a task reads its bytes
    while it holds one, and gives it back once it has read them all, so the node's second task
    downloads while the first uploads. A file lock (per node id, in the node's temp folder) is
    released by the kernel with a killed worker process."""

    def __init__(self, node: str, slots: int):
        self.paths = [os.path.join(tempfile.gettempdir(), f"streamer-ray-{node}-{i}.lock") for i in range(slots)]
        self._fd: int | None = None
        self._lock = threading.Lock()

    def acquire(self) -> None:
        """Wait for a free turn (a cancelled task's worker is killed, which ends the wait)."""
        import fcntl

        while True:
            for path in self.paths:
                fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    continue
                self._fd = fd
                return
            time.sleep(0.05)

    def release(self) -> None:
        """Give the turn back (again: nothing)."""
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


def _node_slots(ray, node: str, device: str) -> int:
    """How many tasks of NODE download at once: its CPUs (its GPUs when quantizing on them)."""
    kind = "GPU" if device == "cuda" else "CPU"
    for n in ray.nodes():
        if n["NodeID"] == node:
            return max(1, int(n["Resources"].get(kind, 1)))
    return 1


class _TaskProgress(Progress):
    """A task's Progress: counts read and quantized bytes, and every REPORT_S sends them to the
    relay with the shards uploaded since (their upload info and error sums). Totals are the
    driver's (it knows the whole run); uploads count at the driver when it adopts a shard.
    ON_READ is called once the task has read READ_TOTAL bytes."""

    def __init__(self, relay, task: str, node: str, read_total: int = 0, on_read=None):
        super().__init__()
        self.relay, self.task, self.node = relay, task, node
        self.started = time.monotonic()
        self.read_total, self.on_read = read_total, on_read
        self.read = 0
        self.jobs: list = []
        self.sink = self.runner = None
        self._sent: set[str] = set()
        self._pending: dict[str, int] = {}
        self._send = threading.Lock()  # one report at a time: the relay gets them in order
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="streamer-progress", daemon=True)
        self._thread.start()

    def watch(self, runner: Runner, sink, jobs: list) -> None:
        """Report the shards of JOBS as SINK uploads them, with RUNNER's error sums."""
        self.runner, self.sink, self.jobs = runner, sink, jobs

    def set_total(self, stage: str, total: int) -> None:
        pass

    def advance(self, stage: str, n: int, *, rated: bool = True) -> None:
        if stage == "upload":
            return
        finished = None
        with self._lock:
            self._pending[stage] = self._pending.get(stage, 0) + n
            if stage == "read":
                self.read += n
                if self.on_read is not None and self.read >= self.read_total:
                    finished, self.on_read = self.on_read, None
        if finished is not None:
            finished()

    def message(self, text: str) -> None:
        log.info(text)

    def uploaded(self) -> dict[str, tuple]:
        """The shards uploaded so far, name -> (UploadInfo, its `shard_notes`)."""
        if self.sink is None:
            return {}
        infos = self.sink.uploaded()
        return {job.shard: (infos[job.shard], shard_notes(self.runner.stats, job)) for job in self.jobs if job.shard in infos}

    def flush(self, wait: bool = False) -> None:
        """Send what was counted and uploaded since the last flush; WAIT until the relay holds it
        (the task's last flush, so the driver has every byte when it sees the task's result)."""
        with self._send:
            # the shards first: bytes counted after this look cannot belong to a shard it lists
            shards = {k: v for k, v in self.uploaded().items() if k not in self._sent}
            with self._lock:
                counts, self._pending = self._pending, {}
            if not counts and not shards and not wait:
                return
            self._sent.update(shards)
            try:
                ref = self.relay.report.remote(self.task, self.node, counts, shards, time.monotonic() - self.started)
                if wait:
                    import ray

                    ray.get(ref, timeout=120)
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


def convert_shards(plan, shards: list[str], source_spec: dict, target: dict, settings: dict, relay, task: str) -> dict:
    """A Ray task: convert the output SHARDS of PLAN on this node and upload them to TARGET.

    source_spec, target: how to open both ends (see _source_spec, _target_spec). settings: the
    device, byte budget, read parallelism, NaN policy and quality measurement of the run. relay:
    the progress actor, which gets each shard as soon as it is on the Hub; task: this task's
    name in its reports. Returns {"uploaded": name -> (huggingface_hub UploadInfo, error sums of
    its weights), "node", "seconds"}; the shard bytes stay on the Hub."""
    import ray
    import torch

    from streamer.io.hub_sink import HubSink
    from streamer.io.hub_source import HubSource
    from streamer.io.source import LocalSource

    node = ray.get_runtime_context().get_node_id()
    turn = DownloadTurn(node, _node_slots(ray, node, settings["device"]))
    # a node's own HF_ENDPOINT (a proxy, a per-node link) wins over the driver's
    endpoint = os.environ.get("HF_ENDPOINT") or None
    part = dataclasses.replace(plan, jobs=[j for j in plan.jobs if j.shard in shards])
    progress = _TaskProgress(relay, task, node, on_read=turn.release)
    sink = None
    try:
        if "folder" in source_spec:
            source = LocalSource(source_spec["folder"])
        else:
            source = HubSource(
                source_spec["repo_id"], revision=source_spec["commit"], token=source_spec["token"],
                endpoint=endpoint or source_spec["endpoint"],
            )  # fmt: skip
        # one upload at a time: the node's link is shared anyway, and so the first shard is on
        # the Hub, reported and safe from a node loss as early as it can be
        sink = HubSink(
            target["repo_id"], token=target["token"], revision=target["revision"],
            endpoint=endpoint or target["endpoint"], upload_workers=1,
        )  # fmt: skip
        with source:
            runner = Runner(
                part, source, sink, device=torch.device(settings["device"]),
                max_memory=settings["max_memory"], fetch_workers=settings["fetch_workers"],
                progress=progress, allow_nonfinite=settings["allow_nonfinite"], quality=settings["quality"],
            )  # fmt: skip
            progress.read_total = runner.totals(part.jobs)["read"]
            progress.watch(runner, sink, part.jobs)
            # everything above (the source's file list, the sink) while another task downloads
            turn.acquire()
            runner.run()
    except BaseException:
        if sink is not None:
            sink.abort()
        raise
    finally:
        turn.release()
        if sink is not None:
            sink.close()
        progress.close()
    return {"uploaded": progress.uploaded(), "node": node, "seconds": time.monotonic() - progress.started}

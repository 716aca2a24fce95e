"""Running mirroring jobs: each is checked first (`streamer.mirror.check`), and converted only when
its target is not up to date, several at once under one memory budget. Jobs are independent: one
failing does not stop the others.

The engine (torch, compressed-tensors) is imported by the first job that converts or plans, so a
run that finds every target up to date never loads it.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field

from streamer.engine.budget import Budget, default_memory_budget
from streamer.errors import Cancelled, StreamerError
from streamer.formats import human_bytes
from streamer.mirror.check import check_job
from streamer.mirror.jobs import MirrorJob
from streamer.mirror.wording import describe

log = logging.getLogger(__name__)

INTERRUPTED = "interrupted: nothing was published"


@dataclass
class JobResult:
    """What one job did: its status, why, and for a conversion what it moved and where it published."""

    name: str
    status: str  # "converted" | "skipped" | "failed" | "planned" (dry run: would convert)
    source: str
    target: str
    scheme: str
    reason: str = ""
    source_commit: str | None = None
    url: str | None = None
    error: str | None = None
    bytes_read: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    finished_at: float = field(default_factory=time.time)
    nodes: dict = field(default_factory=dict)  # on a Ray cluster: node id -> its shards, bytes, seconds

    @property
    def ok(self) -> bool:
        """The job did not fail (converted, skipped or planned)."""
        return self.status != "failed"

    def to_dict(self) -> dict:
        """The result as plain data (what `--json` prints)."""
        d = asdict(self)
        d["seconds"] = round(self.seconds, 3)
        return d


class MirrorRunner:
    """Runs jobs (check, then convert when needed), several at once under one memory budget.

    :param token: the Hugging Face token (default: HF_TOKEN or the saved login).
    :param dry_run: check every job and plan the ones that would run; publish nothing.
    :param parallel: jobs converted at once.
    :param max_memory: the byte budget all concurrent conversions share (default: half the
        available memory); one `Budget` every conversion draws from.
    :param device: the device of jobs that name none ("auto", "cpu", "cuda", "cuda:N").
    :param workers: pieces fetched concurrently per conversion.
    :param endpoint: the Hub's URL (default: HF_ENDPOINT).
    :param executor: where conversions make their shards: None on this machine, a
        `streamer.engine.cluster.RayExecutor` spreads every job's shards over a Ray cluster.

    `cancel` is an Event: once set, running conversions stop without publishing and the jobs not
    started yet report "interrupted".
    """

    def __init__(
        self,
        *,
        token: str | None = None,
        dry_run: bool = False,
        parallel: int = 1,
        max_memory: int | None = None,
        device: str = "auto",
        workers: int = 4,
        endpoint: str | None = None,
        executor=None,
    ):
        if parallel < 1:
            raise StreamerError("--parallel must be at least 1")
        self.token = token
        self.dry_run = dry_run
        self.parallel = parallel
        self.max_memory = max_memory or default_memory_budget()
        self.device = device
        self.workers = workers
        self.endpoint = endpoint
        self.executor = executor
        self.cancel = threading.Event()
        self.budget = Budget(self.max_memory)

    def run_one(self, job: MirrorJob) -> JobResult:
        """Check JOB and convert it when its target is not up to date; never raises for a job's
        failure (the result says it).

        :param job: the job."""
        t0 = time.monotonic()
        res = JobResult(job.name, "failed", job.source_spec, job.target_spec, job.scheme)
        try:
            self._run(job, res)
        except (Cancelled, KeyboardInterrupt):
            # Cancelled: this runner's cancel is set (Ctrl-C in another thread, another job, the
            # listener stopping). KeyboardInterrupt: Ctrl-C while this job ran on the main thread.
            # Either way every job stops: the ones not started yet report this at once.
            self.cancel.set()
            res.status, res.error = "failed", INTERRUPTED
        except StreamerError as e:
            res.status, res.error = "failed", describe(e)
        except Exception as e:  # a bug or an unexpected environment problem: the other jobs go on
            log.debug("[%s] failed", job.name, exc_info=True)
            res.status, res.error = "failed", f"{type(e).__name__}: {e}"
        res.seconds = time.monotonic() - t0
        res.finished_at = time.time()
        if res.status == "failed":
            log.error("[%s] failed: %s", job.name, res.error)
        elif res.status == "converted":
            log.info("[%s] converted in %.1fs: %s", job.name, res.seconds, res.url)
        return res

    def _run(self, job: MirrorJob, res: JobResult) -> None:
        if self.cancel.is_set():
            raise Cancelled()
        check = check_job(job, token=self.token, endpoint=self.endpoint)
        res.source_commit = check.source_commit
        res.reason = check.reason
        if check.up_to_date:
            res.status = "skipped"
            log.info("[%s] %s", job.name, check.reason)
            return
        # Pin the commit that was checked, so the card records exactly what was converted.
        source = f"{job.source}@{check.source_commit}"
        if self.dry_run:
            from streamer.engine.convert import prepare

            src, plan = prepare(source, scheme=job.scheme, ignore=job.ignore, token=self.token,
                                dequant_dtype=job.dequant_dtype, **job.policy_kwargs)
            src.close()
            res.status = "planned"
            res.reason = (
                f"{check.reason}; would write {len(plan.jobs)} shard(s), {plan.n_quantized} weights "
                f"quantized, {human_bytes(plan.bytes_in)} -> {human_bytes(plan.bytes_out)}"
                + (" as a PR" if job.create_pr else "")
            )
            log.info("[%s] would convert: %s", job.name, res.reason)
            return
        from streamer.engine.convert import convert
        from streamer.engine.progress import Progress

        log.info("[%s] converting %s -> %s: %s", job.name, job.source_spec, job.target_spec, check.reason)
        result = convert(
            source, job.target_spec,
            scheme=job.scheme, ignore=job.ignore, device=job.device or self.device,
            workers=self.workers, token=self.token,
            # The target is streamer's own (its card says so) or new; anything else is only
            # replaced when the job says overwrite = true.
            overwrite=check.streamer_target or job.overwrite,
            private=job.private, create_pr=job.create_pr, dequant_dtype=job.dequant_dtype,
            progress=Progress(), cancel=self.cancel, max_memory=self.budget, executor=self.executor,
            **job.policy_kwargs,
        )  # fmt: skip
        res.status = "converted"
        res.url = result.url
        if result.stats is not None:
            res.bytes_read = result.stats.bytes_read
            res.bytes_written = result.stats.bytes_written
        res.nodes = result.extra.get("nodes", {})

    def run(self, jobs: list[MirrorJob], on_result=None) -> list[JobResult]:
        """Run JOBS (at most `parallel` at once); their results in the order of JOBS.

        :param jobs: the jobs to run.
        :param on_result: called with each result as its job finishes (from this thread)."""
        results: dict[str, JobResult] = {}

        def done(r: JobResult) -> None:
            results[r.name] = r
            if on_result is not None:
                on_result(r)

        # Jobs run on worker threads even one at a time: Ctrl-C reaches the main thread, which sets
        # `cancel` at once, so a running conversion stops within a second instead of finishing the
        # uploads in flight first; the jobs not started yet then report "interrupted" at once.
        pool = ThreadPoolExecutor(self.parallel, thread_name_prefix="streamer-mirror")
        try:
            pending = {pool.submit(self.run_one, j) for j in jobs}
            while pending:
                try:
                    finished, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                except KeyboardInterrupt:  # Ctrl-C reaches the main thread: stop the workers' jobs
                    log.warning("interrupted: cancelling the running conversions")
                    self.cancel.set()
                    continue
                for f in finished:
                    done(f.result())
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        return [results[j.name] for j in jobs]


def run_jobs(jobs: list[MirrorJob], **options) -> list[JobResult]:
    """Run JOBS once; their results in order.

    :param jobs: the jobs to run.
    :param options: MirrorRunner's: token, dry_run, parallel, max_memory, device, workers, endpoint."""
    return MirrorRunner(**options).run(jobs)

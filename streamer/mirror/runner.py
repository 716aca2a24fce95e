"""Running mirroring jobs: each is checked first (`streamer.mirror.check`), and converted only when
its target is not up to date, several at once under one memory budget. Jobs are independent: one
failing does not stop the others.

Jobs that need a conversion of the same source commit with the same shared settings (see
`group_key`) are converted in one read pass (`streamer.engine.convert.convert_many`): each source
byte is fetched once for all of them, and each job still gets its own commit, card and result,
as if it ran alone. A read pass holds its share of the run's budget (the whole of it with
`parallel` 1); when that is too small for its jobs at once, they run one by one. On a Ray cluster
every job runs on its own (a fan-out runs on one machine).

The engine (torch, compressed-tensors) is imported by the first job that converts or plans, so a
run that finds every target up to date never loads it.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from contextlib import contextmanager, nullcontext
from contextvars import copy_context
from dataclasses import asdict, dataclass, field

from streamer.engine.budget import Budget, default_memory_budget
from streamer.errors import Cancelled, StreamerError, redact
from streamer.formats import hub_spec, human_bytes
from streamer.mirror.check import Check, check_job
from streamer.mirror.jobs import MirrorJob
from streamer.mirror.wording import describe, job_words

log = logging.getLogger(__name__)

INTERRUPTED = "interrupted: nothing was published"
# Why a run on a Ray cluster converts every job on its own, in the report's words.
NO_GROUPING_ON_RAY = (
    "--ray: each job reads its source on its own (jobs are grouped into one read pass only on one machine)"
)


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
    read_pass: list[str] = field(default_factory=list)  # the jobs converted in one read of the source with this one

    @property
    def ok(self) -> bool:
        """The job did not fail (converted, skipped or planned)."""
        return self.status != "failed"

    def to_dict(self) -> dict:
        """The result as plain data (what `--json` prints)."""
        d = asdict(self)
        d["seconds"] = round(self.seconds, 3)
        return d


@dataclass
class ReadPass:
    """Jobs converted (or, in a dry run, to be converted) from one read of their source."""

    source: str  # org/name@commit
    jobs: list[str]
    bytes_read: int = 0  # read from the source for all of them together (each byte once)
    bytes_shared: int = 0  # handed from one job's read to another instead of read again

    def to_dict(self) -> dict:
        """The read pass as plain data (what `--json` prints)."""
        return asdict(self)


def group_key(job: MirrorJob, source_commit: str, device: str) -> tuple:
    """What jobs must have in common to be converted in one read pass: the source at one commit,
    and every setting `convert_many` applies to all of its targets alike (all but target, scheme
    and ignore). DEVICE: the run's device, for jobs that name none."""
    return (
        job.source, source_commit, job.dequant_dtype, job.device or device,
        job.private, job.create_pr, job.overwrite,
        job.default_ignore, job.quantize_towers, job.skip_incompatible, job.nonfinite,
    )  # fmt: skip


def on_hub(spec: str) -> str:
    """SPEC (`org/name[@revision]`) as the engine must take it: a Hub repo, even when a local
    folder of that name exists where the mirror runs (a clone of the target repo, say)."""
    return hub_spec(spec)


def nonfinite_setting(job: MirrorJob):
    """A context holding JOB's own policy for NaN/Inf weights around its conversion; a job that
    sets none keeps the caller's (`with nonfinite_policy(...)` around the run)."""
    if job.nonfinite is None:
        return nullcontext()
    from streamer.formats import nonfinite_policy

    return nonfinite_policy(job.nonfinite)


def group_jobs(keys: list[tuple], targets: list[str]) -> list[list[int]]:
    """Indices of jobs grouped into read passes, in the order the jobs come: jobs with equal KEYS
    (`group_key`) share a pass, except that a pass never holds two jobs writing to the same
    target repo (on different branches: their commits would race on one repo's history). TARGETS:
    each job's target repo id."""
    passes: list[list[int]] = []
    open_passes: dict[tuple, list[list[int]]] = {}
    for i, (key, target) in enumerate(zip(keys, targets)):
        repo = target.lower()
        fits = [p for p in open_passes.get(key, []) if all(targets[j].lower() != repo for j in p)]
        if fits:
            fits[0].append(i)
            continue
        fresh = [i]
        passes.append(fresh)
        open_passes.setdefault(key, []).append(fresh)
    return passes


@dataclass
class _Work:
    """A job whose target is not up to date: what the check found, and the result to fill in."""

    job: MirrorJob
    check: Check
    res: JobResult


class MirrorRunner:
    """Runs jobs (check, then convert when needed), several at once under one memory budget.

    :param token: the Hugging Face token (default: HF_TOKEN or the saved login).
    :param dry_run: check every job and plan the ones that would run; publish nothing.
    :param parallel: conversions at once (a read pass of several jobs counts as one).
    :param max_memory: the byte budget all concurrent conversions share (default: half the
        available memory); one `Budget` every conversion draws from.
    :param device: the device of jobs that name none ("auto", "cpu", "cuda", "cuda:N").
    :param workers: pieces fetched concurrently per conversion.
    :param endpoint: the Hub's URL (default: HF_ENDPOINT).
    :param executor: where conversions make their shards: None on this machine, a
        `streamer.engine.cluster.RayExecutor` spreads every job's shards over a Ray cluster
        (and then every job reads its source on its own).

    `cancel` is an Event: once set, running conversions stop without publishing and the jobs not
    started yet report "interrupted". After `run`, `read_passes` lists the jobs grouped into one
    read of their source, and `grouping_note` says why none were grouped (None when they may be).
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
        self.read_passes: list[ReadPass] = []
        self.grouping_note: str | None = NO_GROUPING_ON_RAY if executor is not None else None

    # -- one job ---------------------------------------------------------------------------

    def run_one(self, job: MirrorJob) -> JobResult:
        """Check JOB and convert it when its target is not up to date; never raises for a job's
        failure (the result says it).

        :param job: the job."""
        res, work = self._check(job)
        if work is not None:
            self._guarded(res, lambda: self._convert_alone(work))
        return self._finish(res)

    def _check(self, job: MirrorJob) -> tuple[JobResult, _Work | None]:
        """Check JOB: its result so far, and the work to do (None when the job is done with:
        skipped, or failed)."""
        res = JobResult(job.name, "failed", job.source_spec, job.target_spec, job.scheme)
        found: list[Check] = []

        def step() -> None:
            if self.cancel.is_set():
                raise Cancelled()
            check = check_job(job, token=self.token, endpoint=self.endpoint)
            res.source_commit = check.source_commit
            res.reason = check.reason
            if check.up_to_date:
                res.status = "skipped"
                log.info("[%s] %s", job.name, check.reason)
            else:
                found.append(check)

        self._guarded(res, step)
        return res, (_Work(job, found[0], res) if found and res.error is None else None)

    def _guarded(self, res: JobResult, step) -> None:
        """Run STEP for the job of RES; a failure lands in RES (the other jobs go on)."""
        t0 = time.monotonic()
        try:
            step()
        except (Cancelled, KeyboardInterrupt, Exception) as e:
            self._fail(res, e)
        res.seconds += time.monotonic() - t0

    def _fail(self, res: JobResult, error: BaseException) -> None:
        """Record ERROR as the reason RES's job failed, in a mirroring run's words."""
        res.status = "failed"
        if isinstance(error, (Cancelled, KeyboardInterrupt)):
            # Cancelled: this runner's cancel is set (Ctrl-C in another thread, another job, the
            # listener stopping). KeyboardInterrupt: Ctrl-C while this job ran on the main thread.
            # Either way every job stops: the ones not started yet report this at once.
            self.cancel.set()
            res.error = INTERRUPTED
        elif isinstance(error, StreamerError):
            res.error = describe(error)
        else:  # a bug or an unexpected environment problem: the other jobs go on
            log.debug("[%s] failed", res.name, exc_info=error)
            res.error = f"{type(error).__name__}: {redact(str(error))}"

    def _finish(self, res: JobResult) -> JobResult:
        res.finished_at = time.time()
        if res.status == "failed":
            log.error("[%s] failed: %s", res.name, res.error)
        elif res.status == "converted":
            log.info("[%s] converted in %.1fs: %s", res.name, res.seconds, res.url)
        return res

    @staticmethod
    def _source(work: _Work) -> str:
        # Pin the commit that was checked, so the card records exactly what was converted.
        return f"{work.job.source}@{work.check.source_commit}"

    def _plan(self, work: _Work) -> None:
        """Dry run: plan WORK's conversion (headers only) and say what it would write."""
        from streamer.engine.convert import prepare

        job, res = work.job, work.res
        src, plan = prepare(on_hub(self._source(work)), scheme=job.scheme, ignore=job.ignore, token=self.token,
                            dequant_dtype=job.dequant_dtype, **job.policy_kwargs)  # fmt: skip
        src.close()
        res.status = "planned"
        res.reason = (
            f"{work.check.reason}; would write {len(plan.jobs)} shard(s), {plan.n_quantized} weights "
            f"quantized, {human_bytes(plan.bytes_in)} -> {human_bytes(plan.bytes_out)}"
            + (" as a PR" if job.create_pr else "")
        )
        log.info("[%s] would convert: %s", job.name, res.reason)

    def _convert_alone(self, work: _Work) -> None:
        if self.cancel.is_set():
            raise Cancelled()
        if self.dry_run:
            self._plan(work)
            return
        from streamer.engine.convert import convert
        from streamer.engine.progress import Progress

        job, check, res = work.job, work.check, work.res
        log.info("[%s] converting %s -> %s: %s", job.name, job.source_spec, job.target_spec, check.reason)
        with nonfinite_setting(job):
            result = convert(
                on_hub(self._source(work)), on_hub(job.target_spec),
                scheme=job.scheme, ignore=job.ignore, device=job.device or self.device,
                workers=self.workers, token=self.token,
                # The target is streamer's own (its card says so) or new; anything else is only
                # replaced when the job says overwrite = true.
                overwrite=check.streamer_target or job.overwrite,
                private=job.private, create_pr=job.create_pr, dequant_dtype=job.dequant_dtype,
                progress=Progress(hint_words=job_words), cancel=self.cancel, keep_on_cancel=True, max_memory=self.budget,
                executor=self.executor, **job.policy_kwargs,
            )  # fmt: skip
        res.status = "converted"
        res.url = result.url
        if result.stats is not None:
            res.bytes_read = result.stats.bytes_read
            res.bytes_written = result.stats.bytes_written
        res.nodes = result.extra.get("nodes", {})

    # -- several jobs in one read pass -----------------------------------------------------

    def _convert_together(self, works: list[_Work], share: int, rp: ReadPass) -> bool:
        """Convert WORKS (one source commit, the same shared settings) in one read pass, with
        SHARE bytes of the run's budget; each job's outcome lands in its own result, RP gets the
        bytes read once for all of them. Raises only what stops every job of the pass; False
        when the budget is too small for them all at once (each alone may still fit)."""
        if self.cancel.is_set():
            raise Cancelled()
        names = ", ".join(w.job.name for w in works)
        log.info("[%s] converting %s in one read pass -> %s", names, rp.source,
                 ", ".join(f"{w.job.target_spec} ({w.job.scheme})" for w in works))  # fmt: skip
        try:
            with self._reserved(share):
                fan = self._fan_out(works, share)
        except StreamerError as e:
            if isinstance(e, Cancelled) or not any(h.setting == "max_memory" for h in e.hints):
                raise
            log.warning("[%s] %s; converting them one by one instead", names, e.message)
            return False
        rp.bytes_read, rp.bytes_shared = fan.bytes_read, fan.bytes_shared
        for work, out in zip(works, fan.targets):
            res = work.res
            if out.ok:
                res.status, res.url = "converted", out.result.url
                if out.result.stats is not None:
                    res.bytes_read = out.result.stats.bytes_read
                    res.bytes_written = out.result.stats.bytes_written
            else:
                self._fail(res, out.error)
        return True

    def _fan_out(self, works: list[_Work], share: int):
        """convert_many for WORKS, with the settings they share (see `group_key`) and a budget of
        SHARE bytes; its FanoutResult."""
        from streamer.engine.convert import Target, convert_many
        from streamer.engine.progress import Progress

        first = works[0].job
        with nonfinite_setting(first):  # one policy for the pass: part of the group key
            return convert_many(
                on_hub(self._source(works[0])),
                [Target(on_hub(w.job.target_spec), scheme=w.job.scheme, ignore=tuple(w.job.ignore)) for w in works],
                device=first.device or self.device, workers=self.workers, token=self.token,
                # One setting for the whole pass: the jobs' own overwrite is part of their group key,
                # and a target whose card is streamer's is accepted by the sink whatever overwrite
                # says (a job alone passes check.streamer_target for the same reason).
                overwrite=first.overwrite or all(w.check.streamer_target for w in works),
                private=first.private, create_pr=first.create_pr, dequant_dtype=first.dequant_dtype,
                progress=Progress(hint_words=job_words), cancel=self.cancel, keep_on_cancel=True, max_memory=share, **first.policy_kwargs,
            )  # fmt: skip

    @contextmanager
    def _reserved(self, share: int):
        """Hold SHARE bytes of the run's budget: a read pass has its own budgets inside, and the
        conversions running beside it must leave it that much."""
        self.budget.acquire(share)
        try:
            yield
        finally:
            self.budget.release(share)

    def _run_pass(self, works: list[_Work], share: int, rp: ReadPass | None) -> list[JobResult]:
        """Run one unit of work: a job alone, or the jobs of read pass RP together."""
        if rp is None:
            self._guarded(works[0].res, lambda: self._convert_alone(works[0]))
            return [self._finish(works[0].res)]
        if self.dry_run:
            for w in works:
                self._guarded(w.res, lambda w=w: self._convert_alone(w))
            return [self._finish(w.res) for w in works]
        shared = JobResult(rp.source, "failed", rp.source, "", "")  # what stops the whole pass, if anything
        t0 = time.monotonic()
        together: list[bool] = []
        self._guarded(shared, lambda: together.append(self._convert_together(works, share, rp)))
        if together == [False]:  # too little memory for all at once: each alone, as without grouping
            self.read_passes.remove(rp)
            for w in works:
                w.res.read_pass = []
                self._guarded(w.res, lambda w=w: self._convert_alone(w))
            return [self._finish(w.res) for w in works]
        for w in works:
            w.res.seconds += time.monotonic() - t0
            if shared.error is not None:
                w.res.status, w.res.error = "failed", shared.error
        return [self._finish(w.res) for w in works]

    def passes(self, works: list[_Work]) -> list[list[_Work]]:
        """WORKS grouped into read passes (each job alone on a Ray cluster)."""
        if self.executor is not None:
            return [[w] for w in works]
        keys = [group_key(w.job, w.check.source_commit, self.device) for w in works]
        return [[works[i] for i in idx] for idx in group_jobs(keys, [w.job.target for w in works])]

    # -- a whole run -----------------------------------------------------------------------

    def run(self, jobs: list[MirrorJob], on_result=None) -> list[JobResult]:
        """Run JOBS (at most `parallel` conversions at once); their results in the order of JOBS.
        Every job is checked first; the ones that need work and can share a read of their source
        are converted together (see the module docstring).

        :param jobs: the jobs to run.
        :param on_result: called with each result as its job finishes (from this thread)."""
        results: dict[str, JobResult] = {}
        self.read_passes = []

        def done(r: JobResult) -> None:
            results[r.name] = r
            if on_result is not None:
                on_result(r)

        # Jobs run on worker threads even one at a time: Ctrl-C reaches the main thread, which sets
        # `cancel` at once, so a running conversion stops within a second instead of finishing the
        # uploads in flight first; the jobs not started yet then report "interrupted" at once.
        # Each task runs in a copy of the caller's context, so that settings made for this call
        # (`with nonfinite_policy(...)`) hold on the worker threads too.
        pool = ThreadPoolExecutor(self.parallel, thread_name_prefix="streamer-mirror")
        try:
            works: dict[str, _Work] = {}
            for job, (res, work) in self._gather(pool, {pool.submit(copy_context().run, self._check, j): j for j in jobs}):
                if work is None:
                    done(self._finish(res))
                else:
                    works[job.name] = work
            units = self.passes([works[j.name] for j in jobs if j.name in works])
            # a read pass holds its part of the budget for all its jobs; single jobs draw from the
            # shared budget as they go
            share = self.max_memory // max(1, min(self.parallel, len(units)))
            tasks = {}
            for unit in units:
                rp = None
                if len(unit) > 1:
                    rp = ReadPass(self._source(unit[0]), [w.job.name for w in unit])
                    self.read_passes.append(rp)
                    for w in unit:
                        w.res.read_pass = list(rp.jobs)
                tasks[pool.submit(copy_context().run, self._run_pass, unit, share, rp)] = unit
            for _, finished in self._gather(pool, tasks):
                for r in finished:
                    done(r)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        return [results[j.name] for j in jobs]

    def _gather(self, pool: ThreadPoolExecutor, futures: dict):
        """(what each future was submitted for, its result) as they finish; Ctrl-C cancels the
        running conversions and goes on waiting for them to stop."""
        pending = set(futures)
        while pending:
            try:
                finished, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            except KeyboardInterrupt:  # Ctrl-C reaches the main thread: stop the workers' jobs
                log.warning("interrupted: cancelling the running conversions")
                self.cancel.set()
                continue
            for f in finished:
                yield futures[f], f.result()


def run_jobs(jobs: list[MirrorJob], **options) -> list[JobResult]:
    """Run JOBS once; their results in order.

    :param jobs: the jobs to run.
    :param options: MirrorRunner's: token, dry_run, parallel, max_memory, device, workers, endpoint."""
    return MirrorRunner(**options).run(jobs)

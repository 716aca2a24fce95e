"""The Python API every front door (CLI, Space, mirroring jobs, model_free_ptq) wraps.

`convert` runs the data flow once: open source → catalog → recipe → plan → (check target) →
pipeline → small files → one commit. Any failure aborts the sink, so the destination is left as
it was.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from streamer.engine.card import model_card
from streamer.io.provenance import Provenance
from streamer.io.catalog import CONFIG_NAME, INDEX_NAME, build_catalog
from streamer.errors import Cancelled, Hint, HubError, InputError, PlanError, SchemeError, StreamerError, TargetError
from streamer.engine.plan import Plan, Policy, make_plan
from streamer.engine.budget import Budget, default_memory_budget
from streamer.engine.cluster import ClusterStats
from streamer.engine.fanout import CACHE_SHARE, SharedReader, TargetProgress, split_budget
from streamer.engine.pipeline import RunStats, Runner, shard_size, suggest_size
from streamer.engine.progress import Progress
from streamer.engine.quality import QualityReport, build_report
from streamer.quant.dequant import detect_dequantizer
from streamer.quant.schemes import make_recipe
from streamer.formats import allows_nonfinite, dumps_json, human_bytes, is_branch_name, split_revision
from streamer.io.locations import check_hub_spec, check_not_url, is_hub_spec, open_source, read_as_repo
from streamer.io.sink import LocalSink, Sink
from streamer.io.source import Source

log = logging.getLogger("streamer")


@dataclass
class Result:
    """What a conversion did: its plan, run statistics (None for a dry run) and where it published."""

    plan: Plan
    stats: RunStats | None = None
    url: str | None = None  # local path, commit URL or PR URL
    dry_run: bool = False
    extra: dict = field(default_factory=dict)
    quality: QualityReport | None = None  # how much quantization changed the weights
    up_to_date: bool = False  # the destination already held this conversion: nothing was done

    def summary(self) -> dict:
        """The result as plain data: what `--json` prints and mirroring reports."""
        out = {
            "source": self.plan.source,
            "scheme": self.plan.recipe.name,
            "bytes_in": self.plan.bytes_in,
            "bytes_out": self.plan.bytes_out,
            "shards": [j.shard for j in self.plan.jobs],
            "quantized": self.plan.n_quantized,
            # what the policy kept beyond the ignore list, one entry per rule with a count
            "kept_by_policy": [
                {"rule": r.rule, "count": len(r.modules), "why": r.why} for r in self.plan.kept_by_policy
            ],
            "ignore": self.plan.config_ignore,
            "warnings": self.plan.warnings,
            "dry_run": self.dry_run,
            "up_to_date": self.up_to_date,
            "url": self.url,
        }
        if self.stats is not None:
            out.update(
                seconds=round(self.stats.seconds, 3),
                stage_seconds=self.stats.stage_seconds,
                bytes_read=self.stats.bytes_read,
                bytes_written=self.stats.bytes_written,
                peak_buffered_bytes=self.stats.peak_budget,
                resumed_shards=self.stats.resumed,
                nonfinite=self.stats.nonfinite,  # weights holding NaN/Inf, quantized as asked
            )
        if self.quality is not None:
            out["quality"] = self.quality.as_dict()
        out.update(self.extra)
        return out


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The torch device to quantize on: DEVICE ("cpu", "cuda", "cuda:N"), or for None/"auto" the
    first GPU when there is one, else the CPU. Refuses a device this machine does not have."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise StreamerError(f"device {device!r} is not one streamer runs on", hints=(Hint("device", ("cpu", "cuda", "cuda:N")),))
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise StreamerError(f"device {device!r}: no CUDA GPU is available here", hints=(Hint("device", "cpu"),))
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise StreamerError(
                f"device {device!r}: only {torch.cuda.device_count()} GPU(s) are visible",
                hints=(Hint("device", "cuda"),),
            )
    return dev


def open_sink(dst, *, token=None, overwrite=False, private=False, create_pr=False, revision=None) -> Sink:
    """The sink for DST: a Hub repo id `org/name` (a `HubSink`: TOKEN, PRIVATE for a repo it
    creates, CREATE_PR, REVISION the branch to commit to) or a local folder (a `LocalSink`).
    OVERWRITE allows replacing what is already there."""
    dst = os.fspath(dst)
    if is_hub_spec(dst):
        from streamer.io.hub_sink import HubSink

        check_hub_spec(dst, "destination")
        repo_id, _ = split_revision(dst)
        return HubSink(
            repo_id,
            token=token,
            revision=target_branch(dst, revision),
            private=private,
            create_pr=create_pr,
            overwrite=overwrite,
        )
    check_not_url(dst, "destination")
    if create_pr or revision:  # said, not ignored: the user expects a pull request or a branch
        what = "a pull request" if create_pr else f"a branch ({revision})"
        raise StreamerError(
            f"the destination {dst} is a local folder: {what} applies only to a Hub repo destination",
            hints=(Hint("target"),),
        )
    return LocalSink(dst, overwrite=overwrite)


def target_branch(dst: str, revision: str | None) -> str | None:
    """The branch the Hub destination DST is committed to: the one after its `@`, or REVISION
    (None: the repo's default). Both, naming different branches, is refused: which was meant?"""
    _, rev = split_revision(dst)
    if rev and revision and rev != revision:
        raise StreamerError(
            f"the destination {dst} names the branch {rev!r}, and a target revision {revision!r} is given "
            "too: name the branch once",
            hints=(Hint("target"),),
        )
    branch = rev or revision
    if branch is not None and not is_branch_name(branch):  # before a repo is created for it
        raise StreamerError(
            f"{branch!r} cannot name a branch (no spaces, '..', '~', '^', ':', '?', '*', '[', '\\', "
            "and no '/' or '.' at either end)",
            hints=(Hint("target"),),
        )
    return branch


def prepare(
    src: str | Source,
    *,
    scheme=None,
    scheme_file=None,
    config=None,
    ignore=(),
    token: str | None = None,
    dequant_dtype: str | None = None,
    force: bool = False,
    default_ignore: bool = True,
    quantize_towers: bool = False,
    skip_incompatible: bool = False,
    stack: bool = True,
) -> tuple[Source, Plan]:
    """Open the source and build the complete plan (reads headers only).

    default_ignore: keep embeddings, the output head, MoE routers and vision/audio towers
      unquantized besides IGNORE (streamer.engine.policy.RULES); False quantizes what the scheme
      targets, as llm-compressor's model_free_ptq does.
    quantize_towers: quantize vision/audio towers and multimodal projectors anyway.
    skip_incompatible: keep weights whose shape the scheme cannot serve unquantized, instead of
      refusing the conversion.
    stack: on a compressed-tensors source, keep the modules the scheme does not target as
      stored and declare both quantizations; False expands them dense (streamer/quant/dequant.py).
    """
    policy = Policy(default_ignore=default_ignore, quantize_towers=quantize_towers, skip_incompatible=skip_incompatible)
    try:
        recipe = make_recipe(scheme, scheme_file=scheme_file, config=config, ignore=list(ignore))
    except BaseException:
        if isinstance(src, Source):  # a source handed over is closed on every failure
            src.close()
        raise
    source = src if isinstance(src, Source) else open_source(src, token=token)
    try:
        catalog = build_catalog(source)
        dequant = detect_dequantizer(catalog, recipe, dtype=dequant_dtype, force=force, stack=stack)
        plan = make_plan(catalog, recipe, source=source.label, dequant=dequant, policy=policy)
    except BaseException:
        source.close()
        raise
    return source, plan


def _check_workers(workers: int) -> None:
    """Refuse a WORKERS (parallel reads per source) below 1 before anything is planned or created."""
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise StreamerError(f"workers must be a whole number of at least 1 (parallel reads per source), not {workers!r}")


def convert(
    src: str | Source,
    dst: str | Sink | None,
    *,
    scheme=None,
    scheme_file=None,
    config=None,
    ignore=(),
    device: str | None = "auto",
    dry_run: bool = False,
    max_memory: int | str | Budget | None = None,
    workers: int = 4,
    token: str | None = None,
    overwrite: bool = False,
    private: bool | None = None,
    create_pr: bool = False,
    revision: str | None = None,
    dequant_dtype: str | None = None,
    force: bool = False,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
    keep_on_cancel: bool = False,
    default_ignore: bool = True,
    quantize_towers: bool = False,
    skip_incompatible: bool = False,
    record: str = "requested",
    stack: bool = True,
    executor=None,
    quality: bool = True,
) -> Result:
    """Convert the checkpoint SRC into a compressed-tensors checkpoint at DST, in one commit.

    Reads only the safetensors headers to plan, then streams each output shard's bytes through
    the quantizer to the sink. Any failure aborts the sink: DST is left as it was.

    Source and destination:
      src: a local folder, a Hub repo id `org/name[@revision]`, or an open `Source`.
      dst: a local folder, a Hub repo id `org/name`, an open `Sink`, or None (with dry_run only).
      revision: the branch of DST to commit to (Hub only); `create_pr` opens a pull request
        instead of committing to it.
      token: the Hugging Face token for both ends (default: HF_TOKEN or the saved login).
      overwrite: replace what DST already holds (a model that streamer did not write, another
        scheme's shards); without it such a destination is refused.
      private: the visibility of a repo DST creates; None makes it private exactly when the
        source is private or gated.

    What to quantize and how:
      scheme: a compressed-tensors preset name (FP8_DYNAMIC, FP8_BLOCK, W4A16, NVFP4A16, …).
      scheme_file: a JSON/YAML file holding a scheme or a quantization config (instead of scheme).
      config: the same as a dict, for callers that build one.
      ignore: modules to keep unquantized: exact module names or `re:PATTERN` (re.match).
      default_ignore, quantize_towers, skip_incompatible, stack: the policy (see `prepare`).
      dequant_dtype: the dtype a quantized source (FP8-block, compressed-tensors) is expanded to
        before re-quantizing ("bfloat16", "float16", "float32"; default: the source's own).
      force: re-quantize a source already quantized with the requested scheme.

    Running:
      device: "auto" (the first GPU, else the CPU), "cpu", "cuda" or "cuda:N".
      max_memory: the byte budget for model bytes held at once, in bytes or as a size such as
        "8GB" (default: half the available memory); a `Budget` object shares one budget between
        conversions running together.
      workers: parallel range reads (or file reads) per source.
      progress: a `Progress` that receives bytes read, quantized and uploaded, and log lines.
      cancel: an Event; once set, the run stops within about a second, publishes nothing and
        raises `streamer.errors.Cancelled`. The run then ends for good: the repo or branch it
        created goes, with its resume record.
      keep_on_cancel: a set CANCEL keeps the shards uploaded (and the repo or branch created)
        for a rerun to resume, as after a Ctrl-C or a failure: for a caller stopping for now
        (a mirroring listener shutting down), not a user giving up.
      executor: where the output shards are made: None on this machine; a
        `streamer.engine.cluster.RayExecutor` spreads them over a Ray cluster (each node
        uploads its own shards to the Hub; the commit is still one, made here).
      dry_run: plan only (headers are read, nothing is written); the plan is in the Result.
      quality: measure each quantized weight's error while quantizing (the Result's `quality`
        report, a section of the model card); False saves its cost.
      record: which policy flags the model card's settings record: "requested" (what was asked;
        mirroring compares it on its next run) or "effective" (only the flags that changed the
        output: the drop-in model_free_ptq, which has no such knobs, is described by the
        shortest CLI command that reproduces its output).

    Returns a `Result` (plan, run statistics, the URL or folder published). Raises a
    `StreamerError` naming the problem, with hints on what to change.
    """
    if isinstance(dst, (list, tuple)):
        raise StreamerError(
            "several destinations are converted with convert_many(src, targets), which reads the "
            "source once for all of them", hints=(Hint("target"),),
        )  # fmt: skip
    if record not in ("requested", "effective"):
        raise StreamerError(f"record must be 'requested' or 'effective', not {record!r}")
    _check_workers(workers)
    dev = resolve_device(device)
    progress = progress or Progress()
    source, plan = prepare(
        src, scheme=scheme, scheme_file=scheme_file, config=config, ignore=ignore, token=token,
        dequant_dtype=dequant_dtype, force=force, default_ignore=default_ignore,
        quantize_towers=quantize_towers, skip_incompatible=skip_incompatible, stack=stack,
    )  # fmt: skip
    with source:
        # A private or gated source is not republished publicly unless the caller says so
        # (private=False, the CLI's --public).
        if private is None:
            private = source.private or source.gated
        sink = None
        if dst is not None:
            sink = dst if isinstance(dst, Sink) else open_sink(
                dst, token=token, overwrite=overwrite, private=private,
                create_pr=create_pr, revision=revision,
            )  # fmt: skip
            try:
                check_target(sink, source, progress, dst=dst)
            except BaseException:
                sink.close()
                raise
        if dry_run:
            if max_memory is not None:  # the budget the real run would refuse, refused here too
                try:
                    Runner(plan, source, sink, device=dev, **_budget_args(max_memory)).check_memory(plan.jobs)
                finally:
                    if sink is not None:
                        sink.close()
            elif sink is not None:
                sink.close()  # nothing is written: let go of it
            return Result(plan=plan, dry_run=True)
        if sink is None:
            raise StreamerError("no destination given", hints=(Hint("target"),))
        try:
            done = already_done(plan, source, sink, progress, record, quality=quality)
        except BaseException:
            sink.close()
            raise
        if done is not None:
            return done
        # The plan's warnings (an ignore entry that matches nothing, a fused partner left out, with
        # the default policy off what is about to go wrong…) matter as much in a real run as in
        # --dry-run, where the plan prints them. Each is said once.
        for warning in plan.warnings:
            log.warning("%s", warning)
        # A budget that some tensor cannot fit in is known from the headers: refuse it before
        # begin() creates the target repo, which a failure later would leave behind empty.
        try:
            runner = Runner(
                plan, source, sink, device=dev,
                **_budget_args(max_memory),
                fetch_workers=workers, progress=progress, cancel=cancel,
                fingerprint=fingerprint(plan, source), quality=quality,
            )  # fmt: skip
            runner.check_memory(plan.jobs)
        except BaseException:
            sink.close()  # nothing was started: just let go of the sink's upload threads
            raise
        return publish(runner, executor=executor, record=record, keep_on_cancel=keep_on_cancel)


@dataclass(frozen=True)
class Target:
    """One output of a fan-out (`convert_many`): where it goes and in which scheme.

    dst: a local folder or a Hub repo id `org/name[@branch]`; scheme: a compressed-tensors preset
    name; scheme_file / config: a scheme or quantization config in a file / as a dict, instead of
    scheme; ignore: modules this target keeps unquantized besides the run's common ignore list.
    """

    dst: str
    scheme: str | None = None
    scheme_file: str | None = None
    config: dict | None = None
    ignore: tuple[str, ...] = ()

    @property
    def scheme_name(self) -> str:
        """The scheme as a person names it: the preset, or the file it was read from."""
        return self.scheme or (os.path.basename(self.scheme_file) if self.scheme_file else "custom")


@dataclass
class TargetResult:
    """What became of one target of a fan-out: its Result, or the error that stopped it."""

    target: Target
    result: Result | None = None
    error: BaseException | None = None

    @property
    def ok(self) -> bool:
        """Whether this target was converted (or, for a dry run, planned)."""
        return self.error is None

    @property
    def exit_code(self) -> int:
        """0, 2 for an error the user can fix, 130 for a cancel, 1 otherwise."""
        if self.error is None:
            return 0
        if isinstance(self.error, (Cancelled, KeyboardInterrupt)):
            return 130
        return self.error.exit_code if isinstance(self.error, StreamerError) else 1

    def summary(self, words=str) -> dict:
        """The target's line of `--json`: its Result's summary, or its error in WORDS (a front
        end's wording of a StreamerError; str gives the Python API's)."""
        out = {"target": self.target.dst, "status": "ok" if self.ok else "failed", "exit": self.exit_code}
        if self.result is not None:
            out.update(self.result.summary())
        else:
            out["scheme"] = self.target.scheme_name
        if self.error is not None:
            out["error"] = words(self.error) if isinstance(self.error, StreamerError) else f"{type(self.error).__name__}: {self.error}"
        return out


@dataclass
class FanoutResult:
    """What a fan-out did: one TargetResult per target, in the order given, and the bytes read
    from the source for all of them together (each once)."""

    source: str
    targets: list[TargetResult]
    bytes_read: int = 0  # from the source, for every target together
    bytes_shared: int = 0  # handed from one target's read to another instead of read again
    peak_shared_bytes: int = 0  # the most held at once for targets that had not read it yet
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """Whether every target succeeded."""
        return all(t.ok for t in self.targets)

    @property
    def exit_code(self) -> int:
        """0 when every target succeeded, else the first failed target's exit code."""
        return next((t.exit_code for t in self.targets if not t.ok), 0)

    def summary(self, words=str) -> dict:
        """The whole run as plain data (`--json`): the shared read, and a line per target."""
        return {
            "source": self.source,
            "bytes_read": self.bytes_read,
            "bytes_shared": self.bytes_shared,
            "peak_shared_bytes": self.peak_shared_bytes,
            "seconds": round(self.seconds, 3),
            "ok": self.ok,
            "targets": [t.summary(words) for t in self.targets],
        }


def as_target(item) -> Target:
    """A Target from what a caller passes: a Target, a (dst, scheme) pair, or a dict of its fields."""
    if isinstance(item, Target):
        return item if isinstance(item.dst, str) else dataclasses.replace(item, dst=os.fspath(item.dst))
    if isinstance(item, dict):
        try:
            return Target(**item)
        except TypeError as e:
            raise StreamerError(f"a target has the fields dst, scheme, scheme_file, config and ignore: {e}") from None
    if isinstance(item, (tuple, list)) and len(item) == 2:
        return Target(os.fspath(item[0]), scheme=item[1])
    raise StreamerError(f"a target is a Target, a (destination, scheme) pair or a dict, not {item!r}", hints=(Hint("target"),))


def convert_many(
    src: str | Source,
    targets,
    *,
    ignore=(),
    device: str | None = "auto",
    dry_run: bool = False,
    max_memory: int | str | None = None,
    workers: int = 4,
    token: str | None = None,
    overwrite: bool = False,
    private: bool | None = None,
    create_pr: bool = False,
    revision: str | None = None,
    dequant_dtype: str | None = None,
    force: bool = False,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
    keep_on_cancel: bool = False,
    default_ignore: bool = True,
    quantize_towers: bool = False,
    skip_incompatible: bool = False,
    record: str = "requested",
    stack: bool = True,
    quality: bool = True,
) -> FanoutResult:
    """Convert SRC into several targets at once, reading each source byte once (fan-out).

    targets: `Target`s, (destination, scheme) pairs or dicts with Target's fields. Each target
      gets its own plan (shard layout, fused sets, the policy's choices for its scheme), its own
      single commit and its own card, byte for byte what `convert` makes of it alone.
    The other parameters are `convert`'s and apply to every target. MAX_MEMORY is shared: a part
    holds bytes read for targets that have not taken them yet, the rest is divided between the
    targets. The targets run side by side; one failing (no permission, a shape its scheme cannot
    take) does not stop the others: each has its own TargetResult, with its Result or its error.
    Only a problem every target shares (the source cannot be read, a bad setting) raises, as
    `convert` would. CANCEL stops every target; each unfinished one then holds a
    `streamer.errors.Cancelled` and has published nothing (and keeps its uploads for a rerun
    when KEEP_ON_CANCEL, see `convert`).
    """
    t0 = time.monotonic()
    wanted = [as_target(t) for t in targets]
    if not wanted:
        raise StreamerError("no targets given", hints=(Hint("target"),))
    dsts = [_destination_key(t.dst, revision) for t in wanted]
    twice = sorted({d for d in dsts if dsts.count(d) > 1})
    if twice:
        raise StreamerError(f"two targets write to {twice[0]}: give each target its own destination", hints=(Hint("target"),))
    if record not in ("requested", "effective"):
        raise StreamerError(f"record must be 'requested' or 'effective', not {record!r}")
    _check_workers(workers)
    dev = resolve_device(device)
    limit = Budget(default_memory_budget() if max_memory is None else max_memory).limit  # refuses a bad size
    progress = progress or Progress()
    cancel = cancel or threading.Event()
    policy = Policy(default_ignore=default_ignore, quantize_towers=quantize_towers, skip_incompatible=skip_incompatible)
    source = src if isinstance(src, Source) else open_source(src, token=token)
    with source:
        catalog = build_catalog(source)
        outcomes = [TargetResult(t) for t in wanted]
        ready: list[tuple[TargetResult, Plan, Sink | None]] = []
        if private is None:
            private = source.private or source.gated
        try:
            for out in outcomes:  # plan and check every target before any of them writes
                t = out.target
                sink = None
                try:
                    recipe = make_recipe(t.scheme, scheme_file=t.scheme_file, config=t.config, ignore=[*ignore, *t.ignore])
                    dequant = detect_dequantizer(catalog, recipe, dtype=dequant_dtype, force=force, stack=stack)
                    plan = make_plan(catalog, recipe, source=source.label, dequant=dequant, policy=policy)
                    out.result = Result(plan=plan, dry_run=True)
                    sink = open_sink(t.dst, token=token, overwrite=overwrite, private=private, create_pr=create_pr, revision=revision)
                    check_target(sink, source, _labelled(progress, t), dst=t.dst)
                    if not dry_run:
                        out.result = already_done(plan, source, sink, _labelled(progress, t), record, quality=quality) or out.result
                        if out.result.up_to_date:
                            continue
                except (StreamerError, OSError) as e:
                    out.result, out.error = None, e
                    if sink is not None:
                        sink.close()
                    continue
                ready.append((out, plan, sink))
        except BaseException:  # a Ctrl-C, a bug: let go of the sinks opened so far
            for _, _, sink in ready:
                sink.close()
            raise
        if dry_run or not ready:  # a dry run, or every target refused at planning: nothing to run
            try:
                if dry_run and ready and max_memory is not None:  # the budget the real run would refuse
                    _, share = split_budget(limit, len(ready))
                    _check_shared_memory([Runner(p, source, k, device=dev, max_memory=share) for _, p, k in ready], limit)
            finally:
                for _, _, sink in ready:
                    sink.close()
            return FanoutResult(source.label, outcomes, seconds=time.monotonic() - t0)
        cache, share = split_budget(limit, len(ready))
        reader = SharedReader(source, targets=len(ready), cache_limit=cache, cancel=cancel, progress=progress)
        reader.preload([*catalog.copy_files, "README.md"])
        totals: dict = {}
        lock = threading.Lock()
        runners: list[tuple[TargetResult, Runner]] = []
        try:
            for i, (out, plan, sink) in enumerate(ready):
                for warning in plan.warnings:
                    log.warning("%s: %s", out.target.dst, warning)
                view = reader.view(i)
                runners.append((out, Runner(
                    plan, view, sink, device=dev, max_memory=share, fetch_workers=workers,
                    progress=TargetProgress(progress, out.target.dst, totals, lock), cancel=cancel,
                    fingerprint=fingerprint(plan, view), quality=quality,
                )))  # fmt: skip
            _check_shared_memory([r for _, r in runners], limit)
        except BaseException:
            for _, _, sink in ready:
                sink.close()
            raise
        _run_side_by_side(runners, record, cancel, keep_on_cancel=keep_on_cancel)
        source.on_bytes = None
        return FanoutResult(
            source.label, outcomes, bytes_read=reader.fetched, bytes_shared=reader.served,
            peak_shared_bytes=reader.peak, seconds=time.monotonic() - t0,
        )  # fmt: skip


def _destination_key(dst: str, revision: str | None) -> str:
    """Where DST writes: a folder's normalised path, or a Hub repo's `org/name@branch`."""
    if not is_hub_spec(dst):
        return os.path.normpath(dst)
    repo, _ = split_revision(dst)
    return f"{repo.lower()}@{target_branch(dst, revision) or 'main'}"  # the Hub's repo names ignore case


def _labelled(progress: Progress, target: Target) -> Progress:
    """A Progress whose log lines name TARGET, for notes said before the runs start."""
    return TargetProgress(progress, target.dst, {}, threading.Lock())


def _check_shared_memory(runners: list[Runner], limit: int) -> None:
    """Refuse, before anything is written, a shared budget of LIMIT bytes too small for one of
    RUNNERS (each has its share of it): the hint is a budget whose shares fit."""
    largest = 0
    for r in runners:
        needs = r.memory_needs(r.plan.jobs)
        largest = max([largest, *(n for n, _ in needs)])
    share = runners[0].budget.limit
    if largest <= share:
        return
    need = math.ceil(largest * len(runners) / (1 - CACHE_SHARE)) + 1
    raise StreamerError(
        f"the memory budget of {human_bytes(limit)} is too small for {len(runners)} targets at once: "
        f"each gets {human_bytes(share)}, and one needs {human_bytes(largest)} of working memory",
        hints=(Hint("max_memory", suggest_size(need)),),
    )


def _run_side_by_side(
    runners: list[tuple[TargetResult, Runner]], record: str, cancel: threading.Event, *, keep_on_cancel: bool = False
) -> None:
    """Run every target's conversion in its own thread; each outcome lands in its TargetResult.
    A Ctrl-C here cancels them all and waits until each has cleaned up (keeping what a rerun
    resumes from, as a Ctrl-C of one conversion does, and as any cancel does when KEEP_ON_CANCEL)."""
    interrupted = threading.Event()
    if keep_on_cancel:
        interrupted.set()

    def one(out: TargetResult, runner: Runner) -> None:
        try:
            out.result = publish(runner, record=record, keep_on_cancel=interrupted, settle=False)
        except BaseException as e:  # recorded for this target; the others go on
            out.result, out.error = None, e
            if not isinstance(e, (StreamerError, Cancelled, OSError)):
                log.debug("target %s failed", out.target.dst, exc_info=True)
        finally:
            runner.source.close()  # its claims on bytes kept for it are dropped

    threads = [
        threading.Thread(target=one, args=pair, name=f"streamer-target-{i}", daemon=True)
        for i, pair in enumerate(runners)
    ]
    for t in threads:
        t.start()
    for t in threads:
        while t.is_alive():
            try:
                t.join(0.1)
            except KeyboardInterrupt:
                interrupted.set()
                cancel.set()
    sinks = [runner.sink for _, runner in runners]
    # every target has let go: what one created for nothing can go now (two rounds: the branches
    # first, then a new repo that only those branches kept)
    for last in (False, True):
        for sink in sinks:
            sink.settle(sinks, last=last)


def check_target(sink: Sink, source: Source, progress: Progress, *, dst=None) -> None:
    """Refuse a destination SINK that cannot take a conversion of SOURCE (the source repo itself,
    a repo streamer did not write …) before anything is written; PROGRESS gets its visibility note.
    DST: the destination as the caller wrote it, for an error about a repo id that may have been
    meant as a path into a local folder."""
    try:
        _check_target(sink, source, progress)
    except (HubError, TargetError) as e:
        why = read_as_repo(dst) if isinstance(dst, str) and sink.repo_id is not None else None
        if why is None or not ("no write access" in e.message or "not found" in e.message):
            raise
        raise type(e)(f"{why}: {e.message}", hints=(*e.hints, Hint("target"))) from None


def _check_target(sink: Sink, source: Source, progress: Progress) -> None:
    if sink.repo_id and source.repo_id and sink.repo_id.lower() == source.repo_id.lower():  # the Hub ignores case
        raise StreamerError("the target repo is the source repo", hints=(Hint("target"),))
    if sink.folder is not None and source.folder is not None:
        src, dst = source.folder, sink.folder
        if dst == src or dst in src.parents:
            where, why = ("is" if dst == src else "holds"), "replacing it would delete the source"
        elif src in dst.parents:
            where, why = "is inside", "the output would land among the source's own files"
        else:
            where = None
        if where is not None:
            raise StreamerError(f"the destination {dst} {where} the source folder {src}: {why}", hints=(Hint("target"),))
    sink.check()
    note = sink.visibility_note(source.private or source.gated)
    if note is not None:
        progress.note(note)


def _read_small(source: Source, path: str) -> bytes:
    return bytes(source.read_file(path))


def already_done(
    plan: Plan, source: Source, sink: Sink, progress: Progress, record: str, *, quality: bool = True
) -> Result | None:
    """The Result of a run that has nothing to do, because SINK already holds PLAN's output of
    this very source commit with these settings (a rerun of a finished command; QUALITY: whether
    this run would write a quality report, which the target must then have): said once, the
    sink closed. None when there is work to do, and always for a source without a commit (a
    local folder). The check costs the small requests check() made, a read of the card and, when
    all else matched, of the source's small files; no tensor byte is read."""
    if source.commit is None:  # a local folder can change under the same names: convert it again
        return None
    # every file the run would write but the card: the shards by size (the plan and the source
    # commit fix their bytes), config.json and the index by content, the copied files by content
    # too, read from the source only once everything else matched (a source may keep them in LFS
    # and the target not, so their Hub ids cannot be compared)
    files: dict = {j.shard: shard_size(j) for j in plan.jobs}
    for path in plan.catalog.copy_files:
        if path != CONFIG_NAME:
            files[path] = functools.partial(_read_small, source, path)
    files.update(_plan_files(plan))
    wanted = provenance(plan, source, record=record, quality=quality)
    accepts = functools.partial(wanted.produced, allow_nonfinite=allows_nonfinite())
    url = sink.holds(accepts, files, fingerprint(plan, source))
    if url is None:
        return None
    where = f"a pull request on {sink.label} already proposes" if "/discussions/" in url else f"{sink.label} already holds"
    progress.message(f"{where} this conversion ({plan.recipe.name} of "
                     f"{_source_label(plan, source)}@{source.commit[:7]}): nothing to do")  # fmt: skip
    sink.close()
    return Result(plan=plan, stats=RunStats(), url=url, up_to_date=True)


# Failures of the input itself: the same command fails the same way. What a run created for its
# output is removed when it holds nothing a rerun could reuse (the rerun a NaN refusal suggests,
# with --nonfinite passthrough, resumes from the shards already uploaded).
FINAL_ERRORS = (InputError, PlanError, SchemeError)


def publish(
    runner: Runner,
    *,
    executor=None,
    record: str = "requested",
    keep_on_cancel: bool | threading.Event = False,
    settle: bool = True,
) -> Result:
    """Run RUNNER (on EXECUTOR, or here) and publish its output with the small files, the model
    card and one commit; any failure aborts the sink, which is closed either way. RECORD: see
    `convert`. KEEP_ON_CANCEL (or, an Event, once set: the cancel came from a Ctrl-C) says that
    the runner's cancel, unlike a user's, keeps the work for a rerun to resume. SETTLE: settle
    the sink's abort at once; False when the caller does once every target beside it is done."""
    plan, source, sink, progress, cancel = runner.plan, runner.source, runner.sink, runner.progress, runner.cancel
    begun = False
    try:
        if executor is not None:  # what the cluster cannot run is refused before begin() creates the target
            executor.check(runner)
        sink.begin()
        begun = True
        progress.message(
            f"converting {plan.source} -> {sink.label}: {len(plan.jobs)} shard(s), "
            f"{plan.n_quantized} weights with {plan.recipe.name} on {runner.device}"
        )
        stats = runner.run() if executor is None else executor.run(runner)
        report = build_report(stats.errors, plan.recipe.name) if runner.quality and stats.errors else None
        prov = provenance(plan, source, record=record, nonfinite=stats.nonfinite, quality=runner.quality)
        _write_small_files(plan, source, sink, prov, target=sink.label, quality=report)
        message = f"Quantize {_source_label(plan, source)} with {plan.recipe.name} (streamer)"
        url = sink.commit(message, _commit_description(plan, source))
        progress.message(f"done: {url}")
        extra = {}
        if isinstance(stats, ClusterStats):  # a cluster run: what each node did
            extra["nodes"] = {k: v.as_dict() for k, v in stats.nodes.items()}
        return Result(plan=plan, stats=stats, url=url, extra=extra, quality=report)
    except BaseException as e:
        # a user's cancel ends the run for good; so does a refused input when nothing is up yet
        keep = keep_on_cancel.is_set() if isinstance(keep_on_cancel, threading.Event) else keep_on_cancel
        cancelled = cancel.is_set() and not keep
        # refused for its input before any shard was delivered: a rerun has nothing to reuse;
        # nor has one after begin() failed half-way (a repo created, its branch refused)
        refused = isinstance(e, FINAL_ERRORS) and not sink.delivered()
        sink.abort(resumable=begun and not (cancelled or refused))
        if settle:
            sink.settle()
        raise
    finally:
        sink.close()


def _budget_args(max_memory: int | str | Budget | None) -> dict:
    """The runner's budget settings for convert's one MAX_MEMORY setting."""
    if isinstance(max_memory, Budget):  # shared with other conversions running now
        return {"max_memory": max_memory.limit, "budget": max_memory}
    return {"max_memory": default_memory_budget() if max_memory is None else Budget(max_memory).limit}


def fingerprint(plan: Plan, source: Source) -> str | None:
    """A digest of everything the output bytes depend on; None when the source is not pinned
    (a local folder can change under the same names), which disables resume."""
    if source.commit is None:
        return None
    import hashlib

    from streamer import __version__

    blob = json.dumps(
        {
            "source": source.repo_id,
            "commit": source.commit,
            "config": plan.quantization_config(),
            "dequant": plan.dequant,
            "version": __version__,
            "jobs": [[j.shard, [[o.name, o.dtype, list(o.shape), o.origin] for o in j.outputs]] for j in plan.jobs],
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def _source_name(source: Source) -> str:
    """The source as published text names it: a repo id, or a local folder's name (a card or
    commit must not leak the converting machine's paths)."""
    return source.repo_id or os.path.basename(os.path.normpath(source.label))


def _source_label(plan: Plan, source: Source) -> str:
    return plan.source if source.repo_id else _source_name(source)


def _commit_description(plan: Plan, source: Source) -> str:
    commit = f"@{source.commit}" if source.commit else ""
    return f"Source: {_source_label(plan, source)}{commit}\nScheme: {plan.recipe.name}\nIgnore: {plan.config_ignore}"


def provenance(
    plan: Plan, source: Source, *, record: str = "requested", nonfinite: Sequence[str] = (), quality: bool = True
) -> Provenance:
    """Where the output came from and the settings that made it, as the model card records them
    (RECORD: see `convert`; NONFINITE: the weights quantized with their NaN or Inf; QUALITY:
    whether the run measured the quantization error)."""
    dq = plan.dequantizer
    flags = plan.policy.flags() if record == "requested" else plan.effective_flags()
    return Provenance(
        source=_source_name(source),
        source_commit=source.commit,
        scheme=plan.recipe.name,
        ignore=tuple(plan.recipe.ignore),
        dequant_dtype=dq.dtype_name,
        policy=tuple(f.lstrip("-") for f in flags),
        nonfinite=tuple(sorted(nonfinite)),
        quality=quality,
    )


def _source_card(plan: Plan, source: Source) -> str | None:
    """The source's README.md (its model card), when it has one. The catalog never copies it
    (the output gets its own card), so it is looked up in the source's file listing."""
    if "README.md" not in plan.catalog.file_sizes:
        return None
    try:
        return bytes(source.read_file("README.md")).decode("utf-8", errors="replace")
    except (StreamerError, OSError) as e:  # a card is metadata: the conversion goes on without it
        log.warning("could not read the source's model card (%s); its metadata is not carried over", e)
        return None


def _plan_files(plan: Plan) -> dict[str, bytes]:
    """The files the plan alone decides: config.json with its quantization_config, and the
    shard index (when the source has one, or the output has several shards)."""
    catalog = plan.catalog
    config = dict(catalog.config or {})
    config["quantization_config"] = plan.quantization_config()
    files = {CONFIG_NAME: dumps_json(config)}
    if INDEX_NAME in catalog.file_sizes or len(plan.jobs) != 1:
        index = {
            "metadata": {**catalog.index_metadata, "total_size": plan.bytes_out},
            "weight_map": dict(sorted(plan.weight_map.items())),
        }
        files[INDEX_NAME] = dumps_json(index)
    return files


def _write_small_files(
    plan: Plan, source: Source, sink: Sink, prov: Provenance, *, target: str, quality: QualityReport | None = None
) -> None:
    for path in plan.catalog.copy_files:
        if path == CONFIG_NAME:
            continue
        sink.put_file(path, bytes(source.read_file(path)))
    for path, data in _plan_files(plan).items():
        sink.put_file(path, data)
    card = model_card(
        plan, prov, target=_target_name(target, sink),
        source_card=_source_card(plan, source), quality=quality,
    )  # fmt: skip
    sink.put_file("README.md", card.encode())


def _target_name(label: str, sink: Sink) -> str:
    """The target as a card names it: the repo id, or a local folder's name (never its path)."""
    return sink.repo_id or os.path.basename(os.path.normpath(label))


# The name users know from the README; `convert` is the engine's verb.
def quantize(src, dst, *, scheme=None, ignore=(), device="auto", default_ignore=True, **kwargs) -> Result:
    """Quantize the checkpoint at SRC (folder or Hub repo id) into DST (folder or repo id).

    Besides IGNORE, embeddings, the output head, MoE routers and vision/audio towers stay
    unquantized unless default_ignore=False (see `prepare` for quantize_towers and
    skip_incompatible)."""
    return convert(src, dst, scheme=scheme, ignore=ignore, device=device, default_ignore=default_ignore, **kwargs)

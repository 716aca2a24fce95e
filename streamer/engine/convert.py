"""The Python API every front door (CLI, Space, mirroring jobs, model_free_ptq) wraps.

`convert` runs the data flow once: open source → catalog → recipe → plan → (check target) →
pipeline → small files → one commit. Any failure aborts the sink, so the destination is left as
it was.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass, field

import torch

from streamer.engine.card import model_card
from streamer.io.provenance import Provenance
from streamer.io.catalog import CONFIG_NAME, INDEX_NAME, build_catalog
from streamer.errors import Hint, StreamerError
from streamer.engine.plan import Plan, Policy, make_plan
from streamer.engine.budget import Budget, default_memory_budget
from streamer.engine.cluster import ClusterStats
from streamer.engine.pipeline import RunStats, Runner
from streamer.engine.progress import Progress
from streamer.engine.quality import QualityReport, build_report
from streamer.quant.dequant import detect_dequantizer
from streamer.quant.schemes import make_recipe
from streamer.formats import dumps_json, split_revision
from streamer.io.locations import is_hub_spec, open_source
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

        repo_id, rev = split_revision(dst)
        return HubSink(
            repo_id,
            token=token,
            revision=revision or rev,
            private=private,
            create_pr=create_pr,
            overwrite=overwrite,
        )
    return LocalSink(dst, overwrite=overwrite)


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
    max_memory: int | Budget | None = None,
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
      max_memory: the byte budget for model bytes held at once (default: half the available
        memory); a `Budget` object shares one budget between conversions running together.
      workers: parallel range reads (or file reads) per source.
      progress: a `Progress` that receives bytes read, quantized and uploaded, and log lines.
      cancel: an Event; once set, the run stops within about a second, publishes nothing and
        raises `streamer.errors.Cancelled`.
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
    if record not in ("requested", "effective"):
        raise StreamerError(f"record must be 'requested' or 'effective', not {record!r}")
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
        source_private = source.private or source.gated
        if private is None:
            private = source_private
        sink = None
        if dst is not None:
            sink = dst if isinstance(dst, Sink) else open_sink(
                dst, token=token, overwrite=overwrite, private=private,
                create_pr=create_pr, revision=revision,
            )  # fmt: skip
            if sink.repo_id and sink.repo_id == source.repo_id:
                raise StreamerError("the target repo is the source repo", hints=(Hint("target"),))
            sink.check()
            note = sink.visibility_note(source_private)
            if note:
                progress.message(note)
        if dry_run:
            return Result(plan=plan, dry_run=True)
        if sink is None:
            raise StreamerError("no destination given", hints=(Hint("target"),))
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
        try:
            sink.begin()
            progress.message(
                f"converting {plan.source} -> {sink.label}: {len(plan.jobs)} shard(s), "
                f"{plan.n_quantized} weights with {plan.recipe.name} on {dev}"
            )
            stats = runner.run() if executor is None else executor.run(runner)
            # a Ray run's nodes do not send their sums back (yet): no report rather than an empty one
            report = build_report(stats.errors, plan.recipe.name) if quality and stats.errors else None
            _write_small_files(plan, source, sink, target=sink.label, record=record, quality=report)
            message = f"Quantize {_source_label(plan, source)} with {plan.recipe.name} (streamer)"
            url = sink.commit(message, _commit_description(plan, source))
            progress.message(f"done: {url}")
            extra = {}
            if isinstance(stats, ClusterStats):  # a cluster run: what each node did
                extra["nodes"] = {k: v.as_dict() for k, v in stats.nodes.items()}
            return Result(plan=plan, stats=stats, url=url, extra=extra, quality=report)
        except BaseException:
            sink.abort(cancelled=cancel is not None and cancel.is_set())
            raise
        finally:
            sink.close()


def _budget_args(max_memory: int | Budget | None) -> dict:
    """The runner's budget settings for convert's one MAX_MEMORY setting."""
    if isinstance(max_memory, Budget):  # shared with other conversions running now
        return {"max_memory": max_memory.limit, "budget": max_memory}
    return {"max_memory": default_memory_budget() if max_memory is None else max_memory}


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


def provenance(plan: Plan, source: Source, *, record: str = "requested") -> Provenance:
    """Where the output came from and the settings that made it, as the model card records them
    (RECORD: see `convert`)."""
    dq = plan.dequantizer
    flags = plan.policy.flags() if record == "requested" else plan.effective_flags()
    return Provenance(
        source=_source_name(source),
        source_commit=source.commit,
        scheme=plan.recipe.name,
        ignore=tuple(plan.recipe.ignore),
        dequant_dtype=dq.dtype_name,
        policy=tuple(f.lstrip("-") for f in flags),
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


def _write_small_files(
    plan: Plan, source: Source, sink: Sink, *, target: str, record: str = "requested", quality: QualityReport | None = None
) -> None:
    catalog = plan.catalog
    for path in catalog.copy_files:
        if path == CONFIG_NAME:
            continue
        sink.put_file(path, bytes(source.read_file(path)))
    config = dict(catalog.config or {})
    config["quantization_config"] = plan.quantization_config()
    sink.put_file(CONFIG_NAME, dumps_json(config))
    weight_map = plan.weight_map
    if INDEX_NAME in catalog.file_sizes or len(plan.jobs) != 1:
        index = {
            "metadata": {**catalog.index_metadata, "total_size": plan.bytes_out},
            "weight_map": dict(sorted(weight_map.items())),
        }
        sink.put_file(INDEX_NAME, dumps_json(index))
    card = model_card(
        plan, provenance(plan, source, record=record), target=_target_name(target, sink),
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

"""Run a plan: fetch → quantize → serialize → sink, with different pieces in flight at once.

Memory is bounded by one byte budget. Each job (output shard) is cut into pieces small enough to
fit; a piece never splits a fused set. Fetching runs in a thread pool (I/O releases the GIL);
quantization runs on one thread (torch uses every core, or the GPU); the sink uploads in its own
threads. The only work a user waits for is the slowest of the three.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field

import torch

from streamer.engine.budget import Budget
from streamer.engine.plan import Job, OutTensor, Plan
from streamer.engine.progress import Progress
from streamer.errors import Cancelled, Hint, InputError, StreamerError
from streamer.formats import allows_nonfinite, human_bytes, safetensors_name
from streamer.io.catalog import TensorInfo
from streamer.io.sink import ShardWriter, Sink
from streamer.io.source import Source, Span
from streamer.quant.kernels import global_scale, quantize_weight
from streamer.quant.quality import ErrorSums

log = logging.getLogger("streamer")

# Neighbouring tensors closer than this are fetched in one request: fewer round trips, and the
# few wasted bytes cost less than a request. Gaps only occur where a tensor moved to another job
# (a fused partner), so keep it small: those bytes would be read twice.
MERGE_GAP = 4096
# Quantization keeps float temporaries of about this multiple of a weight's size alive.
WORK_FACTOR = 3
# Working memory of one piece, at most. Smaller pieces let a shard's quantization follow its
# download instead of waiting for the whole shard, so its upload starts as soon as the last
# bytes arrive; much smaller ones would spend more on requests and per-call overhead.
PIECE_BYTES = 256 * 1024 * 1024

def nonfinite_count(w: torch.Tensor) -> tuple[int, int]:
    """(NaN count, ±Inf count) of W; only computed for the error message."""
    return int(torch.isnan(w).sum()), int(torch.isinf(w).sum())


def is_finite(w: torch.Tensor) -> bool:
    """Whether every element of W is finite, in one cheap pass.

    min and max propagate NaN, and an Inf is the min or the max, so both are finite exactly when
    every element is. torch.aminmax reads the tensor once without a full-size temporary:
    ~4 ms for a 100 MB bf16 weight on 2 CPU cores, against ~100 ms to quantize it to FP8
    (isfinite().all() takes ~220 ms, twice the quantization)."""
    if w.numel() == 0:
        return True
    lo, hi = torch.aminmax(w)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


@dataclass
class Piece:
    """A part of a job fetched, quantized and written together (see split_job)."""

    job: Job
    inputs: list[TensorInfo]
    outputs: list[OutTensor]
    quantize: list  # QuantOp
    passthrough: list[str]
    first: bool = False  # first piece of its job: opens the shard writer
    last: bool = False  # last piece of its job: closes the shard writer
    extra: int = 0  # working bytes the inputs do not show: dense weights of a quantized source

    @property
    def bytes_in(self) -> int:
        """Bytes the piece reads."""
        return sum(t.nbytes for t in self.inputs)

    @property
    def cost(self) -> int:
        """Bytes the piece holds at most: its reads, its outputs and the quantizer's temporaries."""
        work = sum(t.nbytes for t in self.inputs if t.name in {q.tensor for q in self.quantize})
        return self.bytes_in + sum(o.nbytes for o in self.outputs) + WORK_FACTOR * work + self.extra


@dataclass
class RunStats:
    """What a run did: bytes, shards, time per stage, the budget's peak."""

    bytes_read: int = 0
    bytes_written: int = 0
    shards: list[str] = field(default_factory=list)
    seconds: float = 0.0
    stage_seconds: dict = field(default_factory=dict)
    peak_budget: int = 0
    pieces: int = 0
    resumed: list[str] = field(default_factory=list)  # shards an interrupted run had delivered
    nonfinite: list[str] = field(default_factory=list)  # NaN/Inf weights quantized as asked
    # quantized weight -> its error sums: the quality report's data (streamer.engine.quality)
    errors: dict[str, ErrorSums] = field(default_factory=dict)


def shard_header(job: Job) -> tuple[bytes, dict[str, int]]:
    """The safetensors header of a job's output, and each tensor's absolute file offset."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offsets: dict[str, int] = {}
    pos = 0
    for o in job.outputs:
        header[o.name] = {"dtype": o.dtype, "shape": list(o.shape), "data_offsets": [pos, pos + o.nbytes]}
        offsets[o.name] = pos
        pos += o.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors writes it
    start = 8 + len(raw)
    prefix = len(raw).to_bytes(8, "little") + raw
    return prefix, {k: start + v for k, v in offsets.items()}


def shard_size(job: Job) -> int:
    """The size of JOB's output file: its header, then its tensors."""
    return len(shard_header(job)[0]) + job.bytes_out


def split_job(job: Job, plan: Plan, limit: int) -> list[Piece]:
    """Cut JOB of PLAN into pieces of at most LIMIT bytes of working memory, fused sets kept
    whole (a unit larger than LIMIT is a piece of its own).
    """
    outputs_of: dict[str, list[OutTensor]] = {}
    for o in job.outputs:
        outputs_of.setdefault(o.origin, []).append(o)
    # a dequantized weight is read from several stored tensors (packed data, scales …)
    inputs_of = _inputs_of(job, plan)

    ops = {q.tensor: q for q in job.quantize}
    units: list[list[str]] = []
    seen: set[str] = set()
    fused_members = {fs.id: fs.members for fs in plan.fused_sets}
    for name in [*ops, *job.passthrough]:
        if name in seen:
            continue
        op = ops.get(name)
        unit = list(fused_members[op.fused]) if op is not None and op.fused is not None else [name]
        seen.update(unit)
        units.append(unit)
    units.sort(key=lambda u: min((t.file, t.span.start) for n in u for t in inputs_of[n]))

    pieces: list[Piece] = []
    current: Piece | None = None
    for unit in units:
        piece = Piece(
            job,
            [t for n in unit for t in inputs_of[n]],
            [o for n in unit for o in outputs_of[n]],
            [ops[n] for n in unit if n in ops],
            [n for n in unit if n not in ops],
        )
        piece.extra = sum(plan.dequantizer.work_bytes(n) for n in unit)
        if current is not None and current.cost + piece.cost <= limit:
            current.inputs += piece.inputs
            current.outputs += piece.outputs
            current.quantize += piece.quantize
            current.passthrough += piece.passthrough
            current.extra += piece.extra
        else:
            current = piece
            pieces.append(current)
    if not pieces:
        pieces.append(Piece(job, [], [], [], []))
    pieces[0].first = True
    pieces[-1].last = True
    return pieces


def _inputs_of(job: Job, plan: Plan) -> dict[str, list[TensorInfo]]:
    """name -> the stored tensors of JOB read to produce it (its own bytes, or a quantized
    weight's data and scales)."""
    by_name = {t.name: t for t in job.inputs}
    dq = plan.dequantizer
    return {
        name: [by_name[i.name] for i in dq.inputs_for(name)]
        for name in [*(q.tensor for q in job.quantize), *job.passthrough]
    }


def _merge(inputs: list[TensorInfo]) -> list[tuple[str, Span, list[TensorInfo]]]:
    """Group a piece's reads into few large requests per file."""
    groups: list[tuple[str, Span, list[TensorInfo]]] = []
    for t in sorted(inputs, key=lambda t: (t.file, t.span.start)):
        if groups:
            file, span, members = groups[-1]
            if file == t.file and t.span.start - span.end <= MERGE_GAP:
                members.append(t)
                groups[-1] = (file, Span(span.start, max(span.end, t.span.end)), members)
                continue
        groups.append((t.file, t.span, [t]))
    return groups


class Runner:
    """Runs a plan: fetch, quantize and write pieces at once within a byte budget."""

    def __init__(
        self,
        plan: Plan,
        source: Source,
        sink: Sink,
        *,
        device: torch.device,
        max_memory: int,
        budget: Budget | None = None,
        fetch_workers: int = 4,
        progress: Progress | None = None,
        cancel: threading.Event | None = None,
        fingerprint: str | None = None,
        allow_nonfinite: bool | None = None,
        quality: bool = True,
    ):
        """plan: what to do; source: where the tensors are read; sink: where the shards go;
        device: where quantization runs; max_memory: the byte budget (ignored when BUDGET, one
        shared by several runners, is given); fetch_workers: parallel reads; progress: where bytes
        are reported; cancel: an Event that stops the run (Cancelled); fingerprint: identifies the
        output, so a rerun resumes the shards delivered; allow_nonfinite: quantize NaN/Inf weights
        (None: the calling context's nonfinite_policy); quality: measure each quantized weight's
        error (RunStats.errors) while quantizing.
        """
        self.quality = quality
        self.plan = plan
        # None: the policy of the calling context (see nonfinite_policy), refuse by default
        self.allow_nonfinite = (
            allows_nonfinite() if allow_nonfinite is None else bool(allow_nonfinite)
        )
        self.source = source
        self.sink = sink
        self.device = device
        # Several runners (mirroring jobs in parallel) may share one budget.
        self.shared_budget = budget is not None
        self.budget = budget if budget is not None else Budget(max_memory)
        self.fetch_workers = fetch_workers
        self.progress = progress or Progress()
        self.cancel = cancel or threading.Event()
        self.pin = device.type == "cuda"
        self.stats = RunStats()
        self.fingerprint = fingerprint  # identifies the exact output, so a rerun can resume
        self._read_streamed = False  # the source reports "read" bytes itself (see run)

    # -- stages ----------------------------------------------------------------------------

    def _fetch(self, piece: Piece) -> dict[str, torch.Tensor]:
        """Read a piece's inputs; returns name -> uint8 tensor view of its bytes."""
        views: dict[str, torch.Tensor] = {}
        by_file: dict[str, list[tuple[Span, list[TensorInfo]]]] = {}
        for file, span, members in _merge(piece.inputs):
            by_file.setdefault(file, []).append((span, members))
        for file, groups in by_file.items():
            bufs = [torch.empty(span.size, dtype=torch.uint8, pin_memory=self.pin) for span, _ in groups]
            self.source.read_spans_into(file, [s for s, _ in groups], [memoryview(b.numpy()) for b in bufs])
            for (span, members), buf in zip(groups, bufs):
                for t in members:
                    views[t.key] = buf[t.span.start - span.start : t.span.end - span.start]
            if not self._read_streamed:
                self.progress.advance("read", sum(s.size for s, _ in groups))
            self.stats.bytes_read += sum(s.size for s, _ in groups)
        return views

    def _quantize(self, piece: Piece, raw: dict[str, torch.Tensor], writer: ShardWriter, offsets) -> None:
        dq = self.plan.dequantizer
        stored = {t.name: t for t in piece.inputs}
        out_of = {}
        for o in piece.outputs:
            out_of.setdefault(o.origin, []).append(o)

        def put(out: OutTensor, data: torch.Tensor) -> None:
            writer.write_at(offsets[out.name], _as_bytes(data))

        # "quantize" moves as each tensor is done (a piece can be 256 MB), by the bytes it was
        # read from; the piece's advances sum to exactly piece.bytes_in
        left = piece.bytes_in

        def done(name: str) -> None:
            nonlocal left
            n = min(sum(i.nbytes for i in dq.inputs_for(name)), left)
            if n > 0:
                left -= n
                self.progress.advance("quantize", n)

        for name in piece.passthrough:
            (out,) = out_of[name]
            if dq.transforms(name):
                put(out, dq.dense(name, raw, self.device).cpu())
            else:
                put(out, raw[stored[name].key])  # byte for byte, never through a dtype
            done(name)

        weights = {q.tensor: dq.dense(q.tensor, raw, self.device) for q in piece.quantize}
        for name, w in weights.items():
            # NaN/Inf would silently become NaN scales (and garbage weights) in the output
            if not is_finite(w):
                self._nonfinite(name, w, stored)
        groups = {q.tensor: q.group for q in piece.quantize}
        scales: dict[int, torch.Tensor] = {}
        for fid in {q.fused for q in piece.quantize if q.fused is not None}:
            members = self.plan.fused_sets[fid].members
            scheme = self.plan.recipe.groups[groups[members[0]]]
            scales[fid] = global_scale([weights[m] for m in members], scheme)
        for q in piece.quantize:
            scheme = self.plan.recipe.groups[q.group]
            errors = ErrorSums() if self.quality else None
            result = quantize_weight(weights.pop(q.tensor), scheme, scales.get(q.fused), errors=errors)
            if errors is not None:
                self.stats.errors[q.tensor] = errors
            base = q.tensor[: -len("weight")]
            planned = {o.name: o for o in out_of[q.tensor]}
            for suffix, tensor in result.items():
                out = planned[base + suffix]
                tensor = tensor.cpu()
                if safetensors_name(tensor.dtype) != out.dtype or tuple(tensor.shape) != out.shape:
                    raise RuntimeError(
                        f"internal error: {out.name} came out {tensor.dtype}{list(tensor.shape)}, "
                        f"planned {out.dtype}{list(out.shape)}"
                    )
                put(out, tensor)
            done(q.tensor)
        if left > 0:  # bytes no tensor claimed (none, as split_job cuts pieces): the total stays exact
            self.progress.advance("quantize", left)

    def _nonfinite(self, name: str, w: torch.Tensor, stored: dict[str, TensorInfo]) -> None:
        nan, inf = nonfinite_count(w)
        info = stored.get(name)
        where = f" (in {info.file})" if info is not None else ""
        what = " and ".join(p for p in (f"{nan} NaN" if nan else "", f"{inf} Inf" if inf else "") if p)
        module = name[: -len(".weight")] if name.endswith(".weight") else name
        if self.allow_nonfinite:
            log.warning(
                "warning: %s%s holds %s value(s) of %d; quantized as asked (NaN/Inf weights "
                "passed through): its scales are not finite", name, where, what, w.numel(),
            )  # fmt: skip
            self.stats.nonfinite.append(name)
            return
        # besides fixing the checkpoint: keep the module unquantized, or quantize it anyway
        raise InputError(
            f"tensor {name}{where} holds {what} value(s) of {w.numel()}; quantizing it would "
            "write NaN scales. Fix the checkpoint, or convert it anyway",
            hints=(Hint("ignore", module), Hint("nonfinite", "passthrough")),
        )

    # -- memory ----------------------------------------------------------------------------

    def memory_needs(self, jobs: list[Job]) -> list[tuple[int, str]]:
        """(bytes, what) for everything of JOBS that must fit in the budget at once, whatever its size:
        each tensor (or fused set, quantized together) with its working memory, and, for a sink
        that buffers whole shards, the output shard it is written into, held until uploaded
        (a tensor that cannot fit beside its shard would wait for memory forever)."""
        needs: list[tuple[int, str]] = []
        for job in jobs:
            held = self._writer_cost(job)
            beside = (
                f" beside its output shard {job.shard} ({human_bytes(job.bytes_out)}, held in "
                "memory until it is uploaded)" if held else ""
            )  # fmt: skip
            for unit in split_job(job, self.plan, 0):  # limit 0: one piece per tensor or fused set
                names = [q.tensor for q in unit.quantize] + unit.passthrough
                if not names:
                    continue
                what = f"tensor {names[0]}" if len(names) == 1 else f"fused set {', '.join(names)}"
                needs.append((unit.cost + held, what + beside))
        return needs

    def check_memory(self, jobs: list[Job]) -> None:
        """Refuse a budget that some tensor of JOBS cannot fit in, naming the largest need of the
        plan and a max_memory that then works (checked once for the whole plan, before any read)."""
        limit = self.budget.limit
        needs = self.memory_needs(jobs)
        if not needs:
            return
        largest, what = max(needs, key=lambda n: n[0])
        if largest <= limit:
            return
        over = sum(1 for n, _ in needs if n > limit)
        raise StreamerError(
            f"the memory budget of {human_bytes(limit)} is too small: {what} needs "
            f"{human_bytes(largest)} of working memory, the largest need of this plan ({over} "
            "item(s) do not fit)",
            hints=(Hint("max_memory", suggest_size(largest)),),
        )

    # -- driver ----------------------------------------------------------------------------

    def _wait(self, fut: Future):
        """fut.result(), but a cancel is noticed within a tenth of a second, however much of the
        piece's transfer is left (a piece can be 256 MB: seconds to minutes on a slow link)."""
        while True:
            try:
                return fut.result(timeout=0.1)
            except FutureTimeout:
                if self.cancel.is_set():
                    raise Cancelled() from None

    def run(self) -> RunStats:
        """Convert every job of the plan not already delivered; the run's RunStats.

        Raises Cancelled once the cancel event is set, InputError for a bad tensor, StreamerError for
        a budget no tensor fits in (before any read); what was written is discarded on any failure.
        """
        t0 = time.monotonic()
        # a source that reads over the network stops its transfers in flight on a cancel
        self.source.cancel = self.cancel
        if self.source.reports_bytes:
            # ... and reports its bytes as they arrive (else "read" moves once per piece)
            self.source.on_bytes = functools.partial(self.progress.advance, "read")
            self._read_streamed = True
        done = set()
        if self.fingerprint is not None:
            done = self.sink.resume(self.fingerprint, [j.shard for j in self.plan.jobs])
            self.stats.resumed = sorted(done)
            for shard in done:  # a resumed shard's quality sums and NaN/Inf weights
                restore_notes(self.stats, self.sink.resumed_notes(shard), allow_nonfinite=self.allow_nonfinite)
        jobs = [j for j in self.plan.jobs if j.shard not in done]
        self.check_memory(jobs)
        pieces = self.pieces(jobs)
        self.stats.pieces = len(pieces)
        # a source shared by several targets (engine/fanout.py) keeps each tensor until all have read it
        self.source.will_read([p.inputs for p in pieces])
        for stage, total in self.totals(jobs).items():
            self.progress.set_total(stage, total)
        # Bytes a start-up reader holds count against the budget until they are served, so the
        # run's memory stays within --max-memory (given back as the reader's share shrinks).
        reserved = self.source.held_bytes
        if reserved:
            self.budget.acquire(reserved, force=True)

        def unreserve(final: bool = False) -> None:
            nonlocal reserved
            now = 0 if final else min(self.source.held_bytes, reserved)
            if now < reserved:
                self.budget.release(reserved - now)
                reserved = now

        pool = ThreadPoolExecutor(self.fetch_workers, thread_name_prefix="streamer-fetch")
        pending: deque[tuple[Piece, Future]] = deque()
        writers: dict[str, tuple[ShardWriter, dict[str, int]]] = {}
        closing: list[Future] = []
        queue = deque(pieces)
        # Read ahead as far as the budget allows (up to 4 pieces per fetch worker): while the
        # network is faster than quantizing, or uploads lag, fetched pieces queue up instead of
        # the download stalling.
        depth = max(4 * self.fetch_workers, 8)

        def admit(block: bool) -> bool:
            piece = queue[0]
            need = piece.cost + (self._writer_cost(piece.job) if piece.first else 0)
            if block:
                # Alone, a runner's pieces always fit beside its open shard (see _piece_limit);
                # sharing a budget, it must be able to finish that shard whatever the others hold.
                # (a reservation for a start-up reader shrinks only as pieces are read: never wait on it)
                self.budget.acquire(need, force=(self.shared_budget and bool(writers)) or reserved > 0)
            elif not self.budget.try_acquire(need):
                return False
            queue.popleft()
            if piece.first:
                writers[piece.job.shard] = self._open(piece.job)
            pending.append((piece, pool.submit(self._fetch, piece)))
            return True

        try:
            while queue or pending:
                if self.cancel.is_set():
                    raise Cancelled()
                while queue and len(pending) < depth and admit(block=not pending):
                    pass
                piece, fut = pending.popleft()
                raw = self._wait(fut)
                if reserved:
                    unreserve()
                writer, offsets = writers[piece.job.shard]
                self._quantize(piece, raw, writer, offsets)
                del raw
                self.budget.release(piece.cost)
                if piece.last:
                    closing.append(self._close(piece.job, writer))
                    del writers[piece.job.shard]
            for f in closing:
                self._wait(f)
        except BaseException:
            for _, fut in pending:
                fut.cancel()
            for writer, _ in writers.values():
                writer.discard()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            unreserve(final=True)
            if self._read_streamed:
                # the small files read after the run (tokenizer, config…) are not tensor reads
                self.source.on_bytes = None
        self.stats.seconds = time.monotonic() - t0
        self.stats.stage_seconds = self.progress.stage_seconds()
        self.stats.peak_budget = self.budget.peak
        self.stats.shards = [j.shard for j in self.plan.jobs]
        return self.stats

    def pieces(self, jobs: list[Job]) -> list[Piece]:
        """JOBS cut into the pieces this runner reads and quantizes one at a time."""
        return [p for job in jobs for p in split_job(job, self.plan, self._piece_limit(job))]

    def totals(self, jobs: list[Job]) -> dict[str, int]:
        """The bytes each stage moves to run JOBS: what the progress bars count up to."""
        pieces = self.pieces(jobs)
        return {
            "read": sum(sum(s.size for _, s, _ in _merge(p.inputs)) for p in pieces),
            "quantize": sum(p.bytes_in for p in pieces),
            "upload": sum(j.bytes_out for j in jobs),
        }

    def _piece_limit(self, job: Job) -> int:
        """Working memory per piece: at most a third of the budget, so fetch, quantize and write
        overlap, and never more than what fits beside the job's own buffered output shard."""
        limit = max(min(self.budget.limit // 3, PIECE_BYTES), 1)
        held = self._writer_cost(job)
        if held:
            limit = max(min(limit, self.budget.limit - held), 1)  # held < limit: check_memory
        return limit

    def _writer_cost(self, job: Job) -> int:
        # A Hub sink holds a whole output shard until it is uploaded; a file sink holds nothing.
        return job.bytes_out + 4096 if self.sink is not None and self.sink.buffers_shards else 0

    def _open(self, job: Job) -> tuple[ShardWriter, dict[str, int]]:
        header, offsets = shard_header(job)
        size = len(header) + job.bytes_out
        writer = self.sink.open_shard(job.shard, size)
        writer.write_at(0, header)
        return writer, offsets

    def _close(self, job: Job, writer: ShardWriter) -> Future:
        writer.notes = shard_notes(self.stats, job)
        cost = self._writer_cost(job)
        n = job.bytes_out
        # "upload" counts the job's tensor bytes (bytes_out), the sink reports the shard's file
        # bytes (header included) as they go out: scaled, so a delivered shard adds exactly n
        meter = _ShardMeter(self.progress, n, writer.size)
        writer.on_bytes = meter.add
        fut = writer.close()

        def done(f: Future) -> None:
            self.budget.release(cost)
            if f.exception() is None:
                meter.finish()
                self.stats.bytes_written += n
                self.progress.message(f"wrote {job.shard} ({human_bytes(n)})")

        fut.add_done_callback(done)
        return fut


class _ShardMeter:
    """One shard's "upload" progress: the sink's byte counts (of SIZE file bytes) scaled to the
    job's N bytes, never past N, topped up to exactly N once the shard is delivered."""

    def __init__(self, progress: Progress, n: int, size: int):
        self.progress, self.n, self.size = progress, n, max(size, 1)
        self.sent = 0
        self.reported = 0
        self.lock = threading.Lock()

    def add(self, k: int) -> None:
        """K more of the shard's bytes went out (called from the sink's upload threads)."""
        with self.lock:
            self.sent += k
            self._report(min(self.sent * self.n // self.size, self.n))

    def finish(self) -> None:
        """The shard is delivered: whatever the sink did not report counts now."""
        with self.lock:
            self._report(self.n)

    def _report(self, target: int) -> None:
        if target > self.reported:
            self.progress.advance("upload", target - self.reported)
            self.reported = target


def shard_notes(stats: RunStats, job: Job) -> dict:
    """The notes kept with JOB's shard for a resume (and sent back by a cluster node): the error
    sums of the weights it quantized, and which of them held NaN or Inf (quantized as asked)."""
    mine = {q.tensor: dataclasses.asdict(stats.errors[q.tensor]) for q in job.quantize if q.tensor in stats.errors}
    notes: dict = {"errors": mine} if mine else {}
    nonfinite = [q.tensor for q in job.quantize if q.tensor in stats.nonfinite]
    if nonfinite:
        notes["nonfinite"] = nonfinite
    return notes


def restore_notes(stats: RunStats, notes: dict, *, allow_nonfinite: bool = True) -> None:
    """Add to STATS what NOTES (see `shard_notes`) say of a shard made elsewhere (an earlier run,
    a cluster node), as the run that made it measured; a malformed entry is left out.

    A shard whose weights were quantized with their NaN or Inf is refused (InputError) unless
    ALLOW_NONFINITE: a rerun that refuses such weights must not publish them from an earlier
    run's upload either."""
    bad = [n for n in notes.get("nonfinite") or [] if isinstance(n, str)]
    if bad and not allow_nonfinite:
        module = bad[0][: -len(".weight")] if bad[0].endswith(".weight") else bad[0]
        raise InputError(
            f"tensor {bad[0]} holds NaN or Inf values: an earlier run quantized it as it was "
            "(NaN/Inf weights passed through) and its shard is on the Hub. Fix the checkpoint, or "
            "convert it anyway",
            hints=(Hint("ignore", module), Hint("nonfinite", "passthrough")),
        )
    for tensor, sums in (notes.get("errors") or {}).items():
        try:
            stats.errors[tensor] = ErrorSums(**sums)
        except TypeError:
            continue
    for name in bad:
        if name not in stats.nonfinite:
            stats.nonfinite.append(name)


def suggest_size(n: int) -> str:
    """N bytes rounded up to a max_memory size that parses back to at least N: whole kB below
    10 MB, whole MB above (integers, so no float rounding can make it smaller)."""
    if n < 10_000_000:
        return f"{math.ceil(n / 1000)}kB"
    return f"{math.ceil(n / 1_000_000)}MB"


def _as_bytes(t: torch.Tensor) -> memoryview:
    t = t.contiguous().reshape(-1)
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.view(torch.uint8).numpy())

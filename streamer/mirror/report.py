"""What a mirroring run says at its end: a summary as data (`--json`) or as a table, with the jobs
that share one read of their source (read passes)."""

from __future__ import annotations

from collections.abc import Sequence

from streamer.formats import human_bytes
from streamer.mirror.check import short_sha
from streamer.mirror.runner import JobResult, ReadPass

STATUSES = ("converted", "skipped", "failed", "planned")


def summary(results: list[JobResult], read_passes: Sequence[ReadPass] = (), grouping_note: str | None = None) -> dict:
    """The run as plain data: ok (no job failed), counts per status, every job's result, the read
    passes (jobs converted from one read of their source) and, when jobs are never grouped, why.

    :param results: the jobs' results, in order.
    :param read_passes: the runner's `read_passes`.
    :param grouping_note: the runner's `grouping_note`."""
    counts = {s: sum(r.status == s for r in results) for s in STATUSES}
    out = {
        "ok": all(r.ok for r in results), "counts": counts, "jobs": [r.to_dict() for r in results],
        "read_passes": [p.to_dict() for p in read_passes],
    }  # fmt: skip
    if grouping_note:
        out["grouping_off"] = grouping_note
    return out


def describe_pass(rp: ReadPass, *, dry_run: bool = False) -> str:
    """A read pass in words: which jobs share one read of which source commit.

    :param rp: the read pass.
    :param dry_run: the jobs were only planned (nothing was read yet)."""
    repo, _, commit = rp.source.partition("@")
    where = f"{repo}@{short_sha(commit)}"
    if dry_run:
        return f"one read pass: {where} would be read once for {len(rp.jobs)} jobs ({', '.join(rp.jobs)})"
    read = f", {human_bytes(rp.bytes_read)} read" if rp.bytes_read else ""
    return f"one read pass: {where} read once for {len(rp.jobs)} jobs ({', '.join(rp.jobs)}{read})"


def _one_line(text: str, width: int = 160) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def render_table(
    results: list[JobResult],
    read_passes: Sequence[ReadPass] = (),
    grouping_note: str | None = None,
    *,
    dry_run: bool = False,
) -> str:
    """One line per job (status, source commit, bytes moved, time, commit URL or error), a line per
    read pass (jobs sharing one read of their source) or why jobs are not grouped, then the counts.

    :param results: the jobs' results, in order.
    :param read_passes: the runner's `read_passes`.
    :param grouping_note: the runner's `grouping_note`.
    :param dry_run: the run only planned."""
    header = ("job", "status", "source commit", "read", "written", "time", "commit / error")
    rows = []
    for r in results:
        if r.status == "failed":
            last = f"error: {r.error}"
        elif r.status == "converted":
            last = r.url or ""
        else:
            last = r.reason
        moved = r.status == "converted"
        rows.append((
            r.name, r.status, short_sha(r.source_commit),
            human_bytes(r.bytes_read) if moved else "-",
            human_bytes(r.bytes_written) if moved else "-",
            f"{r.seconds:.1f}s", _one_line(last),
        ))  # fmt: skip
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header) - 1)]
    lines = []
    for row in [header, *rows]:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1])
    lines += [describe_pass(p, dry_run=dry_run) for p in read_passes]
    if grouping_note:
        lines.append(grouping_note)
    counts = summary(results)["counts"]
    parts = [f"{n} {s}" for s, n in counts.items() if n or s != "planned"]
    lines.append(f"{len(results)} job(s): " + ", ".join(parts))
    return "\n".join(lines)

"""What a mirroring run says at its end: a summary as data (`--json`) or as a table."""

from __future__ import annotations

from streamer.formats import human_bytes
from streamer.mirror.check import short_sha
from streamer.mirror.runner import JobResult

STATUSES = ("converted", "skipped", "failed", "planned")


def summary(results: list[JobResult]) -> dict:
    """The run as plain data: ok (no job failed), counts per status, and every job's result.

    :param results: the jobs' results, in order."""
    counts = {s: sum(r.status == s for r in results) for s in STATUSES}
    return {"ok": all(r.ok for r in results), "counts": counts, "jobs": [r.to_dict() for r in results]}


def _one_line(text: str, width: int = 160) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def render_table(results: list[JobResult]) -> str:
    """One line per job (status, source commit, bytes moved, time, commit URL or error), then the
    counts.

    :param results: the jobs' results, in order."""
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
    counts = summary(results)["counts"]
    parts = [f"{n} {s}" for s, n in counts.items() if n or s != "planned"]
    lines.append(f"{len(results)} job(s): " + ", ".join(parts))
    return "\n".join(lines)

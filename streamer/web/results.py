"""What a finished run shows under the progress panel: published, already proposed, or cancelled;
for a run with several schemes, a line for each target (see fanout_html)."""

from __future__ import annotations

import html
from dataclasses import dataclass
from urllib.parse import quote

from streamer.engine.convert import Result
from streamer.formats import human_bytes
from streamer.io.hub_http import hub_endpoint, read_text
from streamer.web.progress import duration
from streamer.web.quality import compare_quality_html, quality_html
from streamer.web.wording import error_box


def _read_card(target: str, revision: str, token) -> str | None:
    """The model card just committed (a few kB, straight into memory), for the preview."""
    try:
        return read_text(target, "README.md", revision=revision, token=token, max_bytes=65536)
    except Exception:  # a preview only: the links below still lead to the card
        return None


def _head(result, target: str, create_pr: bool) -> tuple[str, str | None, str | None]:
    """(the status line's words, the revision published, the vLLM command); the revision and
    command are None when a pull request was asked for and the repo already held this conversion."""
    base = html.escape(f"{hub_endpoint()}/{target}", quote=True)
    url = html.escape(result.url or f"{hub_endpoint()}/{target}", quote=True)
    name = html.escape(target)
    if result.up_to_date:  # a rerun: the repo held this conversion, nothing was converted or committed
        return (f'<b>Already up to date</b>: <a href="{base}">{name}</a> holds exactly this conversion '
                f'(<a href="{url}">commit</a>), so nothing was converted.'), "main", f"vllm serve {target}"  # fmt: skip
    if create_pr and "/discussions/" not in url:
        return (f'<b>Already up to date</b>: <a href="{base}">{name}</a> '
                "holds exactly this conversion, so no pull request was needed."), None, None  # fmt: skip
    if create_pr:
        num = url.rstrip("/").rsplit("/", 1)[-1]
        rev = f"refs/pr/{num}"
        card = f"{base}/blob/{quote(rev, safe='')}/README.md"
        head = (f'<b>Pull request opened</b> on <a href="{base}">{name}</a>: '
                f'<a href="{url}">review and merge it</a> · <a href="{card}">model card</a>')  # fmt: skip
        return head, rev, f"vllm serve {target} --revision {rev}"
    card = f"{base}/blob/main/README.md"
    head = (f'<b>Published</b> to <a href="{base}">{name}</a> · <a href="{card}">model card</a> · '
            f'<a href="{url}">commit</a>')  # fmt: skip
    return head, "main", f"vllm serve {target}"


def _stats(result) -> str:
    stats = result.summary()
    secs = stats.get("seconds")
    return (
        "<p>"
        + f"{human_bytes(stats.get('bytes_in', 0))} read → {human_bytes(stats.get('bytes_out', 0))} written, "
        + f"{stats.get('quantized', 0)} weights quantized with {html.escape(str(stats.get('scheme')))}"
        + (f" in {duration(secs)}" if secs is not None else "")
        + ".</p>"
    )


def _serve(command: str) -> str:
    return f'<p>Serve it with vLLM:</p><pre class="streamer-cmd"><code>{html.escape(command)}</code></pre>'


def _private_note(target: str) -> str:
    return (
        f"<p>{html.escape(target)} is <b>private</b>: only you (and your organization) can see it, and vLLM needs "
        "a token with read access (<code>HF_TOKEN</code>) to download it.</p>"
    )


def _card_preview(target: str, rev: str, token, label: str = "Model card preview") -> str:
    text = _read_card(target, rev, token)
    if not text:
        return ""
    return (f'<details class="streamer-card"><summary>{html.escape(label)}</summary>'
            f"<pre>{html.escape(text)}</pre></details>")  # fmt: skip


def published_html(result, target: str, create_pr: bool, private: bool = False, token=None) -> str:
    """What a run that published shows: links to the repo, commit or pull request and model card,
    what it read and wrote, the vLLM command that serves it, and a preview of its model card.

    result: the engine's Result.
    target: the repo id published to.
    create_pr: the run opened a pull request (or found the repo already up to date).
    private: the repo is private (the note says who can read it).
    token: the visitor's token, to read the card back."""
    head, rev, serve = _head(result, target, create_pr)
    if rev is None:
        return f'<div class="streamer-done">{head}</div>'
    lines = [f'<div class="streamer-done">{head}</div>', *([] if result.up_to_date else [_stats(result)]), _serve(serve)]
    if result.quality is not None:
        lines.append(quality_html(result.quality))
    if private:
        lines.append(_private_note(target))
    card = _card_preview(target, rev, token)
    if card:
        lines.append(card)
    return "\n".join(lines)


@dataclass
class TargetOutcome:
    """What became of one target of a fan-out run, as the result panel tells it."""

    target: str
    scheme: str
    result: Result | None = None  # published (or a pull request opened)
    error: str | None = None  # the sentence saying why it was not
    proposed: str | None = None  # an open pull request already proposing exactly this conversion
    cancelled: bool = False
    removed: bool = False  # cancelled, and the repo the run had created for it is gone again
    private: bool = False

    @property
    def status(self) -> str:
        """published, proposed, cancelled or failed."""
        if self.result is not None:
            return "published"
        if self.proposed:
            return "proposed"
        return "cancelled" if self.cancelled else "failed"


def _target_block(o: TargetOutcome, create_pr: bool) -> tuple[str, str | None]:
    """One target's lines (status, what it wrote, how to serve it) and the revision whose card to preview."""
    label = f"<b>{html.escape(o.scheme)}</b> · "
    rev = None
    if o.result is not None:
        head, rev, serve = _head(o.result, o.target, create_pr)
        parts = [f'<div class="streamer-done">{label}{head}</div>']
        if rev is not None:
            parts += [*([] if o.result.up_to_date else [_stats(o.result)]), _serve(serve)]
        if o.private:
            parts.append(_private_note(o.target))
    elif o.proposed:
        pr = html.escape(o.proposed, quote=True)
        parts = [f'<div class="streamer-done">{label}<b>Already proposed</b>: <a href="{pr}">this pull request</a> '
                 f"on {html.escape(o.target)} holds exactly this conversion, so no new one was opened.</div>"]  # fmt: skip
    elif o.cancelled:
        gone = " It was created for this run and has been removed." if o.removed else ""
        parts = [f'<div class="streamer-cancelled">{label}<b>Cancelled</b>: nothing was committed to '
                 f"{html.escape(o.target)}.{gone}</div>"]  # fmt: skip
    else:
        parts = [error_box(f"{o.scheme} → {o.target} was not published: {o.error}")]
    return (f'<div class="streamer-target" data-target="{html.escape(o.target, quote=True)}" '
            f'data-status="{o.status}">{"".join(parts)}</div>'), rev  # fmt: skip


def fanout_html(outcomes: list[TargetOutcome], create_pr: bool, token=None) -> str:
    """What a run with several schemes shows: a status line per target (published, pull request,
    already proposed, cancelled, or its own error: one failing target hides none of the others),
    the quality of the schemes side by side, and each published model card.

    outcomes: one per target, main target first.
    create_pr: the run opened pull requests.
    token: the visitor's token, to read the cards back."""
    blocks, cards = [], []
    for o in outcomes:
        block, rev = _target_block(o, create_pr)
        blocks.append(block)
        if rev is not None:
            cards.append(_card_preview(o.target, rev, token, f"Model card preview: {o.target}"))
    done = sum(o.result is not None or bool(o.proposed) for o in outcomes)
    head = f"<p><b>{done} of {len(outcomes)} targets published</b> from one read of the source.</p>"
    quality = compare_quality_html([(o.scheme, o.result.quality) for o in outcomes if o.result is not None])
    return "\n".join([head, *blocks, quality, *(c for c in cards if c)])


def proposed_html(pr_url: str, target: str) -> str:
    """What a run shows when an open pull request already proposes exactly this conversion.

    pr_url: that pull request's URL.
    target: the repo id it is on."""
    pr = html.escape(pr_url, quote=True)
    return (
        f'<div class="streamer-done"><b>Already proposed</b>: <a href="{pr}">this pull request</a> on '
        f"{html.escape(target)} holds exactly this conversion (same source commit and settings), "
        "so no new one was opened.</div>"
    )


def cancelled_html(target: str, removed: bool) -> str:
    """What a cancelled run shows: nothing was committed.

    target: the repo id the run was publishing to.
    removed: the run created TARGET and it has been removed again."""
    gone = " It was created for this run and has been removed." if removed else ""
    return (
        f'<div class="streamer-cancelled"><b>Cancelled</b>: nothing was committed to {html.escape(target)}.'
        f"{gone}</div>"
    )

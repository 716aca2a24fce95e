"""What a finished run shows under the progress panel: published, already proposed, or cancelled."""

from __future__ import annotations

import html
from urllib.parse import quote

from streamer.formats import human_bytes
from streamer.io.hub_http import hub_endpoint, read_text
from streamer.web.progress import duration
from streamer.web.quality import quality_html


def _read_card(target: str, revision: str, token) -> str | None:
    """The model card just committed (a few kB, straight into memory), for the preview."""
    try:
        return read_text(target, "README.md", revision=revision, token=token, max_bytes=65536)
    except Exception:  # a preview only: the links below still lead to the card
        return None


def published_html(result, target: str, create_pr: bool, private: bool = False, token=None) -> str:
    """What a run that published shows: links to the repo, commit or pull request and model card,
    what it read and wrote, the vLLM command that serves it, and a preview of its model card.

    result: the engine's Result.
    target: the repo id published to.
    create_pr: the run opened a pull request (or found the repo already up to date).
    private: the repo is private (the note says who can read it).
    token: the visitor's token, to read the card back."""
    base = html.escape(f"{hub_endpoint()}/{target}", quote=True)
    url = html.escape(result.url or f"{hub_endpoint()}/{target}", quote=True)
    name = html.escape(target)
    if create_pr and "/discussions/" not in url:
        return (
            f'<div class="streamer-done"><b>Already up to date</b>: <a href="{base}">{name}</a> '
            "holds exactly this conversion, so no pull request was needed.</div>"
        )
    if create_pr:
        num = url.rstrip("/").rsplit("/", 1)[-1]
        rev = f"refs/pr/{num}"
        card = f"{base}/blob/{quote(rev, safe='')}/README.md"
        head = (f'<b>Pull request opened</b> on <a href="{base}">{name}</a>: '
                f'<a href="{url}">review and merge it</a> · <a href="{card}">model card</a>')  # fmt: skip
        serve = f"vllm serve {target} --revision {rev}"
    else:
        rev = "main"
        card = f"{base}/blob/main/README.md"
        head = (f'<b>Published</b> to <a href="{base}">{name}</a> · <a href="{card}">model card</a> · '
                f'<a href="{url}">commit</a>')  # fmt: skip
        serve = f"vllm serve {target}"
    stats = result.summary()
    secs = stats.get("seconds")
    lines = [
        f'<div class="streamer-done">{head}</div>',
        "<p>"
        + f"{human_bytes(stats.get('bytes_in', 0))} read → {human_bytes(stats.get('bytes_out', 0))} written, "
        + f"{stats.get('quantized', 0)} weights quantized with {html.escape(str(stats.get('scheme')))}"
        + (f" in {duration(secs)}" if secs is not None else "")
        + ".</p>",
        f'<p>Serve it with vLLM:</p><pre class="streamer-cmd"><code>{html.escape(serve)}</code></pre>',
    ]
    if result.quality is not None:
        lines.append(quality_html(result.quality))
    if private:
        lines.append(
            f"<p>{name} is <b>private</b>: only you (and your organization) can see it, and vLLM needs "
            "a token with read access (<code>HF_TOKEN</code>) to download it.</p>"
        )
    text = _read_card(target, rev, token)
    if text:
        lines.append(
            '<details class="streamer-card"><summary>Model card preview</summary>'
            f"<pre>{html.escape(text)}</pre></details>"
        )
    return "\n".join(lines)


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

"""Where a run reads from, as the user names it: a local folder, or a Hub repo `org/name[@revision]`.

The one place that tells the two apart and opens the matching Source; source.py and hub_source.py
each know only their own kind.
"""

from __future__ import annotations

import os
from urllib.parse import unquote, urlsplit

from streamer.errors import Hint, HubError, StreamerError
from streamer.formats import HUB_PREFIX, is_repo_id, is_repo_spec, split_revision
from streamer.io.source import LocalSource, Source


def is_hub_spec(spec: str) -> bool:
    """Whether SPEC (a source or destination as the user wrote it) names a Hub repo.

    `hub://…` always does. Anything that exists on disk or starts with `/`, `.` or `~` is a local
    folder; the rest is a Hub repo when it reads as `org/name[@revision]` (streamer.formats).
    """
    if spec.startswith(HUB_PREFIX):
        return True
    if os.path.exists(spec) or spec.startswith(("/", ".", "~")):
        return False
    return spec == spec.strip() and is_repo_spec(spec)


def open_source(spec: str | os.PathLike, *, token: str | bool | None = None, **hub_options) -> Source:
    """The Source SPEC names: a LocalSource for a folder, else a HubSource for `org/name[@revision]`.

    TOKEN is the Hub token (False: none at all, None: huggingface_hub's default); HUB_OPTIONS go
    to HubSource (endpoint, connections, chunk_bytes). A local folder ignores both.
    """
    spec = os.fspath(spec)
    if not is_hub_spec(spec):
        check_not_url(spec, "source")
        return LocalSource(os.path.expanduser(spec))
    from streamer.io.hub_source import HubSource  # imported lazily: local runs need no HTTP machinery

    check_hub_spec(spec, "source")
    repo_id, revision = split_revision(spec)
    try:
        return HubSource(repo_id, revision=revision, token=token, **hub_options)
    except HubError as e:
        why = read_as_repo(spec)
        if why is None or "not found" not in e.message:  # a gated repo, a network failure: as they are
            raise
        hints = e.hints if Hint("source") in e.hints else (*e.hints, Hint("source"))
        raise HubError(f"{why}: {e.message}", hints=hints) from None


def read_as_repo(spec: str) -> str | None:
    """Why SPEC, which reads as a Hub repo id, may have been meant as a path into a local folder
    (`tiny-llama/q` beside a folder `tiny-llama`), for an error about that repo; else None."""
    if spec.startswith(HUB_PREFIX):
        return None
    first = spec.split("/", 1)[0]
    if not os.path.isdir(first):
        return None
    return f"{spec} is not a folder here ({first} is), so it was read as a Hub repo id"


def check_hub_spec(spec: str, role: str) -> None:
    """Refuse a SPEC written `hub://…` (a ROLE: "source", "destination") whose repo id the Hub
    would not accept (`hub://org/x/y`, `hub://org/x--y`), in streamer's words."""
    if spec.startswith(HUB_PREFIX) and not is_repo_spec(spec[len(HUB_PREFIX) :]):
        repo, _ = split_revision(spec)
        raise StreamerError(
            f"{role} {spec}: {repo!r} is not a Hub repo id (org/name: letters, digits, '-', '_' and '.')",
            hints=(Hint("source" if role == "source" else "target"),),
        )


# The Hub's own pages, whose first path segment is no repo owner
_NOT_OWNERS = frozenset({
    "datasets", "spaces", "settings", "docs", "blog", "papers", "collections", "organizations", "join",
    "login", "pricing", "tasks", "learn", "chat", "new", "search", "notifications", "posts",
})  # fmt: skip


def _is_hub_host(host: str) -> bool:
    """HOST serves the Hub: huggingface.co (hf.co), or the endpoint this process talks to."""
    endpoint = urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or ""
    return host in ("huggingface.co", "www.huggingface.co", "hf.co", endpoint)


def check_not_url(spec: str, role: str) -> None:
    """Refuse a SPEC (a ROLE: "source", "destination" …) that is neither a folder nor a repo id
    but a URL (`hf://org/name`, `https://huggingface.co/org/name/tree/dev`, `s3://…`): taken as
    a folder it would be a typo, or make a folder `hf:`. The message names the repo id to write
    when the URL names a model repo."""
    if "://" not in spec or spec.startswith((HUB_PREFIX, "/", ".", "~")) or os.path.exists(spec):
        return
    url = urlsplit(spec)
    hint = Hint("source" if role == "source" else "target")
    parts = [unquote(p) for p in url.path.split("/") if p]
    if url.scheme == "hf":
        parts = [p for p in (unquote(url.netloc), *parts) if p]
    elif url.scheme not in ("http", "https"):
        what = "give the folder's path" if url.scheme == "file" else "streamer reads Hub repos and local folders"
        raise StreamerError(f"{role} is a URL ({url.scheme}://): {what}", hints=(hint,))
    elif not _is_hub_host(url.hostname or ""):
        raise StreamerError(f"{role} is a URL ({url.hostname}): streamer reads Hub repos and local folders", hints=(hint,))
    if parts[:1] == ["api"]:  # the API's address of the repo: /api/models/org/name
        parts = parts[1:]
    if parts[:1] == ["models"]:
        parts = parts[1:]
    if len(parts) >= 2 and parts[0] not in _NOT_OWNERS and is_repo_id(f"{parts[0]}/{parts[1]}"):
        rev = f"@{parts[3]}" if len(parts) >= 4 and parts[2] in ("tree", "blob", "resolve") else ""
        repo = f"{parts[0]}/{parts[1]}{rev}"
        raise StreamerError(f"{role} is a URL: name the Hub repo as {repo} (or {HUB_PREFIX}{repo})", hints=(hint,))
    raise StreamerError(f"{role} is a URL, not a model repo id (org/name) or a folder", hints=(hint,))

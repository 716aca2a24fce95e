"""Talking to the Hub: the endpoint, the one retry policy, and Hub failures in sentences.

Every Hub call goes through huggingface_hub (HfApi for the API, its shared HTTP session for plain
GETs), so endpoints, auth headers and proxies behave exactly as the rest of the ecosystem, and
every one of them goes through one retry policy (`hub_call`, or `retry_wait` for a loop that
cannot simply call again): a dropped connection, a 5xx or a 429 costs a short wait, never the run.
A failure that persists, or one that is final (404, 401, 403 …), becomes a HubError saying what to
do (`gave_up`, `explain`). `read_text` reads one small file of a repo under that policy.
"""

from __future__ import annotations

import email.utils
import importlib
import logging
import random
import threading
import time
from urllib.parse import quote, urljoin, urlparse

from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

from streamer.errors import Cancelled, HubError, Hint, redact

log = logging.getLogger("streamer")

# Tries per call, the first included. With waits of 0.5, 1, 2, 4, 8, 8, 8 s (jittered) a call gives
# up after about half a minute of a Hub that does not answer: long enough to ride out a blip or a
# rolling restart, short enough that a dead network is reported while the user still watches.
ATTEMPTS = 8
BACKOFF_FIRST = 0.5
BACKOFF_CAP = 8.0
RETRY_AFTER_CAP = 60.0  # a 429's Retry-After is honoured up to this many seconds
RETRY_STATUS = {408, 429, 500, 502, 503, 504}
REDIRECTS = {301, 302, 303, 307, 308}
MAX_REDIRECTS = 5


def _httpx_errors(name: str) -> tuple[type[BaseException], ...]:
    # huggingface_hub 1.x speaks httpx, 2.x httpx2: the error class NAME of whichever is installed
    found = []
    for module in ("httpx2", "httpx"):
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(found)


# A transport error is a network failure (refused, reset, timed out, closed mid-response) ...
NETWORK_ERRORS = (ConnectionError, TimeoutError, *_httpx_errors("TransportError"))
# ... but for a request this side could not even send (a header no HTTP can carry): final.
LOCAL_ERRORS = _httpx_errors("LocalProtocolError")


def hub_endpoint(endpoint: str | None = None) -> str:
    """The Hub's base URL without a trailing slash: ENDPOINT, or HF_ENDPOINT when it is None."""
    return (endpoint or hf_constants.ENDPOINT).rstrip("/")


def resolve_url(endpoint: str | None, repo_id: str, revision: str, path: str) -> str:
    """The URL of file PATH of REPO_ID at REVISION on ENDPOINT (None: HF_ENDPOINT).

    /{repo}/resolve/{rev}/{path}, with the revision and the file name percent-encoded: a name may
    hold '#', '?' or '%', which would otherwise end the path or be decoded."""
    return f"{hub_endpoint(endpoint)}/{repo_id}/resolve/{quote(revision, safe='')}/{quote(path)}"


# --- the retry policy ----------------------------------------------------------------------------


def _chain(e: BaseException):
    """E and what caused it: huggingface_hub wraps some failures (RuntimeError from an upload)."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen and len(seen) < 8:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def classify(e: BaseException) -> tuple[str | None, float | None]:
    """Whether the failure E is worth another try: ("network" | "status" | None, Retry-After seconds).

    "network": the connection failed (refused, reset, timed out); "status": the Hub answered a
    retryable HTTP status (RETRY_STATUS); None: a definitive answer (404, 401, 403, 412 …) or not a
    Hub failure at all."""
    for c in _chain(e):
        if isinstance(c, HfHubHTTPError):
            response = getattr(c, "response", None)
            status = getattr(response, "status_code", None)
            if status in RETRY_STATUS:
                headers = getattr(response, "headers", None) or {}
                value = headers.get("retry-after") if hasattr(headers, "get") else None
                return "status", parse_retry_after(value) if value else None
            return None, None
        if isinstance(c, LOCAL_ERRORS):
            return None, None
        if isinstance(c, NETWORK_ERRORS):
            return "network", None
    return None, None


def parse_retry_after(value: str) -> float:
    """Seconds to wait for the Retry-After header VALUE (seconds or an HTTP date), capped at
    RETRY_AFTER_CAP; 1 s when it cannot be read."""
    try:
        return max(0.0, min(float(value), RETRY_AFTER_CAP))
    except ValueError:
        try:
            parsed = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return 1.0
        return max(0.0, min(parsed.timestamp() - time.time(), RETRY_AFTER_CAP)) if parsed else 1.0


def backoff_delay(attempt: int, retry_after: float | None = None) -> float:
    """Seconds to wait after failed try number ATTEMPT (1-based): exponential, capped, jittered
    (so parallel uploads that failed together do not retry together), never below RETRY_AFTER."""
    delay = min(BACKOFF_FIRST * 2 ** (attempt - 1), BACKOFF_CAP) * (0.5 + random.random() / 2)
    return max(delay, retry_after) if retry_after is not None else delay


def short_error(e: BaseException) -> str:
    """E in one short line for a message: its type and the first line of its text (tokens
    redacted)."""
    text = redact(str(e).strip().splitlines()[0]) if str(e).strip() else ""
    text = text if len(text) <= 160 else text[:157] + "…"
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def gave_up(what: str, e: BaseException, kind: str, tries: int, endpoint: str | None = None) -> HubError:
    """The error for the Hub call WHAT that failed TRIES times in a row, the last time with E, of
    KIND "network" or "status" (see `classify`); ENDPOINT is the Hub's URL (None: HF_ENDPOINT).

    Never includes a token: it is built from exception texts and URLs, and huggingface_hub sends
    tokens only in headers."""
    where = hub_endpoint(endpoint)
    if kind == "network":
        cause = next((c for c in _chain(e) if isinstance(c, NETWORK_ERRORS)), e)
        return HubError(
            f"could not reach the Hub at {where}: {what} failed {tries} times ({short_error(cause)}); "
            "check your network and retry"
        )
    cause = next((c for c in _chain(e) if isinstance(c, HfHubHTTPError)), e)
    status = getattr(getattr(cause, "response", None), "status_code", "?")
    return HubError(
        f"the Hub at {where} answered HTTP {status} to {what} {tries} times in a row; "
        "it is overloaded or rate-limiting this account: wait a few minutes and retry"
    )


def _stopping(what: str) -> Cancelled:
    return Cancelled(f"{what}: stopped because the run is stopping")


def retry_wait(what: str, attempt: int, error: BaseException | str, kind: str = "network",
               retry_after: float | None = None, *, where: str | None = None,
               cancel: threading.Event | None = None) -> None:
    """The retry policy after failed try number ATTEMPT (1-based) of the Hub call WHAT: wait the
    backoff (at least RETRY_AFTER seconds), or raise a HubError when that was the last try.

    ERROR is the failure, and KIND its `classify` kind; ERROR may also be a few words for an
    answer that raised nothing ("HTTP 503", "signed URL expired"). WHERE is the Hub's URL (None:
    HF_ENDPOINT). A set CANCEL raises streamer.errors.Cancelled at once, also in the middle of the
    wait. For loops that cannot simply call again (a range read keeps the bytes that arrived, a
    commit first checks whether it landed); everything else uses `hub_call`."""
    if cancel is not None and cancel.is_set():
        raise _stopping(what)
    said = short_error(error) if isinstance(error, BaseException) else error
    if attempt >= ATTEMPTS:
        if isinstance(error, BaseException):
            raise gave_up(what, error, kind, attempt, where)
        raise HubError(f"giving up after {attempt} tries {what} ({said}); retry later")
    delay = backoff_delay(attempt, retry_after)
    log.debug("%s: %s; try %d of %d in %.1f s", what, said, attempt + 1, ATTEMPTS, delay)
    if cancel is None:
        time.sleep(delay)
    elif cancel.wait(delay):
        raise _stopping(what)


def hub_call(what: str, fn, *args, where: str | None = None, cancel: threading.Event | None = None, **kwargs):
    """FN(*ARGS, **KWARGS) under the retry policy: network errors, 5xx and 429 (after its
    Retry-After) are tried again with capped exponential backoff, at most ATTEMPTS times; any other
    error is raised as it is. WHAT names the call in the sentence raised when it keeps failing
    ("reading acme/x's file list"), WHERE the Hub's URL (default: HF_ENDPOINT). A set CANCEL stops
    the waiting at once (raises streamer.errors.Cancelled).

    Only idempotent calls belong here (reads, create with exist_ok, content-addressed uploads); the
    commit has its own loop (HubSink.commit) that reads the branch before trying again.
    """
    attempt = 0
    while True:
        if cancel is not None and cancel.is_set():
            raise _stopping(what)
        attempt += 1
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            kind, retry_after = classify(e)
            if kind is None:
                raise
            error = e
        retry_wait(what, attempt, error, kind, retry_after, where=where, cancel=cancel)


def hub_get(what: str, url: str, *, token: str | bool | None, endpoint: str | None = None,
            follow_redirects: bool = True, headers: dict | None = None):
    """One GET of URL on huggingface_hub's session under the retry policy; WHAT names it in errors.

    TOKEN goes in the auth header (False: none, None: huggingface_hub's default), with HEADERS
    besides; ENDPOINT is the Hub's URL for messages. Returns the response of the first try that is
    not retryable (a 404 included: the caller decides what it means)."""

    def once():
        r = get_session().get(url, headers={**build_hf_headers(token=token), **(headers or {})},
                              follow_redirects=follow_redirects)  # fmt: skip
        if r.status_code in RETRY_STATUS:
            hf_raise_for_status(r)  # an HfHubHTTPError that hub_call retries
        return r

    return hub_call(what, once, where=endpoint)


def read_text(repo_id: str, path: str, *, revision: str | None = None, token: str | bool | None = None,
              endpoint: str | None = None, max_bytes: int | None = None, missing_repo_ok: bool = True,
              what: str = "repo") -> str | None:
    """The small file PATH of the Hub repo REPO_ID at REVISION (None: main), straight into memory.

    No HF cache and no download: one GET under the retry policy. TOKEN as huggingface_hub takes
    it (False: none, None: its default); ENDPOINT the Hub's URL (None: HF_ENDPOINT); MAX_BYTES,
    when given, reads at most that many bytes (a Range request). A redirect is followed by hand, and
    the token goes only to the host that was asked (a CDN never gets it).

    Returns None when the file is not there. A repo or revision that does not exist counts as "not
    there" with MISSING_REPO_OK, and is a HubError naming the repo as WHAT ("source repo") without
    it. Any other refusal (a rejected token …) is a HubError too."""
    url = resolve_url(endpoint, repo_id, revision or "main", path)
    ranged = {"Range": f"bytes=0-{max_bytes - 1}"} if max_bytes else {}
    label = f"reading {path} of {repo_id}"
    try:
        r = hub_get(label, url, token=token, endpoint=endpoint, follow_redirects=False, headers=ranged)
        for _ in range(MAX_REDIRECTS):
            location = r.headers.get("location") if r.status_code in REDIRECTS else None
            if not location:
                break
            # A renamed repo (same host) keeps the token; a signed CDN URL (another host) never gets it.
            same_host = urlparse(urljoin(url, location)).netloc == urlparse(url).netloc
            url = urljoin(url, location)
            r = hub_get(label, url, token=token if same_host else False, endpoint=endpoint,
                        follow_redirects=False, headers=ranged)  # fmt: skip
    except (HubError, Cancelled):
        raise
    except Exception as e:  # not a network error (those are retried, then explained): a bad URL …
        raise HubError(f"cannot reach the Hub at {hub_endpoint(endpoint)} ({type(e).__name__})", hints=(Hint("retry"),)) from None
    if r.status_code in (200, 206):
        return r.text
    code = r.headers.get("x-error-code")
    if r.status_code == 404 and (missing_repo_ok or code == "EntryNotFound"):
        return None
    if r.status_code == 401 and missing_repo_ok and code == "RepoNotFound":
        return None  # the Hub answers 401 for a missing repo to a visitor without a token
    try:
        hf_raise_for_status(r)
    except HfHubHTTPError as e:
        raise explain(e, repo_id, what=what) from None
    raise HubError(f"unexpected HTTP {r.status_code} {label}")


# --- failures in sentences -----------------------------------------------------------------------


def content_ids(info) -> dict[str, tuple[str | None, str | None]]:
    """path -> (LFS sha256 or None, git blob id) of every file of a model_info(files_metadata=True):
    what the Hub knows each file's content by."""
    ids = {}
    for s in info.siblings or []:
        lfs = getattr(s, "lfs", None)
        sha = (lfs.get("sha256") if isinstance(lfs, dict) else getattr(lfs, "sha256", None)) if lfs else None
        ids[s.rfilename] = (sha, getattr(s, "blob_id", None))
    return ids


def explain(e: Exception, repo_id: str, *, what: str = "repo") -> HubError:
    """The huggingface_hub error E about REPO_ID as a HubError a user can act on; WHAT names the
    repo's role in the message ("source repo", "target repo"). Never includes a token."""
    status = getattr(getattr(e, "response", None), "status_code", None)
    if isinstance(e, GatedRepoError):
        return HubError(
            f"{repo_id} is a gated model and this account has not been granted access: accept its "
            f"terms at https://huggingface.co/{repo_id}, then run again with that account's token"
        )
    if isinstance(e, RevisionNotFoundError):
        return HubError(f"revision not found in {repo_id}", hints=(Hint("revision"),))
    if isinstance(e, RepositoryNotFoundError):
        return HubError(
            f"{what} {repo_id} not found, or it is private and the token does not give access",
            hints=(*((Hint("source"),) if what.startswith("source") else ()), Hint("token")),
        )
    if status == 401:
        return HubError("the Hugging Face token was rejected (invalid or expired)", hints=(Hint("token"),))
    if status == 403:
        return HubError(f"the token has no write access to {repo_id}: use a write token, or a namespace you own")
    server = getattr(e, "server_message", "") or ""
    detail = f": {server}" if server else ""
    return HubError(f"Hub request for {repo_id} failed ({status or type(e).__name__}){detail}")


# --- pull requests: whose are they ----------------------------------------------------------------


def account_name(api) -> str | None:
    """The name of the account API's (an HfApi) token belongs to; None when there is no token, or
    the Hub would not say."""
    try:
        return hub_call("checking the token (whoami)", api.whoami).get("name")
    except (HfHubHTTPError, OSError, ValueError):
        return None


def own_pull_request(api, repo_id: str, ref: str, account: str, branch: str) -> bool:
    """Whether the pull request REF (`refs/pr/N`) of REPO_ID proposes a change to BRANCH and
    ACCOUNT made its newest commit: then its files are what this account proposed there, not
    someone else's that merely look the same, nor a proposal to another branch. False too when
    the Hub would not say."""
    num = ref.rsplit("/", 1)[-1]
    try:
        details = hub_call(f"reading {repo_id}'s pull request #{num}", api.get_discussion_details, repo_id, int(num))
        if details.target_branch != "refs/heads/" + branch.removeprefix("refs/heads/"):
            return False
        commits = hub_call(f"reading {repo_id}'s {ref} history", api.list_repo_commits, repo_id, revision=ref)
    except (HfHubHTTPError, ValueError):
        return False
    return bool(commits) and account in (commits[0].authors or [])


def pr_refs(api, repo_id: str, limit: int = 20) -> list[str]:
    """REPO_ID's pull-request refs (`refs/pr/N`, open, merged or closed), newest first, at most
    LIMIT; none when the repo does not exist."""
    try:
        refs = hub_call(f"listing {repo_id}'s pull requests", api.list_repo_refs, repo_id, include_pull_requests=True)
    except HfHubHTTPError:
        return []  # no target yet
    prs = [r.ref for r in (getattr(refs, "pull_requests", None) or []) if r.ref.startswith("refs/pr/")]

    def num(ref: str) -> int:
        tail = ref.rsplit("/", 1)[-1]
        return int(tail) if tail.isdigit() else -1

    return sorted(prs, key=num, reverse=True)[:limit]

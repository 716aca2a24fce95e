"""streamer as a Hugging Face Space: quantize a Hub model and publish it, for the signed-in user.

Run it on a workstation (the token comes from HF_TOKEN or `hf auth login`):

    python app.py                                   # against huggingface.co
    HF_ENDPOINT=http://127.0.0.1:8765 HF_TOKEN=hf_alice python app.py   # against a localhub

HF_ENDPOINT is read by huggingface_hub when it is imported, so it must be set in the environment
before this module is imported (the commands above do). On a Space (`hf_oauth: true` in
space/README.md) every user signs in with Hugging Face and conversions run with that user's own
token; the Space's own secrets are never used on a user's behalf.

Endpoints (for gradio_client): /whoami, /suggest, /plan, /convert, /cancel.
"""

from __future__ import annotations

import hashlib
import html
import logging
import os
import queue
import re
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from urllib.parse import quote, urljoin, urlparse

import gradio as gr
import pandas as pd
from compressed_tensors.utils.match import match_name
from huggingface_hub import HfApi, get_token
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import build_hf_headers, disable_progress_bars, get_session, hf_raise_for_status

from streamer.engine.convert import convert
from streamer.io.catalog import build_catalog
from streamer.errors import HubError, PlanError, StreamerError
from streamer.io.hub import RETRY_STATUS, HubSource, explain, hub_call
from streamer.engine.pipeline import default_memory_budget
from streamer.engine.plan import INCOMPATIBLE, collapse_names, expand_inputs, human_bytes, plan_summary
from streamer.engine.progress import STAGES, Progress, ProgressEvent
from streamer.quant.schemes import accepted_presets
from streamer.engine.suggest import (
    architecture,
    format_ignore,
    parse_ignore,
    scheme_blurb,
    suggest_ignore,
    suggest_repo_name,
)

log = logging.getLogger("streamer.app")

# On a Space, gradio runs the real OAuth flow; elsewhere there is no sign-in and the token of
# the machine (HF_TOKEN / the login cache) is used, which is what a workstation or localhub wants.
ON_SPACES = bool(os.environ.get("SPACE_ID"))
# A Space that deliberately converts with its own token for everyone (a private Space) says so.
ALLOW_SERVER_TOKEN = os.environ.get("STREAMER_ALLOW_SERVER_TOKEN") == "1"
# gradio's stand-in token when OAuth is mocked off Spaces: worthless, never sent anywhere.
_MOCK_TOKEN = "mock-oauth-token-for-local-dev"

MAX_CONVERSIONS = max(1, int(os.environ.get("STREAMER_MAX_CONVERSIONS", "2")))  # at once, all users
DEFAULT_SCHEME = os.environ.get("STREAMER_DEFAULT_SCHEME", "FP8_DYNAMIC")
CONFIG_MAX_BYTES = 4 << 20  # config.json is a few kB; anything bigger is not a config

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9_.][\w.-]{0,95}$")
_NAME = re.compile(r"^[A-Za-z0-9_][\w.-]{0,95}$")


def endpoint() -> str:
    """The Hub this app talks to: HF_ENDPOINT, as huggingface_hub read it at import."""
    return hf_constants.ENDPOINT.rstrip("/")


# --------------------------------------------------------------------------------------------
# errors a user can act on
# --------------------------------------------------------------------------------------------


class UserError(Exception):
    """A sentence for the user, raised by the app itself (bad input, not signed in …)."""


def for_web(message: str) -> str:
    """Engine messages speak CLI ("--ignore", "HF_TOKEN"); say it in the form's words."""
    sign_in = "sign in with Hugging Face" if ON_SPACES else "set HF_TOKEN or run `hf auth login` where the app runs"
    swaps = [
        ("(pass --token or set HF_TOKEN)", f"({sign_in})"),
        ("pass --token or set HF_TOKEN", sign_in),
        ("check --token / HF_TOKEN", sign_in),
        ("(check --token / HF_TOKEN)", f"({sign_in})"),
        ("ignore this module with --ignore", "add this module to the ignore list"),
        ("ignore it with --ignore", "add it to the ignore list"),
        ("add --ignore", "add to the ignore list"),
        ("with --ignore", "with the ignore list"),
        ("choose another repo or pass --overwrite", "choose another repo name, or open the conversion as a pull request"),
        (" (--ignore each), or pass --skip-incompatible to keep them unquantized automatically",
         ", or tick “Keep weights the scheme cannot serve unquantized”"),
        (" (or --scheme-file for a custom one)", ""),
        ("run again with that account's token", "try again"),
        # engine hints that name a CLI flag or syntax, in the form's words
        (". Pass --force to dequantize and quantize it again anyway", "; pick another scheme"),
        ("check the branch, tag or commit after '@'", "check the branch, tag or commit in “Revision”"),
        (" (pass --public to publish it)", " (this Space keeps such a copy private)"),
        (", or pass --nonfinite passthrough to quantize it anyway", ""),
        ("(or --ignore)", "(or in the ignore list)"),
        ("kept by --skip-incompatible", "kept by “Keep weights the scheme cannot serve unquantized”"),
    ]
    for old, new in swaps:
        message = message.replace(old, new)
    # What the table does not know: a parenthesis or clause that names a command-line option
    # (which the form does not have) is dropped rather than shown as a flag the user cannot pass.
    message = _CLI_PAREN.sub("", message)
    message = _CLI_CLAUSE.sub("", message)
    message = message.replace("--max-memory ", "the memory budget of ")  # the Space sets it itself
    if endpoint() != "https://huggingface.co":
        message = message.replace("https://huggingface.co/", endpoint() + "/")
    return message


_CLI_PAREN = re.compile(r"\s*\([^()]*--[a-z][\w-]*[^()]*\)")
_CLI_CLAUSE = re.compile(r"(?:[,;]\s*(?:or )?(?:pass |use )?|\s+(?:or )?(?:pass|use) )--[a-z][\w-]*[^.;,)\n]*")


def sentence(e: BaseException) -> str:
    """What to tell the user about E. Unexpected errors get a generic sentence (logged here)."""
    if isinstance(e, PlanError):
        return for_web(plan_problems(e.problems))
    if isinstance(e, (StreamerError, UserError)):
        return for_web(str(e))
    if isinstance(e, HfHubHTTPError):
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status in (401, 403):
            return "The Hub refused this with your sign-in (no access, or the token expired): sign in again."
        return f"The Hub could not answer ({status or type(e).__name__}); try again in a moment."
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    log.error("unexpected %s at %s", type(e).__name__, stamp, exc_info=(type(e), e, e.__traceback__))
    return (
        f"Something went wrong on our side ({type(e).__name__}); nothing was published. "
        f"Try again, and if it happens again report it with this time: {stamp}."
    )


def plan_problems(problems: list[str], limit: int = 8) -> str:
    """PlanError's problems grouped by reason: one line per reason, with the tensors it hits."""
    groups: dict[str, list[str]] = {}
    for p in problems:
        name, sep, why = p.partition(": ")
        if not sep or " " in name:
            name, why = "", p
        why = re.sub(r"^weight of shape \[[\d, ]*\]: ", "", why)
        groups.setdefault(why, []).append(name)
    lines = []
    for why, names in list(groups.items())[:limit]:
        names = [n for n in names if n]
        if names:
            shown = collapse_names(names)
            where = ", ".join(shown[:6]) + (f", … ({len(shown) - 6} more)" if len(shown) > 6 else "")
            lines.append(f"- {where}: {why}")
        else:
            lines.append(f"- {why}")
    if len(groups) > limit:
        lines.append(f"- … and {len(groups) - limit} more problems")
    return "This model cannot be converted with these settings:\n" + "\n".join(lines)


def fail(e: BaseException) -> gr.Error:
    return gr.Error(sentence(e), duration=15, title="Cannot do that", print_exception=False)


_URL = re.compile(r"(https?://[^\s<>\"')]+[^\s<>\"').,;:])")


def error_box(message: str) -> str:
    """The one place an error is shown: a single alert in the status line (never gr.Error in the
    page, which stamps a badge on every output and repeats the sentence)."""
    text = _URL.sub(r'<a href="\1" target="_blank" rel="noopener">\1</a>', html.escape(message))
    return f'<div class="streamer-error" role="alert">{"<br>".join(text.split(chr(10)))}</div>'


# --------------------------------------------------------------------------------------------
# who is asking
# --------------------------------------------------------------------------------------------


def resolve_token(oauth_token: gr.OAuthToken | None) -> str | bool | None:
    """The token to send for this visitor: the OAuth one, else (off Spaces) HF_TOKEN / the login
    cache. On a Space a signed-out visitor gets False, never None: huggingface_hub replaces a None
    token with the environment's HF_TOKEN (the Space's own secret), False sends no token at all.
    Every Hub call made for a visitor (config fetch, source, plan, convert) takes this value."""
    token = getattr(oauth_token, "token", None)
    if token and token != _MOCK_TOKEN:
        return token
    if ON_SPACES and not ALLOW_SERVER_TOKEN:
        return False  # never the Space's own token on behalf of an anonymous visitor
    return get_token()


def require_token(oauth_token: gr.OAuthToken | None) -> str:
    token = resolve_token(oauth_token)
    if not token:
        if ON_SPACES:
            raise UserError("Sign in with Hugging Face first (the button at the top of the page).")
        raise UserError("No Hugging Face token here: set HF_TOKEN or run `hf auth login` where the app runs, then reload.")
    return token


@dataclass(frozen=True)
class Account:
    name: str
    orgs: tuple[str, ...]

    @property
    def namespaces(self) -> list[str]:
        return [self.name, *self.orgs]


_WHOAMI_TTL = 300.0
_whoami_cache: dict[str, tuple[float, Account]] = {}  # sha256(token) -> (when, account)
_whoami_lock = threading.Lock()


def whoami(token: str) -> Account:
    """The token's account (cached a few minutes: the Hub rate-limits whoami)."""
    key = hashlib.sha256(token.encode()).hexdigest()
    now = time.monotonic()
    with _whoami_lock:
        hit = _whoami_cache.get(key)
    if hit is not None and now - hit[0] < _WHOAMI_TTL:
        return hit[1]
    account = _whoami(token)
    with _whoami_lock:
        if len(_whoami_cache) > 4096:
            _whoami_cache.clear()
        _whoami_cache[key] = (now, account)
    return account


def _whoami(token: str) -> Account:
    try:
        info = hub_call("checking your sign-in (whoami)", HfApi(endpoint=endpoint(), token=token).whoami,
                        where=endpoint())  # fmt: skip
    except HfHubHTTPError as e:
        if getattr(e.response, "status_code", None) == 401:
            raise UserError(
                "Your Hugging Face sign-in was rejected (expired or revoked): sign out and sign in again."
                if ON_SPACES else "The Hugging Face token was rejected (invalid or expired): set a valid HF_TOKEN."
            ) from None
        raise explain(e, "your account") from None
    orgs = tuple(o.get("name") for o in info.get("orgs") or [] if isinstance(o, dict) and o.get("name"))
    return Account(str(info.get("name")), orgs)


# --------------------------------------------------------------------------------------------
# one conversion per user, cancellable
# --------------------------------------------------------------------------------------------


@dataclass
class Active:
    target: str
    cancel: threading.Event = field(default_factory=threading.Event)
    started: float = field(default_factory=time.monotonic)


_active: dict[str, Active] = {}
_active_lock = threading.Lock()


def _claim(user: str, target: str) -> Active:
    with _active_lock:
        running = _active.get(user)
        if running is not None:
            raise UserError(
                f"You already have a conversion running (to {running.target}). Wait for it to finish "
                "or cancel it before starting another one."
            )
        slot = _active[user] = Active(target)
        return slot


def _release(user: str, slot: Active) -> None:
    with _active_lock:
        if _active.get(user) is slot:
            del _active[user]


# --------------------------------------------------------------------------------------------
# form values
# --------------------------------------------------------------------------------------------


def parse_source(source: str, revision: str | None) -> tuple[str, str | None]:
    source = (source or "").strip().removeprefix(endpoint() + "/").removeprefix("https://huggingface.co/")
    repo, _, inline_rev = source.partition("@")
    revision = (revision or "").strip() or inline_rev.strip() or None
    if not repo:
        raise UserError("Enter the source model's repo id, like meta-llama/Llama-3.1-8B-Instruct.")
    if not _REPO_ID.match(repo):
        raise UserError(f"“{repo}” is not a Hub repo id: use the form owner/name, like meta-llama/Llama-3.1-8B-Instruct.")
    if revision is not None and (len(revision) > 200 or any(c.isspace() for c in revision) or ".." in revision):
        raise UserError(f"“{revision}” is not a valid revision: give a branch, tag or commit sha.")
    return repo, revision


def target_of(namespace: str, repo_name: str, account: Account, default_name: str) -> str:
    namespace = (namespace or "").strip() or account.name
    repo_name = (repo_name or "").strip() or default_name
    if not _NAME.match(repo_name) or repo_name.endswith((".git", ".")) or "--" in repo_name:
        raise UserError(
            f"“{repo_name}” cannot be a repo name: use letters, digits, '-', '_' and '.', at most 96 characters."
        )
    if namespace not in account.namespaces:
        raise UserError(
            f"{account.name} cannot write to the namespace “{namespace}”: choose your own name "
            f"or one of your organizations ({', '.join(account.namespaces)})."
        )
    return f"{namespace}/{repo_name}"


def _spec(repo: str, revision: str | None) -> str:
    # "hub://" makes it a Hub repo id whatever exists on this machine's disk: a visitor never
    # gets to read the server's folders.
    return f"hub://{repo}" + (f"@{revision}" if revision else "")


def _scheme(scheme: str) -> str:
    scheme = (scheme or "").strip().upper()
    if scheme not in accepted_presets():
        raise UserError(f"Unknown scheme “{scheme}”: pick one from the list ({', '.join(accepted_presets())}).")
    return scheme


# --------------------------------------------------------------------------------------------
# suggestions: config.json (one small read), then the tensor headers
# --------------------------------------------------------------------------------------------


def fetch_config(repo: str, revision: str | None, token: str | bool | None) -> dict | None:
    """The source's config.json, in one small HTTP read; None when the repo has none.

    TOKEN False reads anonymously (see resolve_token). Under streamer's Hub retry policy: a
    dropped connection, 5xx or 429 is tried again before the visitor hears about it."""
    url = f"{endpoint()}/{repo}/resolve/{quote(revision or 'main', safe='')}/config.json"
    ranged = {"Range": f"bytes=0-{CONFIG_MAX_BYTES - 1}"}

    def once():
        r = get_session().get(url, headers={**build_hf_headers(token=token), **ranged}, follow_redirects=False)
        if r.status_code in (301, 302, 303, 307, 308) and r.headers.get("location"):
            # a renamed repo (same host) keeps the token; a CDN (another host) never gets it
            where = urljoin(url, r.headers["location"])
            same_host = urlparse(where).netloc == urlparse(url).netloc
            headers = {**build_hf_headers(token=token), **ranged} if same_host else ranged
            r = get_session().get(where, headers=headers, follow_redirects=False)
        if r.status_code in RETRY_STATUS:
            hf_raise_for_status(r)  # retried by hub_call
        return r

    try:
        r = hub_call(f"reading {repo}'s config.json", once, where=endpoint())
    except StreamerError:
        raise
    except Exception as e:  # not a network error (those are retried, then explained): a bad URL …
        raise HubError(f"cannot reach the Hub at {endpoint()} ({type(e).__name__}); try again in a moment") from None
    if r.status_code == 404 and r.headers.get("x-error-code") == "EntryNotFound":
        return None
    try:
        hf_raise_for_status(r)
    except HfHubHTTPError as e:
        raise explain(e, repo, what="source repo") from None
    try:
        data = r.json()
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _weights(catalog) -> list[tuple[str, tuple[int, ...], str]]:
    inputs, _ = expand_inputs(catalog)
    return [(t.name[: -len(".weight")], t.shape, t.dtype) for t in inputs if t.name.endswith(".weight")]


def _notes_md(arch: str, notes: list[str], extra: str = "") -> str:
    # The list shows what streamer's default policy keeps unquantized anyway (the same policy as
    # the command line's), so that what lands in quantization_config.ignore is in plain sight.
    lines = [
        f"Detected **{html.escape(arch)}**. Kept unquantized by default, whatever the list says "
        "(add entries to keep more):"
    ]
    lines += [f"- {html.escape(n)}" for n in notes]
    if extra:
        lines.append(extra)
    return "\n".join(lines)


def suggest(source: str, revision: str, scheme: str, oauth_token: gr.OAuthToken | None = None):
    """Prefill the ignore list and repo name for this source and scheme (yields twice)."""
    if not (source or "").strip():
        yield gr.update(), "", gr.update()
        return
    try:
        repo, rev = parse_source(source, revision)
        scheme = _scheme(scheme)
        token = resolve_token(oauth_token)
        config = fetch_config(repo, rev, token)
    except Exception as e:
        yield gr.update(), error_box(sentence(e)), gr.update()
        return
    name = suggest_repo_name(repo, scheme)
    quick = suggest_ignore(config)
    yield format_ignore(quick.ignore), _notes_md(architecture(config), [], "_Reading tensor shapes…_"), name
    try:
        with HubSource(repo, revision=rev, token=token) as src:
            catalog = build_catalog(src)
        full = suggest_ignore(catalog.config or config, _weights(catalog), scheme)
    except Exception as e:
        yield format_ignore(quick.ignore), error_box(sentence(e)), name
        return
    yield format_ignore(full.ignore), _notes_md(architecture(catalog.config or config), full.notes), name


def describe_scheme(scheme: str) -> str:
    return f"`{html.escape(scheme or '')}`: {html.escape(scheme_blurb(scheme))}"


# What the form suggests is remembered per browser session (a gr.State):
#   {"key": [repo, revision, scheme] the suggestion was made for,
#    "ignore": the ignore text the app last put in the field, "name": the repo name it last put}.
# A field whose value is no longer what the app put there was edited by the user, and is never
# overwritten; a suggestion runs only when the source, revision or scheme really changed.


def suggest_key(source: str, revision: str, scheme: str) -> list | None:
    try:
        repo, rev = parse_source(source, revision)
    except UserError:
        return None
    return [repo, rev or "", (scheme or "").strip().upper()]


def suggest_ui(source: str, revision: str, scheme: str, memo: dict | None, status: str = "",
               oauth_token: gr.OAuthToken | None = None):  # fmt: skip
    """The page's suggestion step: notes as they come, then the proposal in a State that
    apply_suggestion merges into the fields (reading their values at that moment, not now).

    A problem with the source goes to the status line, the one place errors are shown (a Plan
    right after would say the same thing there again, replacing it rather than adding to it)."""
    key = suggest_key(source, revision, scheme)
    if key is None or key == (memo or {}).get("key"):
        yield gr.update(), None, gr.update()  # nothing really changed: leave the form alone
        return
    last, error = None, None
    for ignore, notes, name in suggest(source, revision, scheme, oauth_token=oauth_token):
        last = (ignore, name)
        if isinstance(notes, str) and "streamer-error" in notes:
            error, notes = notes, ""
        yield notes, gr.update(), gr.update()
    ignore, name = last or (None, None)
    # an error shown by an earlier suggestion is cleared once the source reads fine
    clear = "" if error is None and "streamer-error" in (status or "") else gr.update()
    yield gr.update(), {
        "key": key,
        "ignore": ignore if isinstance(ignore, str) else None,
        "name": name if isinstance(name, str) else None,
    }, error or clear


def apply_suggestion(source: str, revision: str, scheme: str, ignore_now: str, name_now: str,
                     pending: dict | None, memo: dict | None):  # fmt: skip
    """Fill only the fields the user has not edited (empty, or still what the app put there)."""
    memo = dict(memo or {})
    if not pending or pending.get("key") != suggest_key(source, revision, scheme):
        # nothing to apply, or a suggestion for a source/scheme the form no longer shows (two
        # suggestions raced, and this one lost): never let it land over the current one
        return gr.update(), gr.update(), memo
    out = []
    for field_name, now in (("ignore", ignore_now), ("name", name_now)):
        new = pending.get(field_name)
        untouched = not (now or "").strip() or now == memo.get(field_name)
        if new is not None and untouched:
            out.append(new)
            memo[field_name] = new
        else:
            out.append(gr.update())
    memo["key"] = pending["key"]
    return out[0], out[1], memo


# --------------------------------------------------------------------------------------------
# Plan: the dry run, as tables
# --------------------------------------------------------------------------------------------

SHARD_COLUMNS = ["Output shard", "Read", "Written", "Quantized", "Kept as is"]
TENSOR_COLUMNS = ["Tensors", "Count", "Action", "Why"]
FUSED_COLUMNS = ["Fused set (shares one global scale)", "Under", "Count"]
WARNING_COLUMNS = ["Warnings"]


def _why_kept(name: str, ignore: list[str], kept: dict[str, str]) -> str:
    if name in kept:
        return kept[name]
    module, _, param = name.rpartition(".")
    if param != "weight":
        return "not a weight (bias, buffer, scale)"
    if module.endswith("norm"):
        return "normalization layer"
    for entry in ignore:
        if match_name(module, entry):
            return f"ignored ({entry})"
    return "not targeted by the scheme"


def _policy_reasons(plan) -> dict[str, str]:
    """tensor -> why, for the weights the default policy (or the shape rule) kept unquantized."""
    out = {}
    for rule in plan.kept_by_policy:
        why = (
            f"{plan.recipe.name} cannot serve this shape"
            if rule.rule == INCOMPATIBLE
            else f"kept by default ({rule.rule}): {rule.why}"
        )
        out.update({m + ".weight": why for m in rule.modules})
    return out


def plan_tables(plan) -> tuple[str, pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    summary = plan_summary(plan)
    ignore = list(summary["ignore"])
    kept = {k["tensor"]: k["why"] for k in summary["kept"]}
    kept.update(_policy_reasons(plan))
    shards = pd.DataFrame(
        [
            [s["shard"], human_bytes(s["bytes_in"]), human_bytes(s["bytes_out"]), len(s["quantized"]), len(s["passthrough"])]
            for s in summary["shards"]
        ],
        columns=SHARD_COLUMNS,
    )
    quantized = [q for s in summary["shards"] for q in s["quantized"]]
    by_reason: dict[str, list[str]] = {}
    for s in summary["shards"]:
        for name in s["passthrough"]:
            by_reason.setdefault(_why_kept(name, ignore, kept), []).append(name)
    rows = []
    for pattern in collapse_names(quantized):
        rows.append(_tensor_row(pattern, "quantize", summary["scheme"]))
    for why, names in by_reason.items():
        for pattern in collapse_names(names):
            rows.append(_tensor_row(pattern, "keep", why))
    tensors = pd.DataFrame(rows, columns=TENSOR_COLUMNS)
    fused_rows = []
    by_family: dict[str, list[str]] = {}
    for f in summary["fused_sets"]:
        by_family.setdefault(f["family"], []).append(f["parent"])
    for fam, parents in by_family.items():
        for p in collapse_names(parents):
            pat, count = _split_count(p)
            fused_rows.append([fam.replace("+", " + "), pat, count])
    fused = pd.DataFrame(fused_rows, columns=FUSED_COLUMNS)
    warnings = pd.DataFrame([[for_web(w)] for w in summary["warnings"]] or [["none"]], columns=WARNING_COLUMNS)
    ratio = summary["bytes_in"] / summary["bytes_out"] if summary["bytes_out"] else 0
    overview = (
        f"**{html.escape(summary['source'])}** with **{summary['scheme']}**: "
        f"{summary['quantized']} weights quantized, "
        f"{sum(len(s['passthrough']) for s in summary['shards'])} tensors kept as they are, "
        f"{len(summary['shards'])} output shard(s). "
        f"**{human_bytes(summary['bytes_in'])} read → {human_bytes(summary['bytes_out'])} written**"
        + (f" ({ratio:.1f}x smaller)" if ratio else "")
        + (f". Fused sets sharing a global scale: {len(summary['fused_sets'])}" if summary["fused_sets"] else "")
        + (
            ". Kept unquantized beyond the ignore list: "
            + ", ".join(f"{r['rule']} ({r['count']})" for r in summary["kept_by_policy"])
            if summary["kept_by_policy"]
            else ""
        )
        + (f". Source is already quantized: {html.escape(summary['dequant'])}" if summary.get("dequant") else "")
        + "."
    )
    return overview, shards, tensors, fused, warnings


def _split_count(pattern: str) -> tuple[str, int]:
    m = re.match(r"^(.*?)\s+\((\d+)\)$", pattern)
    return (m.group(1), int(m.group(2))) if m else (pattern, 1)


def _tensor_row(pattern: str, action: str, why: str) -> list:
    pat, count = _split_count(pattern)
    return [pat, count, action, why]


def _empty_tables():
    return (
        pd.DataFrame([], columns=SHARD_COLUMNS),
        pd.DataFrame([], columns=TENSOR_COLUMNS),
        pd.DataFrame([], columns=FUSED_COLUMNS),
        pd.DataFrame([], columns=WARNING_COLUMNS),
    )


def _target_note(api: HfApi, target: str, create_pr: bool, private: bool) -> str:
    try:
        api.model_info(target)
    except HfHubHTTPError:
        return f"Target **{html.escape(target)}** will be created ({'private' if private else 'public'})."
    if create_pr:
        return f"Target **{html.escape(target)}** exists: the conversion will be opened as a pull request."
    return (
        f"Target **{html.escape(target)}** exists: it must be empty or hold an earlier streamer conversion, "
        "which one new commit replaces (or open the conversion as a pull request)."
    )


def _plan(source, revision, scheme, ignore, namespace, repo_name, private, create_pr, skip_incompatible, oauth_token):
    """The dry run's outputs as they come; returns the error sentence when it failed (else None).

    A signed-out visitor may plan a public model (anonymous reads); converting needs sign-in."""
    yield "Planning: reading the source's headers…", "", *_empty_tables()
    try:
        token = resolve_token(oauth_token)
        account = whoami(token) if token else None
        repo, rev = parse_source(source, revision)
        scheme = _scheme(scheme)
        target = None
        if account is not None:
            target = target_of(namespace, repo_name, account, suggest_repo_name(repo, scheme))
            if target == repo:
                raise UserError("The target repo is the source repo: choose another name.")
        result = convert(_spec(repo, rev), None, scheme=scheme, ignore=parse_ignore(ignore),
                         token=token, dry_run=True, device="cpu",
                         skip_incompatible=bool(skip_incompatible))  # fmt: skip
        overview, *tables = plan_tables(result.plan)
        if target is not None:
            overview += "\n\n" + _target_note(HfApi(endpoint=endpoint(), token=token), target, create_pr, private)
        else:
            overview += "\n\n" + (
                "**Sign in with Hugging Face to convert it**: the result is published under your account."
                if ON_SPACES else "Set HF_TOKEN or run `hf auth login` where the app runs to convert it."
            )
    except Exception as e:
        message = sentence(e)
        yield error_box(message), "", *_empty_tables()
        return message
    yield "", overview, *tables
    return None


def plan(
    source: str,
    revision: str,
    scheme: str,
    ignore: str,
    namespace: str,
    repo_name: str,
    private: bool,
    create_pr: bool,
    skip_incompatible: bool = False,
    oauth_token: gr.OAuthToken | None = None,
):
    """Dry run: what would be quantized, kept and written. Reads tensor headers only.
    (The API endpoint: a failure is also raised, so that gradio_client callers get an error.)"""
    message = yield from _plan(source, revision, scheme, ignore, namespace, repo_name, private, create_pr,
                               skip_incompatible, oauth_token)  # fmt: skip
    if message:
        raise gr.Error(message, duration=15, title="Cannot plan this conversion", print_exception=False)


def plan_ui(
    source: str,
    revision: str,
    scheme: str,
    ignore: str,
    namespace: str,
    repo_name: str,
    private: bool,
    create_pr: bool,
    skip_incompatible: bool = False,
    oauth_token: gr.OAuthToken | None = None,
):
    """The page's Plan button: an error is shown once, in the status line, and not raised."""
    yield from _plan(source, revision, scheme, ignore, namespace, repo_name, private, create_pr,
                     skip_incompatible, oauth_token)  # fmt: skip


# --------------------------------------------------------------------------------------------
# Convert: a worker thread runs the engine, this generator turns its events into UI updates
# --------------------------------------------------------------------------------------------

STAGE_LABELS = {"read": "Read", "quantize": "Quantized", "upload": "Uploaded"}


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    if seconds < 1:
        return "<1 s"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


RUNNING = ("Starting", "Converting")


class RateWindow:
    """Per-stage rates over the last WINDOW seconds, from samples taken at each page refresh.

    A rate from the first burst (one piece landing at once) read 49–92 MB/s on a 12 MB/s link; a
    window of several seconds, shown only once it spans MIN_SPAN, follows what the link does, and
    decays when a transfer stalls instead of keeping an old average."""

    WINDOW = 10.0
    MIN_SPAN = 2.0

    def __init__(self):
        self.samples: dict[str, deque] = {}

    def add(self, now: float, stages: dict[str, ProgressEvent]) -> None:
        for stage, ev in stages.items():
            q = self.samples.setdefault(stage, deque())
            q.append((now, ev.done))
            while len(q) > 2 and now - q[1][0] >= self.WINDOW:
                q.popleft()

    def rates(self, now: float) -> dict[str, float]:
        out = {}
        for stage, q in self.samples.items():
            if q and now - q[0][0] >= self.MIN_SPAN:
                out[stage] = (q[-1][1] - q[0][1]) / (now - q[0][0])
        return out


def progress_html(stages: dict[str, ProgressEvent], elapsed: float, state: str,
                  rates: dict[str, float] | None = None) -> str:  # fmt: skip
    """Three bars (read, quantized, uploaded) with bytes, rate and ETA.

    RATES come from a RateWindow (bytes/s over the last seconds). Rates and ETAs are shown only
    while the run is moving: once it is cancelling, cancelled or failed they would be stale
    promises.
    """
    rows, left = [], []
    live = state in RUNNING
    for stage in STAGES:
        ev = stages.get(stage) or ProgressEvent(stage)
        frac = min(1.0, ev.done / ev.total) if ev.total else 0.0
        nums = f"{human_bytes(ev.done)} / {human_bytes(ev.total)}" if ev.total else "waiting"
        rate = (rates or {}).get(stage, 0.0) if live else 0.0
        if ev.total and ev.done >= ev.total:
            eta = "done"
        elif rate:
            seconds = (ev.total - ev.done) / rate
            left.append(seconds)
            eta = f"ETA {_duration(seconds)}"
        else:
            eta = "ETA –" if live else "–"
            if ev.total:
                left.append(None)  # a stage with no rate yet: no honest overall estimate
        rows.append(
            f'<div class="sp-row" data-stage="{stage}"><span class="sp-label">{STAGE_LABELS[stage]}</span>'
            f'<div class="sp-bar"><div class="sp-fill" style="width:{frac * 100:.1f}%"></div></div>'
            f'<span class="sp-nums">{nums}</span><span class="sp-rate">{human_bytes(rate) + "/s" if rate else "–"}</span>'
            f'<span class="sp-eta">{eta}</span></div>'
        )
    if state == "Idle":
        head = "Idle: nothing is converting. Fill in the form and click <b>Convert and publish</b>."
    elif state == "Queued":
        head = "Queued: waiting for a free conversion slot (your place in the queue is shown on the right)."
    else:
        head = f"{html.escape(state)}{'…' if state == 'Cancelling' else ''} · elapsed {_duration(elapsed)}"
    if state == "Converting" and left and None not in left:
        head += f" · about {_duration(max(left))} left"
    return f'<div class="streamer-progress" data-state="{state}"><div class="sp-head">{head}</div>{"".join(rows)}</div>'


def _read_card(target: str, revision: str, token) -> str | None:
    """The model card just committed (a few kB, straight into memory), for the preview."""
    url = f"{endpoint()}/{target}/resolve/{quote(revision, safe='')}/README.md"
    try:
        r = get_session().get(url, headers={**build_hf_headers(token=token), "Range": "bytes=0-65535"})
    except Exception:  # a preview only: the links below still lead to the card
        return None
    return r.text if r.status_code in (200, 206) else None


def _result_md(result, target: str, create_pr: bool, private: bool = False, token=None) -> str:
    base = html.escape(f"{endpoint()}/{target}", quote=True)
    url = html.escape(result.url or f"{endpoint()}/{target}", quote=True)
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
        + (f" in {_duration(secs)}" if secs is not None else "")
        + ".</p>",
        f'<p>Serve it with vLLM:</p><pre class="streamer-cmd"><code>{html.escape(serve)}</code></pre>',
    ]
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


def _exists(target: str, token) -> bool | None:
    """Does TARGET exist (None: could not tell)."""
    try:
        HfApi(endpoint=endpoint(), token=token).model_info(target)
        return True
    except HfHubHTTPError as e:
        return False if getattr(e.response, "status_code", None) in (401, 404) else None
    except Exception:
        return None


def _existing_pr(repo, rev, target, scheme, ignore_list, skip_incompatible, token) -> str | None:
    """The URL of a pull request on TARGET that already proposes this exact conversion (same
    source commit and settings, as its model card records them), or None. Mirroring uses the
    same check so that it never opens the same PR twice; neither does the form."""
    from streamer.mirror.main import Job, check_job

    job = Job(name="space", source=repo, target=target, scheme=scheme, ignore=tuple(ignore_list), source_revision=rev,
              create_pr=True, skip_incompatible=bool(skip_incompatible))  # fmt: skip
    try:
        check = check_job(job, token=token, endpoint=endpoint())
    except Exception:  # cannot tell: converting again is the safe answer
        return None
    if check.up_to_date and (check.where or "").startswith("refs/pr/"):
        return f"{endpoint()}/{target}/discussions/{check.where.rsplit('/', 1)[-1]}"
    return None


def _convert(source, revision, scheme, ignore, namespace, repo_name, private, create_pr, skip_incompatible,
             oauth_token):  # fmt: skip
    """Quantize the source and publish it; yields (status, progress, log, result) and returns the
    error sentence when it failed (None otherwise). Status is only written at the start and the
    end, so a "Cancelling…" written there by the Cancel button stays until the run has stopped."""
    log_lines: list[str] = []

    def log_text() -> str:
        return "\n".join(log_lines[-400:])

    def say(text: str) -> None:
        log_lines.append(f"{time.strftime('%H:%M:%S')}  {text}")

    t0 = time.monotonic()
    try:
        token = require_token(oauth_token)
        account = whoami(token)
        repo, rev = parse_source(source, revision)
        scheme = _scheme(scheme)
        target = target_of(namespace, repo_name, account, suggest_repo_name(repo, scheme))
        if target == repo:
            raise UserError("The target repo is the source repo: choose another name.")
        ignore_list = parse_ignore(ignore)
        slot = _claim(account.name, target)
    except Exception as e:
        message = sentence(e)
        yield error_box(message), progress_html({}, 0, "Idle"), "", ""
        return message

    events: queue.Queue = queue.Queue()
    outcome: dict = {}
    existed: list[bool | None] = []

    def worker() -> None:
        try:
            existed.append(_exists(target, token))
            if create_pr and existed[0]:
                pr = _existing_pr(repo, rev, target, scheme, ignore_list, skip_incompatible, token)
                if pr:
                    outcome["duplicate_pr"] = pr
                    return
            outcome["result"] = convert(
                _spec(repo, rev), f"hub://{target}", scheme=scheme, ignore=ignore_list, token=token,
                # unticked: as the source (a private or gated source makes a private target)
                private=True if private else None, create_pr=bool(create_pr), device="auto",
                skip_incompatible=bool(skip_incompatible),
                max_memory=max(default_memory_budget() // MAX_CONVERSIONS, 1 << 30),
                progress=Progress(listeners=[events.put]), cancel=slot.cancel,
            )  # fmt: skip
        except KeyboardInterrupt:
            outcome["cancelled"] = True
        except BaseException as e:  # noqa: BLE001 - every failure becomes a sentence
            if slot.cancel.is_set():
                outcome["cancelled"] = True  # a transfer cut short by the cancel, not a failure
            else:
                outcome["error"] = e
        finally:
            _release(account.name, slot)
            events.put(None)

    say(f"{account.name}: {repo}{'@' + rev if rev else ''} → {target} with {scheme}")
    say(f"ignore: {', '.join(ignore_list) or '(nothing)'}")
    thread = threading.Thread(target=worker, name=f"convert-{account.name}", daemon=True)
    stages: dict[str, ProgressEvent] = {}
    window = RateWindow()
    finished = False
    try:
        thread.start()
    except BaseException:
        _release(account.name, slot)
        raise
    try:
        yield "", progress_html(stages, 0, "Starting"), log_text(), ""
        last = 0.0
        while not finished:
            try:
                ev = events.get(timeout=0.25)
            except queue.Empty:
                ev = False
            while ev is not False:
                if ev is None:
                    finished = True
                elif ev.stage == "log":
                    say(for_web(ev.message))  # the engine's notes speak CLI too
                else:
                    stages[ev.stage] = ev
                try:
                    ev = events.get_nowait()
                except queue.Empty:
                    ev = False
            now = time.monotonic()
            if not finished and now - last >= 0.25:
                last = now
                state = "Cancelling" if slot.cancel.is_set() else "Converting"
                window.add(now, stages)
                yield gr.update(), progress_html(stages, now - t0, state, window.rates(now)), log_text(), gr.update()
        thread.join()
    finally:
        if not finished:  # the page went away mid-run: stop the conversion, commit nothing
            slot.cancel.set()

    elapsed = time.monotonic() - t0
    moving = None  # a finished run shows no rates
    if "duplicate_pr" in outcome:
        pr = html.escape(outcome["duplicate_pr"], quote=True)
        say(f"a pull request already proposes this conversion: {outcome['duplicate_pr']}")
        yield "", progress_html(stages, elapsed, "Done", moving), log_text(), (
            f'<div class="streamer-done"><b>Already proposed</b>: <a href="{pr}">this pull request</a> on '
            f"{html.escape(target)} holds exactly this conversion (same source commit and settings), "
            "so no new one was opened.</div>"
        )
        return None
    if "result" in outcome:
        result = outcome["result"]
        is_private = bool(private) or bool(getattr(_info(target, token), "private", False))
        yield "", progress_html(stages, elapsed, "Done", moving), log_text(), _result_md(
            result, target, bool(create_pr), is_private, token
        )
        return None
    created = existed and existed[0] is False and _exists(target, token)
    if outcome.get("cancelled"):
        say("cancelled: nothing was committed")
        gone = " It was created for this run and has been removed." if existed and existed[0] is False else ""
        yield "", progress_html(stages, elapsed, "Cancelled", moving), log_text(), (
            f'<div class="streamer-cancelled"><b>Cancelled</b>: nothing was committed to {html.escape(target)}.'
            f"{gone if not created else ''}</div>"
        )
        return None
    message = sentence(outcome.get("error") or RuntimeError("no result"))
    say("failed: nothing was committed")
    if created:
        # The run created the repo and the failure left it (empty: nothing was committed). Say so
        # plainly, and that a rerun resumes: the shards already uploaded are not sent again.
        message += (
            f"\n\n{target} was created for this run and is still there, empty (nothing was committed). "
            "Convert again with the same settings to resume (shards already uploaded are not sent again), "
            "or delete the repo from its settings page."
        )
    yield error_box(message), progress_html(stages, elapsed, "Failed", moving), log_text(), ""
    return message


def _info(target: str, token):
    try:
        return HfApi(endpoint=endpoint(), token=token).model_info(target)
    except Exception:
        return None


def run_convert(
    source: str,
    revision: str,
    scheme: str,
    ignore: str,
    namespace: str,
    repo_name: str,
    private: bool,
    create_pr: bool,
    skip_incompatible: bool = False,
    oauth_token: gr.OAuthToken | None = None,
):
    """Quantize the source and publish it in one commit; streams progress and a log.
    (The API endpoint: a failure is also raised, so that gradio_client callers get an error.)"""
    message = yield from _convert(source, revision, scheme, ignore, namespace, repo_name, private, create_pr,
                                  skip_incompatible, oauth_token)  # fmt: skip
    if message:
        raise gr.Error(message, duration=15, title="Conversion failed", print_exception=False)


def run_convert_ui(
    source: str,
    revision: str,
    scheme: str,
    ignore: str,
    namespace: str,
    repo_name: str,
    private: bool,
    create_pr: bool,
    skip_incompatible: bool = False,
    oauth_token: gr.OAuthToken | None = None,
):
    """The page's Convert button: the error is shown once (status line), never raised; Cancel is
    clickable only while this run is going."""
    for out in _convert(source, revision, scheme, ignore, namespace, repo_name, private, create_pr,
                        skip_incompatible, oauth_token):  # fmt: skip
        state = re.search(r'data-state="(\w+)"', out[1] if isinstance(out[1], str) else "")
        running = bool(state) and state.group(1) in (*RUNNING, "Cancelling")
        yield *out, gr.update(interactive=running)


def cancel(oauth_token: gr.OAuthToken | None = None) -> str:
    """Stop this user's running conversion; the target is left as it was."""
    try:
        account = whoami(require_token(oauth_token))
    except Exception as e:
        raise fail(e) from None
    return _cancel(account)


def cancel_ui(oauth_token: gr.OAuthToken | None = None) -> str:
    try:
        account = whoami(require_token(oauth_token))
    except Exception as e:
        return error_box(sentence(e))
    return _cancel(account)


def _cancel(account: Account) -> str:
    with _active_lock:
        slot = _active.get(account.name)
    if slot is None:
        return "No conversion of yours is running."
    slot.cancel.set()
    return f"Cancelling the conversion to {html.escape(slot.target)}…"


def on_load(oauth_token: gr.OAuthToken | None = None):
    """Who is signed in, and where they may publish."""
    token = resolve_token(oauth_token)
    if not token:
        msg = ("Sign in with Hugging Face to convert models: they are published under your account."
               if ON_SPACES else "No Hugging Face token found: set HF_TOKEN or run `hf auth login`, then reload.")
        return msg, gr.update(choices=[], value=None)
    try:
        account = whoami(token)
    except Exception as e:
        return error_box(sentence(e)), gr.update(choices=[], value=None)
    how = "" if getattr(oauth_token, "token", None) not in (None, _MOCK_TOKEN) else " (token of this machine)"
    where = "" if endpoint() == "https://huggingface.co" else f" on {endpoint()}"
    orgs = f" · organizations: {', '.join(account.orgs)}" if account.orgs else ""
    return (
        f"Signed in as **{html.escape(account.name)}**{how}{html.escape(where)}{html.escape(orgs)}",
        gr.update(choices=account.namespaces, value=account.namespaces[0]),
    )


def whoami_api(oauth_token: gr.OAuthToken | None = None) -> dict:
    """{"name": ..., "namespaces": [...]} of the caller."""
    try:
        account = whoami(require_token(oauth_token))
    except Exception as e:
        raise fail(e) from None
    return {"name": account.name, "namespaces": account.namespaces}


# --------------------------------------------------------------------------------------------
# the page
# --------------------------------------------------------------------------------------------

# Only the theme's variables (gradio sets them for light and dark): no hard-coded backgrounds or
# text colours, so every box stays readable in both themes. color-mix tints a box with the theme's
# own accent over whatever the page background is.
CSS = """
.streamer-error { background: var(--error-background-fill); border: 1px solid var(--error-border-color);
  color: var(--error-text-color); border-radius: 8px; padding: 10px 14px; white-space: normal; }
.streamer-error a { color: inherit; text-decoration: underline; }
.streamer-done, .streamer-cancelled { border-radius: 8px; padding: 10px 14px; color: var(--body-text-color); }
.streamer-done { background: color-mix(in srgb, var(--color-green-500) 14%, var(--background-fill-primary));
  border: 1px solid color-mix(in srgb, var(--color-green-500) 60%, var(--background-fill-primary)); }
.streamer-cancelled { background: color-mix(in srgb, var(--color-yellow-500) 14%, var(--background-fill-primary));
  border: 1px solid color-mix(in srgb, var(--color-yellow-500) 60%, var(--background-fill-primary)); }
.streamer-done a, .streamer-cancelled a { color: var(--link-text-color); }
.streamer-cmd { background: var(--code-background-fill); color: var(--body-text-color); padding: 8px 12px;
  border-radius: 6px; overflow-x: auto; }
.streamer-card pre { max-height: 24em; overflow: auto; white-space: pre-wrap; background: var(--background-fill-secondary);
  color: var(--body-text-color); padding: 8px 12px; border-radius: 6px; }
.streamer-progress { font-variant-numeric: tabular-nums; color: var(--body-text-color); }
.streamer-progress .sp-head { font-weight: 600; margin-bottom: 6px; }
.streamer-progress .sp-row { display: grid; grid-template-columns: 6.5em 1fr 12em 7em 7em; gap: 10px;
  align-items: center; margin: 4px 0; }
.streamer-progress .sp-bar { height: 12px; background: var(--background-fill-secondary);
  border: 1px solid var(--border-color-primary); border-radius: 6px; overflow: hidden; }
.streamer-progress .sp-fill { height: 100%; background: var(--color-accent); }
.streamer-progress .sp-nums, .streamer-progress .sp-rate, .streamer-progress .sp-eta { font-size: 0.9em; }
/* a phone: label and numbers on one line, the bar under them, rate and ETA on the next */
@media (max-width: 640px) {
  .streamer-progress .sp-row { grid-template-columns: 1fr auto; gap: 2px 8px; margin: 8px 0; }
  .streamer-progress .sp-bar { grid-column: 1 / -1; grid-row: 2; }
  .streamer-progress .sp-label { grid-row: 1; }
  .streamer-progress .sp-nums { grid-row: 1; text-align: right; }
  .streamer-progress .sp-rate { grid-row: 3; }
  .streamer-progress .sp-eta { grid-row: 3; text-align: right; }
}
"""

# The picker, in the order people use the schemes, each labelled with the GPUs that serve it;
# the rarely served ones (integer weights other than 4 and 8 bits, W*A4 …) come last.
SCHEME_GPUS = {
    "FP8_DYNAMIC": "H100, L4, B200 (A100: weight-only)",
    "FP8_BLOCK": "H100, H200, B200",
    "W4A16": "A10G, A100, L4, H100",
    "NVFP4A16": "B200, RTX 50xx (A100/H100: weight-only)",
    "MXFP4A16": "B200, MI350",
    "W8A16": "Ampere and newer",
    "INT8": "T4, A10G, A100, H100, CPU",
    "W8A8": "T4, A10G, A100, H100, CPU",
    "W4A16_ASYM": "Ampere and newer",
    "W4AFP8": "H100, H200",
    "MXFP8A16": "B200, MI350",
    "MXFP8": "B200, MI350",
    "MXFP4": "B200, MI350",
    "MXFP4XFP8": "B200, MI350",
    "MXFP6A16": "MI350",
    "MXFP6A8": "MI350",
}


def scheme_choices() -> list[tuple[str, str]]:
    """(label, value) pairs for the picker; every accepted preset appears exactly once."""
    presets = accepted_presets()
    common = [s for s in SCHEME_GPUS if s in presets]
    rare = [s for s in presets if s not in SCHEME_GPUS]
    return [(f"{s} · {SCHEME_GPUS[s]}", s) for s in common] + [(f"{s} · experimental", s) for s in rare]


INTRO = """# streamer: quantize a Hub model, publish it
Reads the source with HTTP range requests (never downloads it whole), quantizes with a
[compressed-tensors](https://github.com/neuralmagic/compressed-tensors) scheme that
[vLLM](https://docs.vllm.ai) loads, and publishes the result to a new repo **in one commit**.
Data-free schemes only: no calibration data needed."""


def build_demo() -> gr.Blocks:
    choices = scheme_choices()
    values = [v for _, v in choices]
    default_scheme = DEFAULT_SCHEME if DEFAULT_SCHEME in values else values[0]
    default_ignore = format_ignore(suggest_ignore(None).ignore[:2])
    with gr.Blocks(title="streamer: quantize a Hub model") as demo:
        gr.Markdown(INTRO)
        with gr.Row():
            if ON_SPACES:
                gr.LoginButton(scale=0, min_width=260)
            account_md = gr.Markdown("Checking who you are…", elem_id="account")
        with gr.Row():
            source = gr.Textbox(label="Source model (repo id)", placeholder="meta-llama/Llama-3.1-8B-Instruct",
                                elem_id="source", scale=3)  # fmt: skip
            revision = gr.Textbox(label="Revision (optional)", placeholder="main", elem_id="revision", scale=1)
        with gr.Row():
            with gr.Column(scale=1):
                scheme = gr.Dropdown(choices, value=default_scheme, label="Scheme (the GPUs that serve it)",
                                     elem_id="scheme")  # fmt: skip
                scheme_md = gr.Markdown(describe_scheme(default_scheme), elem_id="scheme-blurb")
            with gr.Column(scale=1):
                ignore = gr.Textbox(
                    label="Ignore (kept unquantized): module names or re:PATTERN, one per line",
                    value=default_ignore, lines=5, max_lines=12, elem_id="ignore",
                )  # fmt: skip
                notes_md = gr.Markdown("", elem_id="suggest-notes")
        with gr.Row():
            namespace = gr.Dropdown([], label="Target namespace", allow_custom_value=True, elem_id="namespace", scale=1)
            repo_name = gr.Textbox(label="Target repo name", placeholder="Llama-3.1-8B-Instruct-FP8_DYNAMIC",
                                   elem_id="repo-name", scale=2)  # fmt: skip
            with gr.Column(scale=1, min_width=180):
                private = gr.Checkbox(label="Private repo (always, for a private or gated source)", value=False,
                                      elem_id="private")  # fmt: skip
                create_pr = gr.Checkbox(label="Open as a pull request", value=False, elem_id="create-pr")
                skip_incompatible = gr.Checkbox(label="Keep weights the scheme cannot serve unquantized",
                                                value=False, elem_id="skip-incompatible")  # fmt: skip
        with gr.Row():
            plan_btn = gr.Button("Plan (dry run)", variant="secondary", elem_id="plan-btn")
            convert_btn = gr.Button("Convert and publish", variant="primary", elem_id="convert-btn")
            # nothing to cancel until a conversion of this page runs
            cancel_btn = gr.Button("Cancel", variant="stop", elem_id="cancel-btn", interactive=False)
        status = gr.HTML("", elem_id="status")
        with gr.Tabs(selected="progress") as tabs:
            with gr.Tab("Progress", id="progress", elem_id="progress-tab"):
                progress = gr.HTML(progress_html({}, 0, "Idle"), elem_id="progress")
                result_md = gr.HTML("", elem_id="result")
                log_box = gr.Textbox(label="Log", lines=8, max_lines=16, interactive=False, autoscroll=True,
                                     elem_id="log")  # fmt: skip
            with gr.Tab("Plan", id="plan", elem_id="plan-tab"):
                overview = gr.Markdown("Click **Plan** to see what will be quantized before anything heavy runs.",
                                       elem_id="plan-overview")  # fmt: skip
                shards_df = gr.Dataframe(headers=SHARD_COLUMNS, label="Output shards", interactive=False, elem_id="plan-shards")
                tensors_df = gr.Dataframe(headers=TENSOR_COLUMNS, label="Tensors", interactive=False, wrap=True,
                                          elem_id="plan-tensors")  # fmt: skip
                fused_df = gr.Dataframe(headers=FUSED_COLUMNS, label="Fused sets", interactive=False, elem_id="plan-fused")
                warnings_df = gr.Dataframe(headers=WARNING_COLUMNS, label="Warnings", interactive=False, wrap=True,
                                           elem_id="plan-warnings")  # fmt: skip

        form = [source, revision, scheme, ignore, namespace, repo_name, private, create_pr, skip_incompatible]
        plan_outputs = [status, overview, shards_df, tensors_df, fused_df, warnings_df]
        demo.load(on_load, None, [account_md, namespace], api_name="whoami_ui", api_visibility="private")

        # The API endpoints (gradio_client) raise their error, which a program needs; the page's
        # buttons show it once in the status line instead. The API's scheme is a plain text field,
        # so an unknown scheme gets the app's sentence, not gradio's "not in the list of choices".
        api_scheme = gr.Textbox(visible=False)
        api_form = [source, revision, api_scheme, *form[3:]]
        hidden_json = gr.JSON(visible=False)
        gr.Button(visible=False).click(whoami_api, None, hidden_json, api_name="whoami")
        gr.Button(visible=False).click(suggest, [source, revision, api_scheme], [ignore, notes_md, repo_name],
                                       api_name="suggest", concurrency_limit=8, concurrency_id="suggest")  # fmt: skip
        gr.Button(visible=False).click(plan, api_form, plan_outputs, api_name="plan",
                                       concurrency_limit=4, concurrency_id="plan")  # fmt: skip
        gr.Button(visible=False).click(run_convert, api_form, [status, progress, log_box, result_md], api_name="convert",
                                       concurrency_limit=MAX_CONVERSIONS, concurrency_id="convert")  # fmt: skip
        gr.Button(visible=False).click(cancel, None, status, api_name="cancel", concurrency_limit=None)

        # Suggestions: see suggest_ui / apply_suggestion (they never overwrite an edited field).
        memo = gr.State({"key": None, "ignore": default_ignore, "name": ""})
        pending = gr.State(None)
        for trigger in (source.submit, source.blur, revision.submit, revision.blur):
            trigger(suggest_ui, [source, revision, scheme, memo, status], [notes_md, pending, status], trigger_mode="always_last",
                    concurrency_limit=8, concurrency_id="suggest", show_progress="hidden",
                    api_visibility="private").then(
                apply_suggestion, [source, revision, scheme, ignore, repo_name, pending, memo], [ignore, repo_name, memo], queue=False,
                show_progress="hidden", api_visibility="private")  # fmt: skip
        scheme.change(describe_scheme, scheme, scheme_md, queue=False, api_visibility="private").then(
            suggest_ui, [source, revision, scheme, memo, status], [notes_md, pending, status], trigger_mode="always_last",
            concurrency_limit=8, concurrency_id="suggest", show_progress="hidden", api_visibility="private").then(
            apply_suggestion, [source, revision, scheme, ignore, repo_name, pending, memo], [ignore, repo_name, memo], queue=False,
            show_progress="hidden", api_visibility="private")  # fmt: skip

        plan_btn.click(lambda: gr.Tabs(selected="plan"), None, tabs, queue=False, api_visibility="private")
        plan_btn.click(plan_ui, form, plan_outputs, api_visibility="private", concurrency_limit=4, concurrency_id="plan",
                       show_progress="hidden")  # fmt: skip
        # First (unqueued, at once) the panel says the run is queued and the last run's result
        # and messages go; then the run itself, queued. show_progress on the panel only: while
        # the run waits, gradio shows its place there ("queue: 2/3"), where the user looks.
        convert_btn.click(lambda: (gr.Tabs(selected="progress"), progress_html({}, 0, "Queued"), "", "", ""), None,
                          [tabs, progress, result_md, status, log_box], queue=False, api_visibility="private",
                          show_progress="hidden").then(
            run_convert_ui, form, [status, progress, log_box, result_md, cancel_btn],
            api_visibility="private", concurrency_limit=MAX_CONVERSIONS, concurrency_id="convert",
            show_progress="full", show_progress_on=[progress])  # fmt: skip
        cancel_btn.click(cancel_ui, None, status, api_visibility="private", concurrency_limit=None, queue=True,
                         show_progress="hidden")  # fmt: skip
    return demo


demo = build_demo()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for noisy in ("httpx", "httpx2"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    disable_progress_bars()  # huggingface_hub's tqdm bars belong to a terminal, not a server log
    demo.queue(default_concurrency_limit=MAX_CONVERSIONS, max_size=int(os.environ.get("STREAMER_QUEUE_SIZE", "64")))
    demo.launch(css=CSS, show_error=True, footer_links=["api", "gradio"])


if __name__ == "__main__":
    main()

"""Prefilling the form: the ignore list and repo name a source and scheme suggest.

Two reads: config.json first (one small GET, for a quick answer), then the tensor headers (for the
shapes the scheme cannot serve). The page never overwrites what the user typed: see suggest_ui and
apply_suggestion, and the memo they share.
"""

from __future__ import annotations

import html
import json

import gradio as gr

from streamer.engine.plan import expand_inputs
from streamer.engine.suggest import architecture, format_ignore, scheme_blurb, suggest_ignore, suggest_repo_name
from streamer.io.catalog import build_catalog
from streamer.io.hub_http import read_text
from streamer.io.hub_source import HubSource
from streamer.web import settings
from streamer.web.auth import resolve_token
from streamer.web.forms import (
    check_extra_schemes,
    check_scheme,
    extra_target_name,
    format_extra_names,
    parse_extra_names,
    parse_source,
)
from streamer.web.wording import UserError, error_box, sentence


def fetch_config(repo: str, revision: str | None, token: str | bool | None) -> dict | None:
    """The source's config.json, in one small HTTP read; None when the repo has none (or it is
    not a JSON object).

    Under streamer's Hub retry policy (`read_text`): a dropped connection, 5xx or 429 is tried
    again before the visitor hears about it; a missing repo or revision is a HubError.

    repo: the source repo id.
    revision: a branch, tag or commit (None: main).
    token: the visitor's token; False reads anonymously (see resolve_token)."""
    text = read_text(repo, "config.json", revision=revision, token=token, max_bytes=settings.CONFIG_MAX_BYTES,
                     missing_repo_ok=False, what="source repo")  # fmt: skip
    if text is None:
        return None
    try:
        data = json.loads(text)
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
    """The /suggest endpoint: the ignore list, notes (Markdown) and repo name for this source and
    scheme. Yields twice: a quick answer from config.json, then one from the tensor headers.

    source, revision, scheme: the form's fields.
    oauth_token: what gradio passes for the signed-in visitor (None when signed out)."""
    if not (source or "").strip():
        yield gr.update(), "", gr.update()
        return
    try:
        repo, rev = parse_source(source, revision)
        scheme = check_scheme(scheme)
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
    """One line of Markdown on SCHEME, shown under the picker.

    scheme: a preset name."""
    return f"`{html.escape(scheme or '')}`: {html.escape(scheme_blurb(scheme))}"


# What the form suggests is remembered per browser session (a gr.State):
#   {"key": [repo, revision, scheme] the suggestion was made for,
#    "ignore": the ignore text the app last put in the field, "name": the repo name it last put}.
# A field whose value is no longer what the app put there was edited by the user, and is never
# overwritten; a suggestion runs only when the source, revision or scheme really changed.


def suggest_key(source: str, revision: str, scheme: str) -> list | None:
    """What a suggestion depends on: [repo, revision, scheme], or None for a source that does not parse.

    source, revision, scheme: the form's fields."""
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
    right after would say the same thing there again, replacing it rather than adding to it).

    source, revision, scheme: the form's fields.
    memo: the session's memo (see above).
    status: the status line as it is now.
    oauth_token: what gradio passes for the signed-in visitor (None when signed out)."""
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
    """Fill only the fields the user has not edited (empty, or still what the app put there);
    returns the ignore field, the repo name field and the memo.

    source, revision, scheme: the form's fields now.
    ignore_now, name_now: the ignore and repo name fields now.
    pending: the proposal suggest_ui made (None: nothing to apply).
    memo: the session's memo (see above)."""
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


# The other schemes' repo names ("Also publish as") follow the same rule, line by line: the memo
# of the extra names ({"put": {scheme: name the app last put on its line}, "typed": {scheme:
# name the user typed}}) tells a line the app may rewrite from one the user typed, which stays
# (and comes back if its scheme is picked again after being dropped).


def fill_extra_names(source: str, revision: str, scheme: str, repo_name: str, extra, names_now: str,
                     memo: dict | None):  # fmt: skip
    """The other schemes' repo names field: one `SCHEME: name` line per extra scheme, named after
    the main target's pattern (see forms.extra_target_name), keeping every line the user typed;
    hidden while no extra scheme is picked. Returns (the field's update, the memo).

    source, revision, scheme, repo_name: the form's fields now.
    extra: the "Also publish as" picker's schemes.
    names_now: the field as it is now.
    memo: the session's memo of this field (see above)."""
    memo = {"put": dict((memo or {}).get("put") or {}), "typed": dict((memo or {}).get("typed") or {})}
    try:
        main = check_scheme(scheme)
        extras = check_extra_schemes(extra, main)
        now = parse_extra_names(names_now)
    except UserError:  # a line the user is still typing, or a picker mid-change: leave it be
        return gr.update(), memo
    base = (repo_name or "").strip()
    if not base:
        key = suggest_key(source, revision, scheme)
        base = suggest_repo_name(key[0], main) if key else ""
    names: dict[str, str] = {}
    for s in extras:
        typed = now.get(s)
        if typed and typed != memo["put"].get(s):
            memo["typed"][s] = typed  # the user's: kept as it is
            names[s] = typed
        elif typed is None and s in memo["typed"]:
            names[s] = memo["typed"][s]  # picked again: the name the user gave it comes back
        else:
            memo["typed"].pop(s, None)
            names[s] = extra_target_name(base, main, s) if base else ""
            memo["put"][s] = names[s]
    return gr.update(value=format_extra_names(names), visible=bool(extras)), memo

"""Plan: the dry run, which reads the tensor headers only and shows what a conversion would do."""

from __future__ import annotations

import html

import gradio as gr
from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError

from streamer.engine.convert import convert
from streamer.engine.suggest import parse_ignore, suggest_repo_name
from streamer.io.hub_http import hub_endpoint
from streamer.web import settings
from streamer.web.auth import resolve_token, whoami
from streamer.web.forms import check_scheme, parse_source, source_spec, target_of
from streamer.web.tables import empty_tables, plan_tables
from streamer.web.wording import UserError, error_box, sentence


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
    yield "Planning: reading the source's headers…", "", *empty_tables()
    try:
        token = resolve_token(oauth_token)
        account = whoami(token) if token else None
        repo, rev = parse_source(source, revision)
        scheme = check_scheme(scheme)
        target = None
        if account is not None:
            target = target_of(namespace, repo_name, account, suggest_repo_name(repo, scheme))
            if target == repo:
                raise UserError("The target repo is the source repo: choose another name.")
        result = convert(source_spec(repo, rev), None, scheme=scheme, ignore=parse_ignore(ignore),
                         token=token, dry_run=True, device="cpu",
                         skip_incompatible=bool(skip_incompatible))  # fmt: skip
        overview, *tables = plan_tables(result.plan)
        if target is not None:
            overview += "\n\n" + _target_note(HfApi(endpoint=hub_endpoint(), token=token), target, create_pr, private)
        else:
            overview += "\n\n" + (
                "**Sign in with Hugging Face to convert it**: the result is published under your account."
                if settings.ON_SPACES else "Set HF_TOKEN or run `hf auth login` where the app runs to convert it."
            )
    except Exception as e:
        message = sentence(e)
        yield error_box(message), "", *empty_tables()
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
    (The API endpoint: a failure is also raised, so that gradio_client callers get an error.)

    source, revision, scheme, ignore, namespace, repo_name, private, create_pr, skip_incompatible:
        the form's fields.
    oauth_token: what gradio passes for the signed-in visitor (None when signed out)."""
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
    """The page's Plan button: an error is shown once, in the status line, and not raised.

    source, revision, scheme, ignore, namespace, repo_name, private, create_pr, skip_incompatible:
        the form's fields.
    oauth_token: what gradio passes for the signed-in visitor (None when signed out)."""
    yield from _plan(source, revision, scheme, ignore, namespace, repo_name, private, create_pr,
                     skip_incompatible, oauth_token)  # fmt: skip

"""Plan: the dry run, which reads the tensor headers only and shows what a conversion would do."""

from __future__ import annotations

import html
import re

import gradio as gr
from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError

from streamer.engine.convert import Target, convert, convert_many
from streamer.engine.suggest import parse_ignore, suggest_repo_name
from streamer.formats import hub_spec
from streamer.io.hub_http import hub_endpoint
from streamer.web import settings
from streamer.web.auth import resolve_token, whoami
from streamer.web.forms import check_extra_schemes, check_scheme, parse_source, source_spec, target_of, targets_of
from streamer.web.tables import empty_tables, plan_tables, stack_tables
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


def _plan(source, revision, scheme, ignore, namespace, repo_name, private, create_pr, skip_incompatible, oauth_token,
          extra_schemes=None, extra_names=""):  # fmt: skip
    """The dry run's outputs as they come; returns the error sentence when it failed (else None).

    A signed-out visitor may plan a public model (anonymous reads); converting needs sign-in.
    With extra schemes ("Also publish as") it plans every target: see _plan_many."""
    yield "Planning: reading the source's headers…", "", *empty_tables()
    try:
        token = resolve_token(oauth_token)
        account = whoami(token) if token else None
        repo, rev = parse_source(source, revision)
        scheme = check_scheme(scheme)
        extra = check_extra_schemes(extra_schemes, scheme)
        if extra:
            targets = (targets_of(namespace, repo_name, account, repo, scheme, extra, extra_names)
                       if account is not None else [(None, s) for s in (scheme, *extra)])  # fmt: skip
            out, message = _plan_many(repo, rev, targets, ignore, private, create_pr, skip_incompatible, token)
            yield ("", *out) if message is None else (error_box(message), "", *empty_tables())
            return message
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
            overview += "\n\n" + _signed_out_note()
    except Exception as e:
        message = sentence(e)
        yield error_box(message), "", *empty_tables()
        return message
    yield "", overview, *tables
    return None


def _signed_out_note() -> str:
    return (
        "**Sign in with Hugging Face to convert it**: the result is published under your account."
        if settings.ON_SPACES else "Set HF_TOKEN or run `hf auth login` where the app runs to convert it."
    )


def _plan_many(repo, rev, targets, ignore, private, create_pr, skip_incompatible, token):
    """A fan-out's dry run: one plan per target, like the command line's (a section of the
    overview each, and the tables of every plan in one, with a Scheme column). A target that
    cannot be planned says why in its own section; the others are planned all the same.
    Returns ((overview, shards, tensors, fused, warnings), None), or (None, the sentence) when no
    target could be planned. TARGETS: (repo id, scheme) pairs, repo id None when signed out."""
    spec, ignore_list = source_spec(repo, rev), parse_ignore(ignore)
    common = dict(ignore=ignore_list, token=token, dry_run=True, device="cpu", skip_incompatible=bool(skip_incompatible))
    outcomes: list[tuple[str, object, BaseException | None]] = []  # (scheme, plan, error)
    if targets[0][0] is not None:  # signed in: one read of the headers, every target checked
        many = convert_many(spec, [Target(hub_spec(t), s) for t, s in targets], create_pr=bool(create_pr),
                            private=True if private else None, **common)  # fmt: skip
        outcomes = [(s, t.result.plan if t.result else None, t.error) for (_, s), t in zip(targets, many.targets)]
    else:  # signed out: no target to check, each scheme planned on its own
        for _, s in targets:
            try:
                outcomes.append((s, convert(spec, None, scheme=s, **common).plan, None))
            except Exception as e:  # noqa: BLE001 - this scheme's sentence, in its own section
                outcomes.append((s, None, e))
    api = HfApi(endpoint=hub_endpoint(), token=token)
    sections, planned = [], []
    for (target, s), (_, plan, error) in zip(targets, outcomes):
        head = f"#### {s}" + (f" → {html.escape(target)}" if target else "")
        if error is not None:
            # Markdown: a line after the list of problems would join the last item, so it gets its own paragraph
            why = re.sub(r"\n(?!- )", "\n\n", html.escape(sentence(error)))
            sections.append(f"{head}\n\n**This target cannot be converted**: {why}")
            continue
        overview, *tables = plan_tables(plan)
        planned.append((s, tables))
        if target is not None:
            overview += "\n\n" + _target_note(api, target, create_pr, private)
        sections.append(f"{head}\n\n{overview}")
    if not planned:
        return None, "\n\n".join(f"{s}: {sentence(e)}" for s, _, e in outcomes)
    intro = f"**{len(targets)} targets, one read of the source**: a plan for each below, the tables hold them all."
    if targets[0][0] is None:
        intro += " " + _signed_out_note()
    return (intro + "\n\n" + "\n\n".join(sections), *stack_tables(planned)), None


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
    extra_schemes: list[str] | str | None = None,
    extra_names: str | None = None,
    oauth_token: gr.OAuthToken | None = None,
):
    """Dry run: what would be quantized, kept and written. Reads tensor headers only.
    (The API endpoint: a failure is also raised, so that gradio_client callers get an error.)

    source, revision, scheme, ignore, namespace, repo_name, private, create_pr, skip_incompatible:
        the form's fields.
    extra_schemes, extra_names: "Also publish as" and the other schemes' repo names (a plan each).
    oauth_token: what gradio passes for the signed-in visitor (None when signed out)."""
    message = yield from _plan(source, revision, scheme, ignore, namespace, repo_name, private, create_pr,
                               skip_incompatible, oauth_token, extra_schemes, extra_names)  # fmt: skip
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
    extra_schemes: list[str] | str | None = None,
    extra_names: str | None = None,
    oauth_token: gr.OAuthToken | None = None,
):
    """The page's Plan button: an error is shown once, in the status line, and not raised.

    source, revision, scheme, ignore, namespace, repo_name, private, create_pr, skip_incompatible:
        the form's fields.
    extra_schemes, extra_names: "Also publish as" and the other schemes' repo names (a plan each).
    oauth_token: what gradio passes for the signed-in visitor (None when signed out)."""
    yield from _plan(source, revision, scheme, ignore, namespace, repo_name, private, create_pr,
                     skip_incompatible, oauth_token, extra_schemes, extra_names)  # fmt: skip

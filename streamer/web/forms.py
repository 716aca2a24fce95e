"""The form's fields read and checked: source and revision, scheme, target namespace and name.

Each check raises a UserError that says what to type instead; nothing here talks to the Hub.
"""

from __future__ import annotations

import re

from streamer.formats import is_repo_id, split_revision
from streamer.io.hub_http import hub_endpoint
from streamer.quant.schemes import accepted_presets
from streamer.web.auth import Account
from streamer.web.wording import UserError

_NAME = re.compile(r"^[A-Za-z0-9_][\w.-]{0,95}$")


def parse_source(source: str, revision: str | None) -> tuple[str, str | None]:
    """(repo id, revision or None) from the Source and Revision fields.

    source: a repo id, its Hub URL, or `repo@revision`.
    revision: the Revision field; when given it wins over a revision after '@'."""
    source = (source or "").strip().removeprefix(hub_endpoint() + "/").removeprefix("https://huggingface.co/")
    repo, inline_rev = split_revision(source)
    revision = (revision or "").strip() or (inline_rev or "").strip() or None
    if not repo:
        raise UserError("Enter the source model's repo id, like meta-llama/Llama-3.1-8B-Instruct.")
    if not is_repo_id(repo):
        raise UserError(f"“{repo}” is not a Hub repo id: use the form owner/name, like meta-llama/Llama-3.1-8B-Instruct.")
    if revision is not None and (len(revision) > 200 or any(c.isspace() for c in revision) or ".." in revision):
        raise UserError(f"“{revision}” is not a valid revision: give a branch, tag or commit sha.")
    return repo, revision


def target_of(namespace: str, repo_name: str, account: Account, default_name: str) -> str:
    """The target repo id from the namespace and name fields, checked against ACCOUNT's namespaces.

    namespace: the Target namespace field (empty: the account's own name).
    repo_name: the Target repo name field (empty: DEFAULT_NAME).
    account: the signed-in account.
    default_name: the suggested repo name."""
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


def source_spec(repo: str, revision: str | None) -> str:
    """The engine's source spec for REPO at REVISION: always a Hub repo, never a local folder.

    repo: the repo id (from parse_source).
    revision: a branch, tag or commit, or None for the default branch."""
    # "hub://" makes it a Hub repo id whatever exists on this machine's disk: a visitor never
    # gets to read the server's folders.
    return f"hub://{repo}" + (f"@{revision}" if revision else "")


def check_scheme(scheme: str) -> str:
    """The scheme field as a preset name (upper case); a UserError listing them for another one.

    scheme: what the picker (or an API caller) sent."""
    scheme = (scheme or "").strip().upper()
    if scheme not in accepted_presets():
        raise UserError(f"Unknown scheme “{scheme}”: pick one from the list ({', '.join(accepted_presets())}).")
    return scheme

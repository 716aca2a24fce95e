"""The form's fields read and checked: source and revision, scheme, target namespace and name.

Each check raises a UserError that says what to type instead; nothing here talks to the Hub.
"""

from __future__ import annotations

import re

from streamer.engine.suggest import suggest_repo_name
from streamer.formats import hub_spec, is_repo_id, split_revision
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
    return hub_spec(repo, revision)


def check_scheme(scheme: str) -> str:
    """The scheme field as a preset name (upper case); a UserError listing them for another one.

    scheme: what the picker (or an API caller) sent."""
    scheme = (scheme or "").strip().upper()
    if scheme not in accepted_presets():
        raise UserError(f"Unknown scheme “{scheme}”: pick one from the list ({', '.join(accepted_presets())}).")
    return scheme


def check_extra_schemes(extra, main: str) -> list[str]:
    """The "Also publish as" schemes as preset names, in the order given, without the main
    scheme or repeats (the main scheme is published once); a UserError for an unknown one.

    extra: the picker's list, or an API caller's text (names separated by commas or lines).
    main: the main scheme (from check_scheme)."""
    if isinstance(extra, str):
        extra = re.split(r"[,\s]+", extra)
    out: list[str] = []
    for s in extra or ():
        if (s or "").strip():
            s = check_scheme(s)
            if s != main and s not in out:
                out.append(s)
    return out


def extra_target_name(main_name: str, main_scheme: str, scheme: str) -> str:
    """The repo name suggested for SCHEME beside a main target named MAIN_NAME with MAIN_SCHEME:
    the main name with its scheme swapped for SCHEME (`Llama-FP8_DYNAMIC` -> `Llama-W4A16`,
    whatever case the user wrote it in), or SCHEME appended when the name does not carry it.

    main_name: the main target's repo name (typed or suggested).
    main_scheme, scheme: preset names."""
    main_name = main_name.strip()
    if main_scheme:
        swapped, n = re.subn(re.escape(main_scheme), scheme, main_name, count=1, flags=re.I)
        if n:
            return swapped
    return f"{main_name[: 95 - len(scheme)]}-{scheme}".strip("-.")


_EXTRA_LINE = re.compile(r"^\s*([A-Za-z0-9_]+)\s*[:=]\s*(\S*)\s*$")


def parse_extra_names(text: str) -> dict[str, str]:
    """SCHEME -> repo name from the extra targets' field, one `SCHEME: name` a line (blank lines
    skipped; an empty name means the suggested one); a UserError for a line of another form.

    text: the field as typed."""
    names: dict[str, str] = {}
    for line in (text or "").splitlines():
        if not line.strip():
            continue
        m = _EXTRA_LINE.match(line)
        if not m:
            raise UserError(
                f"“{line.strip()}” in the other schemes' repo names: write one line per scheme, "
                "like W4A16: Llama-3.1-8B-Instruct-W4A16."
            )
        names[m.group(1).upper()] = m.group(2)
    return names


def format_extra_names(names: dict[str, str]) -> str:
    """The extra targets' field for NAMES (scheme -> repo name): one `SCHEME: name` a line.

    names: in the order the lines are shown."""
    return "\n".join(f"{s}: {n}" for s, n in names.items())


def targets_of(namespace: str, repo_name: str, account: Account, repo: str, scheme: str,
               extra: list[str], extra_names: str) -> list[tuple[str, str]]:  # fmt: skip
    """(target repo id, scheme) for every output of the run: the main target first, then one per
    extra scheme, named as its line in EXTRA_NAMES says or as the main name's pattern suggests.
    Refuses a target that is the source, or two targets with one name.

    namespace, repo_name: the main target's fields; every target goes to the same namespace.
    account: the signed-in account.
    repo: the source repo id; scheme: the main scheme.
    extra: the extra schemes (from check_extra_schemes).
    extra_names: the extra targets' field as typed."""
    default = suggest_repo_name(repo, scheme)
    main = target_of(namespace, repo_name, account, default)
    typed = parse_extra_names(extra_names)
    unknown = [s for s in typed if s not in extra]
    if unknown and extra:
        raise UserError(
            f"The other schemes' repo names name {', '.join(unknown)}, which is not among "
            f"“Also publish as” ({', '.join(extra)}): add it there, or remove its line."
        )
    main_name = main.split("/", 1)[1]
    out = [(main, scheme)]
    for s in extra:
        name = typed.get(s) or extra_target_name(main_name, scheme, s)
        out.append((target_of(namespace, name, account, name), s))
    seen: dict[str, str] = {}
    for target, s in out:  # repo ids compared as the Hub does: ignoring case
        if target.lower() == repo.lower():
            raise UserError(f"The target repo of {s} is the source repo: choose another name.")
        if target.lower() in seen:
            raise UserError(f"{seen[target.lower()]} and {s} would both publish to {target}: give each its own repo name.")
        seen[target.lower()] = s
    return out

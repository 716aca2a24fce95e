"""Users, tokens and who may read or write what, with the Hub's rules.

- anyone may read a public repo; a private one only its namespace's user or org members;
- file contents of a gated repo need, on top, a grant (namespace members are always in);
- writing needs a "write" token of the namespace's user or of a member of the org.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from . import errors
from .storage import Repo


@dataclass(frozen=True)
class User:
    name: str
    token: str
    orgs: tuple[str, ...] = field(default=())
    role: str = "write"  # "read" tokens can read private repos of their namespaces but not write

    def member_of(self, namespace: str | None) -> bool:
        return namespace is not None and (namespace == self.name or namespace in self.orgs)

    def to_json(self) -> dict:
        return {"name": self.name, "token": self.token, "orgs": list(self.orgs), "role": self.role}


class Users:
    """Token registry, persisted in users.json so a server restarted on the same root keeps it."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()
        self._by_token: dict[str, User] = {}
        if path.exists():
            for item in json.loads(path.read_text()):
                user = User(item["name"], item["token"], tuple(item.get("orgs", ())), item.get("role", "write"))
                self._by_token[user.token] = user

    def add(self, name: str, token: str, orgs: list[str] | tuple[str, ...] = (), role: str = "write") -> User:
        if role not in ("read", "write"):
            raise ValueError(f"role must be 'read' or 'write', got {role!r}")
        user = User(name, token, tuple(orgs), role)
        with self._lock:
            # Re-adding a user replaces its previous token(s).
            self._by_token = {t: u for t, u in self._by_token.items() if u.name != name}
            self._by_token[token] = user
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            tmp.write_text(json.dumps([u.to_json() for u in self._by_token.values()], indent=1))
            os.replace(tmp, self.path)
        return user

    def by_token(self, token: str) -> User | None:
        return self._by_token.get(token)

    def by_name(self, name: str) -> User | None:
        return next((u for u in self._by_token.values() if u.name == name), None)


def user_from_header(users: Users, authorization: str | None) -> User | None:
    """The caller, or None when anonymous; an unknown token is an error, as on the Hub."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    user = users.by_token(token.strip()) if scheme.lower() == "bearer" else None
    if user is None:
        raise errors.invalid_credentials()
    return user


def can_read(user: User | None, repo: Repo) -> bool:
    return not repo.private or (user is not None and user.member_of(repo.namespace))


def can_write(user: User | None, namespace: str | None) -> bool:
    return user is not None and user.role == "write" and user.member_of(namespace)


def check_read(user: User | None, repo: Repo | None, repo_id: str) -> Repo:
    if repo is None or not can_read(user, repo):
        raise errors.repo_not_found(repo_id, authenticated=user is not None)
    return repo


def can_read_content(user: User | None, repo: Repo) -> bool:
    """Gating protects file contents only: metadata stays visible, as on the Hub."""
    return can_read(user, repo) and (
        not repo.gated or (user is not None and (user.member_of(repo.namespace) or repo.granted(user.name)))
    )


def check_content(user: User | None, repo: Repo) -> None:
    if not can_read_content(user, repo):
        raise errors.gated(repo.repo_id, authenticated=user is not None)


def check_write(user: User | None, repo: Repo) -> None:
    if user is None:
        raise errors.unauthorized("You must be authenticated to write to a repo")
    if not can_write(user, repo.namespace):
        raise errors.forbidden(
            f"You don't have the rights to write to {repo.repo_id}: "
            "pass `create_pr=1` as a query parameter to open a Pull Request instead"
        )

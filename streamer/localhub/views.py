"""The JSON documents the Hub API returns, built from storage objects.

Field names follow the Hub (camelCase, `rfilename`, `oid` meaning the git oid…) because
`huggingface_hub` parses them as-is. Sizes in `siblings` are only present with `blobs=true`,
as on the Hub, so code that forgets `files_metadata=True` fails here as it would there.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from typing import Iterable

import yaml

from . import errors
from .auth import User
from .storage import BlobStore, Commit, FileEntry, Repo

# config.json keys the Hub echoes in model_info["config"].
_CONFIG_KEYS = ("architectures", "model_type", "quantization_config", "tokenizer_config")


class _SmallFileCache:
    """Parsed README front matter / config.json, keyed by blob sha256 (contents never change)."""

    def __init__(self, blobs: BlobStore, capacity: int = 256):
        self.blobs = blobs
        self.capacity = capacity
        self._lock = threading.Lock()
        self._items: OrderedDict[tuple[str, str], object] = OrderedDict()

    def get(self, kind: str, entry: FileEntry | None):
        if entry is None or entry.size > 1024 * 1024:
            return None
        key = (kind, entry.sha256)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        text = self.blobs.read(entry.sha256).decode("utf-8", "replace")
        value = card_data(text) if kind == "card" else _config_subset(text)
        with self._lock:
            self._items[key] = value
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return value


def front_matter(text: str) -> str | None:
    """The YAML block between the leading `---` lines of a model card, if any."""
    text = text.lstrip("\ufeff")
    if not text.startswith("---"):
        return None
    lines = text.splitlines()
    for i, line in enumerate(lines[1:], start=1):
        if line.strip() == "---":
            return "\n".join(lines[1:i])
    return None


def card_data(text: str) -> dict | None:
    block = front_matter(text)
    if block is None:
        return None
    try:
        data = yaml.safe_load(block)
    except (yaml.YAMLError, RecursionError):  # a hostile card must not break the repo's API
        return None
    return data if isinstance(data, dict) else None


def _config_subset(text: str) -> dict | None:
    try:
        config = json.loads(text)
    except (ValueError, RecursionError):  # deeply nested JSON is a repo's problem, not the server's
        return None
    if not isinstance(config, dict):
        return None
    return {k: config[k] for k in _CONFIG_KEYS if k in config}


class Views:
    def __init__(self, blobs: BlobStore):
        self.small = _SmallFileCache(blobs)

    # ----------------------------------------------------------------- repo info
    def repo_info(self, repo: Repo, commit: Commit, *, blobs: bool, expand: list[str] | None) -> dict:
        card = self.small.get("card", commit.files.get("README.md"))
        config = self.small.get("config", commit.files.get("config.json"))
        siblings = []
        for path, entry in sorted(commit.files.items()):
            sibling: dict = {"rfilename": path}
            if blobs:
                sibling |= {"size": entry.size, "blobId": entry.git_oid}
                if entry.lfs:
                    sibling["lfs"] = {"size": entry.size, "sha256": entry.sha256, "pointerSize": entry.pointer_size}
            siblings.append(sibling)
        tags = list(card.get("tags") or []) if card else []
        if card and isinstance(card.get("license"), str):
            tags.append(f"license:{card['license']}")
        author = repo.namespace
        info = {
            "_id": hashlib.sha1(f"{repo.repo_type}/{repo.repo_id}".encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "author": author,
            "sha": commit.sha,
            "lastModified": commit.date,
            "createdAt": repo.created_at,
            "private": repo.private,
            "gated": repo.gated,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": tags,
            "cardData": card,
            "siblings": siblings,
            "spaces": [],
            "usedStorage": sum(e.size for e in commit.files.values()),
        }
        if repo.repo_type == "model":
            info |= {
                "modelId": repo.repo_id,
                "library_name": card.get("library_name") if card else None,
                "pipeline_tag": card.get("pipeline_tag") if card else None,
                "config": config,
            }
        if expand:
            keep = {"_id", "id", *expand}
            info = {k: v for k, v in info.items() if k in keep}
        return info

    # ----------------------------------------------------------------- tree
    @staticmethod
    def file_entry(path: str, entry: FileEntry) -> dict:
        item = {"type": "file", "oid": entry.git_oid, "size": entry.size, "path": path}
        if entry.lfs:
            item["lfs"] = {"oid": entry.sha256, "size": entry.size, "pointerSize": entry.pointer_size}
        return item

    @staticmethod
    def dir_entry(path: str, commit: Commit) -> dict:
        prefix = path + "/"
        listing = "".join(f"{p}\0{e.git_oid}\n" for p, e in sorted(commit.files.items()) if p.startswith(prefix))
        return {"type": "directory", "oid": hashlib.sha1(listing.encode()).hexdigest(), "size": 0, "path": path}

    def tree(self, repo: Repo, commit: Commit, path: str, *, recursive: bool, expand: bool) -> list[dict]:
        path = path.strip("/")
        if path and path not in commit.directories:
            raise errors.entry_not_found(path, commit.sha)
        prefix = f"{path}/" if path else ""

        def wanted(p: str) -> bool:
            return p.startswith(prefix) and (recursive or "/" not in p[len(prefix):])

        dirs = sorted(d for d in commit.directories if wanted(d))
        files = sorted(p for p in commit.files if wanted(p))
        # Folders first, then files, as the Hub lists them.
        items = [self.dir_entry(d, commit) for d in dirs] + [self.file_entry(p, commit.files[p]) for p in files]
        return self._expand(repo, commit, items) if expand else items

    def paths_info(self, repo: Repo, commit: Commit, paths: Iterable[str], *, expand: bool) -> list[dict]:
        items = []
        for path in dict.fromkeys(p.strip("/") for p in paths):
            if path in commit.files:
                items.append(self.file_entry(path, commit.files[path]))
            elif path in commit.directories:
                items.append(self.dir_entry(path, commit))
            # Unknown paths are skipped silently, as on the Hub.
        return self._expand(repo, commit, items) if expand else items

    @staticmethod
    def _expand(repo: Repo, commit: Commit, items: list[dict]) -> list[dict]:
        last = repo.last_commits(commit.sha, [item["path"] for item in items])
        for item in items:
            c = last.get(item["path"])
            if c is not None:
                item["lastCommit"] = {"id": c.sha, "title": c.summary, "date": c.date}
            if item["type"] == "file":
                item["securityFileStatus"] = {"status": "safe", "avScan": {"virusFound": False},
                                              "pickleImportScan": None}
        return items

    # ----------------------------------------------------------------- history
    @staticmethod
    def commit_item(commit: Commit) -> dict:
        authors = [{"user": commit.author, "avatar": None}] if commit.author else []
        return {
            "id": commit.sha,
            "title": commit.summary,
            "message": commit.description,
            "date": commit.date,
            "authors": authors,
            "parents": [commit.parent] if commit.parent else [],
        }

    @staticmethod
    def refs(repo: Repo, include_prs: bool) -> dict:
        def ref(name: str, full: str, sha: str) -> dict:
            return {"name": name, "ref": full, "targetCommit": sha}

        data = {
            "branches": [ref(b, f"refs/heads/{b}", s) for b, s in sorted(repo.refs["heads"].items())],
            "converts": [],
            "tags": [ref(t, f"refs/tags/{t}", s) for t, s in sorted(repo.refs["tags"].items())],
        }
        if include_prs:
            data["pullRequests"] = [
                ref(f"refs/pr/{n}", f"refs/pr/{n}", s) for n, s in sorted(repo.refs["prs"].items(), key=lambda x: int(x[0]))
            ]
        return data

    # ----------------------------------------------------------------- users
    @staticmethod
    def whoami(user: User) -> dict:
        return {
            "type": "user",
            "id": hashlib.sha1(user.name.encode()).hexdigest()[:24],
            "name": user.name,
            "fullname": user.name,
            "email": None,
            "emailVerified": False,
            "canPay": False,
            "isPro": False,
            "periodEnd": None,
            "avatarUrl": "",
            "orgs": [{"type": "org", "name": org, "fullname": org, "roleInOrg": user.role} for org in user.orgs],
            "auth": {
                "type": "access_token",
                "accessToken": {"displayName": "localhub", "role": user.role, "createdAt": "1970-01-01T00:00:00.000Z"},
            },
        }

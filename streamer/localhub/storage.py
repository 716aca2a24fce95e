"""Repos, commits and content-addressed blobs on disk.

Layout under the root folder (one server process per root; it caches metadata in memory):

    users.json                             users, tokens and orgs (see auth.py)
    blobs/ab/cd/abcd…(sha256)              file contents, stored once whatever the number of commits
    tmp/                                   uploads in progress, moved into blobs/ once verified
    models/<namespace>/<name>/repo.json    visibility, gating, granted users, PR counter
    models/<namespace>/<name>/refs.json    {"heads": {branch: sha}, "tags": {...}, "prs": {"1": sha}}
    models/<namespace>/<name>/commits/<sha>.json
                                           parent, message, author, date and the FULL manifest
                                           path -> [sha256, size, lfs, git_oid]
    models/<namespace>/<name>/uploads.txt  sha256 of every LFS/Xet object uploaded to this repo, one a line
    xet/                                   xorbs and the CAS store id (see xet.py)

Each commit carries its whole manifest so reading any revision is one small JSON load, and
since manifests only point at blobs, a commit costs a few hundred bytes per file, never a copy.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Iterable, Mapping

from . import errors

REPO_TYPES = ("model", "dataset", "space")
COPY_CHUNK = 8 * 1024 * 1024
# The Hub stores anything from 10 MB up in LFS whatever its extension.
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_SHA1_RE = re.compile(r"^[0-9a-f]{40}$")
_REPO_ID_RE = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")

# What the Hub writes in the first commit of a new model repo.
DEFAULT_GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in (
        "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gz", "*.h5", "*.joblib", "*.lfs.*",
        "*.mlmodel", "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot", "*.parquet", "*.pb",
        "*.pickle", "*.pkl", "*.pt", "*.pth", "*.rar", "*.safetensors", "saved_model/**/*", "*.tar.*",
        "*.tar", "*.tflite", "*.tgz", "*.wasm", "*.xz", "*.zip", "*.zst", "*tfevents*", "*.gguf",
    )
)


def utc_iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def git_blob_oid(data: bytes) -> str:
    """The git object id of a blob, which the Hub reports as `oid`/`blobId` for regular files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def is_sha256(value: object) -> bool:
    return isinstance(value, str) and bool(_SHA256_RE.match(value))


def validate_repo_id(repo_id: str) -> str:
    if not _REPO_ID_RE.match(repo_id) or ".." in repo_id or repo_id.endswith(".git"):
        raise errors.bad_request(f"Invalid repo id: {repo_id!r}")
    return repo_id


def validate_path(path: str) -> str:
    """Reject paths that could escape the repo or that git would refuse."""
    parts = path.split("/")
    if (
        not path
        or "\0" in path
        or "\\" in path
        or any(part in ("", ".", "..") for part in parts)
        or parts[0] == ".git"
    ):
        raise errors.bad_request(f"Invalid path in repo: {path!r}")
    return path


def lfs_patterns(gitattributes: str) -> list[str]:
    patterns = []
    for line in gitattributes.splitlines():
        fields = line.split()
        if len(fields) >= 2 and not fields[0].startswith("#") and "filter=lfs" in fields[1:]:
            patterns.append(fields[0])
    return patterns


def matches_lfs_pattern(path: str, patterns: Iterable[str]) -> bool:
    name = PurePosixPath(path).name
    for pattern in patterns:
        # gitattributes semantics, close enough: a pattern without a slash matches the base name
        # at any depth; one with a slash matches the whole path ("**" spans folders).
        if "/" in pattern.strip("/"):
            if fnmatch.fnmatchcase(path, pattern.strip("/").replace("**/", "*").replace("**", "*")):
                return True
        elif fnmatch.fnmatchcase(name, pattern):
            return True
    return False


def looks_binary(sample: bytes) -> bool:
    if b"\0" in sample:
        return True
    try:
        sample.decode("utf-8")
    except UnicodeDecodeError as exc:
        # The sample is cut at 512 bytes and may end in the middle of a multi-byte character.
        return exc.start < len(sample) - 3
    return False


def should_use_lfs(path: str, size: int, sample: bytes, patterns: Iterable[str]) -> bool:
    """The Hub's preupload decision: big, binary, or tracked by .gitattributes goes to LFS."""
    if size == 0:
        return False
    return size >= LFS_SIZE_THRESHOLD or path.endswith(".safetensors") or looks_binary(sample) or (
        matches_lfs_pattern(path, patterns)
    )


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    size: int
    lfs: bool
    git_oid: str  # sha1 of the blob for regular files, of the LFS pointer for LFS files

    @classmethod
    def make(cls, sha256: str, size: int, lfs: bool, content: bytes | None = None) -> "FileEntry":
        if lfs:
            git_oid = git_blob_oid(lfs_pointer(sha256, size))
        else:
            assert content is not None, "regular files need their content to compute the git oid"
            git_oid = git_blob_oid(content)
        return cls(sha256, size, lfs, git_oid)

    @property
    def etag(self) -> str:
        """What the Hub puts in (X-Linked-)ETag: sha256 for LFS files, git oid otherwise."""
        return self.sha256 if self.lfs else self.git_oid

    @property
    def pointer_size(self) -> int:
        return len(lfs_pointer(self.sha256, self.size))

    def to_json(self) -> list:
        return [self.sha256, self.size, self.lfs, self.git_oid]

    @classmethod
    def from_json(cls, value: list) -> "FileEntry":
        return cls(value[0], int(value[1]), bool(value[2]), value[3])


@dataclass(frozen=True)
class Commit:
    sha: str
    parent: str | None
    summary: str
    description: str
    author: str | None
    timestamp: float
    files: Mapping[str, FileEntry] = field(repr=False)

    @property
    def date(self) -> str:
        return utc_iso(self.timestamp)

    @property
    def message(self) -> str:
        return f"{self.summary}\n\n{self.description}" if self.description else self.summary

    @cached_property
    def directories(self) -> frozenset[str]:
        dirs = set()
        for path in self.files:
            parent = PurePosixPath(path).parent
            while str(parent) != ".":
                dirs.add(str(parent))
                parent = parent.parent
        return frozenset(dirs)

    def to_json(self) -> dict:
        return {
            "sha": self.sha,
            "parent": self.parent,
            "summary": self.summary,
            "description": self.description,
            "author": self.author,
            "timestamp": self.timestamp,
            "files": {path: entry.to_json() for path, entry in sorted(self.files.items())},
        }

    @classmethod
    def from_json(cls, data: dict) -> "Commit":
        files = {path: FileEntry.from_json(value) for path, value in data["files"].items()}
        return cls(
            data["sha"], data["parent"], data["summary"], data["description"], data["author"],
            data["timestamp"], files,
        )


@dataclass(frozen=True)
class AddFile:
    path: str
    entry: FileEntry


@dataclass(frozen=True)
class DeleteFile:
    path: str


@dataclass(frozen=True)
class DeleteFolder:
    path: str


Operation = AddFile | DeleteFile | DeleteFolder


def _write_json(path: Path, data: object) -> None:
    # Write then rename so that a crash never leaves a truncated commit or ref file behind.
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


class BlobStore:
    def __init__(self, root: Path):
        self.dir = root / "blobs"
        self.tmp_dir = root / "tmp"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        return self.dir / sha256[:2] / sha256[2:4] / sha256

    def size(self, sha256: str) -> int | None:
        if not is_sha256(sha256):  # never build a path from an unchecked string
            return None
        try:
            return self.path(sha256).stat().st_size
        except FileNotFoundError:
            return None

    def has(self, sha256: str, size: int | None = None) -> bool:
        actual = self.size(sha256)
        return actual is not None and (size is None or actual == size)

    def temp_path(self, suffix: str = "") -> Path:
        return self.tmp_dir / f"{uuid.uuid4().hex}{suffix}"

    def adopt(self, tmp: Path, sha256: str) -> Path:
        """Move a verified temp file into the store (a no-op if the content is already there)."""
        target = self.path(sha256)
        if target.exists():
            tmp.unlink(missing_ok=True)
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, target)
        return target

    def put_bytes(self, data: bytes) -> str:
        sha256 = hashlib.sha256(data).hexdigest()
        if not self.has(sha256, len(data)):
            tmp = self.temp_path()
            tmp.write_bytes(data)
            self.adopt(tmp, sha256)
        return sha256

    def put_stream(self, stream: BinaryIO) -> tuple[str, int]:
        """Copy a stream into the store, hashing it in the same pass."""
        tmp = self.temp_path()
        hasher = hashlib.sha256()
        size = 0
        try:
            with open(tmp, "wb") as out:
                while chunk := stream.read(COPY_CHUNK):
                    hasher.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        sha256 = hasher.hexdigest()
        self.adopt(tmp, sha256)
        return sha256, size

    def read(self, sha256: str) -> bytes:
        return self.path(sha256).read_bytes()


class Repo:
    """One repository: metadata, refs and a cache of immutable commits."""

    def __init__(self, storage: "Storage", repo_type: str, repo_id: str, directory: Path):
        self.storage = storage
        self.repo_type = repo_type
        self.repo_id = repo_id
        self.dir = directory
        # One lock per repo: commits on different repos never wait for each other.
        self.lock = threading.RLock()
        self.meta: dict = json.loads((directory / "repo.json").read_text())
        self.refs: dict = json.loads((directory / "refs.json").read_text())
        self._commits: dict[str, Commit] = {}
        self._uploaded: set[str] | None = None
        self._referenced: set[str] | None = None

    # ----------------------------------------------------------------- metadata
    @property
    def namespace(self) -> str | None:
        return self.repo_id.split("/")[0] if "/" in self.repo_id else None

    @property
    def private(self) -> bool:
        return bool(self.meta.get("private"))

    @property
    def gated(self) -> str | bool:
        return self.meta.get("gated") or False

    @property
    def created_at(self) -> str:
        return utc_iso(self.meta["created_at"])

    def granted(self, user: str) -> bool:
        return user in self.meta.get("granted", [])

    def update_meta(self, **changes) -> None:
        with self.lock:
            self.meta.update(changes)
            _write_json(self.dir / "repo.json", self.meta)

    def grant(self, user: str) -> None:
        with self.lock:
            if user not in self.meta.setdefault("granted", []):
                self.update_meta(granted=[*self.meta["granted"], user])

    # ----------------------------------------------------------------- commits
    def get_commit(self, sha: str) -> Commit | None:
        commit = self._commits.get(sha)
        if commit is None:
            path = self.dir / "commits" / f"{sha}.json"
            if not _SHA1_RE.match(sha) or not path.exists():
                return None
            commit = Commit.from_json(json.loads(path.read_text()))
            self._commits[sha] = commit
        return commit

    def _ref_sha(self, revision: str) -> str | None:
        heads, tags, prs = self.refs["heads"], self.refs["tags"], self.refs["prs"]
        if revision in heads:
            return heads[revision]
        if revision.startswith("refs/heads/"):
            return heads.get(revision[len("refs/heads/"):])
        if revision.startswith("refs/pr/"):
            return prs.get(revision[len("refs/pr/"):])
        if revision.startswith("refs/tags/"):
            return tags.get(revision[len("refs/tags/"):])
        if revision in tags:
            return tags[revision]
        return None

    def resolve(self, revision: str) -> Commit:
        sha = self._ref_sha(revision)
        if sha is None and _SHA1_RE.match(revision.lower()):
            sha = revision.lower()
        commit = self.get_commit(sha) if sha else None
        if commit is None:
            raise errors.revision_not_found(revision)
        return commit

    def history(self, revision: str) -> list[Commit]:
        commits = []
        commit: Commit | None = self.resolve(revision)
        while commit is not None:
            commits.append(commit)
            commit = self.get_commit(commit.parent) if commit.parent else None
        return commits

    def last_commits(self, revision: str, paths: Iterable[str]) -> dict[str, Commit]:
        """For each path, the newest commit that changed it (what `expand=True` listings show)."""
        history = self.history(revision)
        wanted = set(paths)
        found: dict[str, Commit] = {}
        for commit, older in zip(history, history[1:] + [None]):
            for path in list(wanted):
                prefix = path + "/"
                here = {p: e for p, e in commit.files.items() if p == path or p.startswith(prefix)}
                before = (
                    {p: e for p, e in older.files.items() if p == path or p.startswith(prefix)} if older else {}
                )
                if here != before:
                    found[path] = commit
                    wanted.discard(path)
            if not wanted:
                break
        return found

    def _write_commit(self, commit: Commit) -> None:
        _write_json(self.dir / "commits" / f"{commit.sha}.json", commit.to_json())
        self._commits[commit.sha] = commit

    def _set_refs(self, refs: dict) -> None:
        _write_json(self.dir / "refs.json", refs)
        self.refs = refs

    def commit(
        self,
        operations: Iterable[Operation],
        *,
        revision: str = "main",
        summary: str,
        description: str = "",
        author: str | None = None,
        parent_commit: str | None = None,
        create_pr: bool = False,
    ) -> tuple[Commit, int | None]:
        """Apply all operations in one new commit and move the ref; all or nothing.

        Returns the commit and, with `create_pr`, the number of the new pull request (its ref is
        `refs/pr/N`). `parent_commit` must prefix the current head (else 412), or, for a pull
        request, names the commit the PR starts from.
        """
        operations = list(operations)
        with self.lock:
            heads = self.refs["heads"]
            pr_num = None
            if create_pr:
                if revision not in heads and not revision.startswith("refs/heads/"):
                    raise errors.revision_not_found(revision)
                base = self.resolve(parent_commit) if parent_commit else self.resolve(revision)
            elif revision.startswith("refs/pr/") or revision in heads or revision.startswith("refs/heads/"):
                base = self.resolve(revision)
                if parent_commit and not base.sha.startswith(parent_commit.lower()):
                    raise errors.precondition_failed(
                        "A commit has happened since. Please refresh and try again. "
                        f"(expected parent {parent_commit}, head is {base.sha})"
                    )
            elif not heads and revision == "main":
                base = None  # the very first commit of a repo created without one
            else:
                raise errors.revision_not_found(revision)

            files = dict(base.files) if base else {}
            for op in operations:
                if isinstance(op, AddFile):
                    files[validate_path(op.path)] = op.entry
                elif isinstance(op, DeleteFile):
                    if op.path not in files:
                        raise errors.entry_not_found(f"A file with this name doesn't exist: {op.path}")
                    del files[op.path]
                elif isinstance(op, DeleteFolder):
                    prefix = op.path.rstrip("/") + "/"
                    doomed = [p for p in files if p.startswith(prefix)]
                    if not doomed:
                        raise errors.entry_not_found(f"A folder with this name doesn't exist: {op.path}")
                    for p in doomed:
                        del files[p]
            for path in files:
                # A path cannot be both a file and a folder (git could not represent it).
                parent = PurePosixPath(path).parent
                while str(parent) != ".":
                    if str(parent) in files:
                        raise errors.bad_request(f"Cannot add {path}: {parent} is a file")
                    parent = parent.parent

            timestamp = time.time()
            body = {
                "parent": base.sha if base else None,
                "summary": summary,
                "description": description,
                "author": author,
                "timestamp": timestamp,
                "files": {p: e.to_json() for p, e in sorted(files.items())},
                "nonce": uuid.uuid4().hex,  # two identical commits in the same instant still differ
            }
            sha = hashlib.sha1(json.dumps(body, sort_keys=True).encode()).hexdigest()
            commit = Commit(sha, body["parent"], summary, description, author, timestamp, files)
            self._write_commit(commit)
            if self._referenced is not None:
                self._referenced.update(e.sha256 for e in files.values() if e.lfs)

            refs = json.loads(json.dumps(self.refs))
            if create_pr:
                pr_num = int(self.meta.get("next_pr", 1))
                refs["prs"][str(pr_num)] = sha
                # what the discussion page says of it: the branch it targets, who opened it, when
                pulls = dict(self.meta.get("pulls", {}))
                pulls[str(pr_num)] = {
                    "base": "refs/heads/" + revision.removeprefix("refs/heads/"),
                    "author": author, "title": summary, "created": timestamp,
                }  # fmt: skip
                self.update_meta(next_pr=pr_num + 1, pulls=pulls)
            elif revision.startswith("refs/pr/"):
                refs["prs"][revision[len("refs/pr/"):]] = sha
            else:
                refs["heads"][revision.removeprefix("refs/heads/")] = sha
            self._set_refs(refs)
            self.update_meta(last_modified=timestamp)
            return commit, pr_num

    def pull_request(self, num: str) -> dict | None:
        """Pull request NUM as opened ({base, author, title, created}), or None when there is none."""
        return self.meta.get("pulls", {}).get(num)

    # ----------------------------------------------------------------- branches
    def create_branch(self, branch: str, starting_point: str | None = None) -> None:
        with self.lock:
            if branch in self.refs["heads"]:
                raise errors.conflict(f"Reference already exists: refs/heads/{branch}")
            if not branch or branch.startswith("refs/") or ".." in branch:
                raise errors.bad_request(f"Invalid branch name: {branch!r}")
            source = self.resolve(starting_point or "main")
            refs = json.loads(json.dumps(self.refs))
            refs["heads"][branch] = source.sha
            self._set_refs(refs)

    def delete_branch(self, branch: str) -> None:
        with self.lock:
            if branch == "main":
                raise errors.forbidden("Cannot delete the main branch")
            if branch not in self.refs["heads"]:
                raise errors.revision_not_found(branch)
            refs = json.loads(json.dumps(self.refs))
            del refs["heads"][branch]
            self._set_refs(refs)

    # ----------------------------------------------------------------- LFS objects
    # A blob is reachable through a repo only if it was uploaded to that repo (proof that the
    # uploader had its bytes) or is committed in it: knowing a sha256 is not enough to get it.
    def record_upload(self, sha256: str) -> None:
        with self.lock:
            uploaded = self.uploaded()
            if sha256 not in uploaded:
                with open(self.dir / "uploads.txt", "a") as fh:
                    fh.write(sha256 + "\n")
                uploaded.add(sha256)

    def uploaded(self) -> set[str]:
        if self._uploaded is None:
            path = self.dir / "uploads.txt"
            lines = path.read_text().split() if path.exists() else []
            self._uploaded = {line for line in lines if _SHA256_RE.match(line)}  # a torn last line is dropped
        return self._uploaded

    def references(self, sha256: str) -> bool:
        """Whether some commit of this repo (any branch, tag or pull request) holds this LFS object."""
        with self.lock:
            if self._referenced is None:
                referenced: set[str] = set()
                for path in (self.dir / "commits").glob("*.json"):
                    commit = self.get_commit(path.stem)
                    if commit is not None:
                        referenced.update(e.sha256 for e in commit.files.values() if e.lfs)
                self._referenced = referenced
            return sha256 in self._referenced

    def holds(self, sha256: str) -> bool:
        """Whether a commit to this repo may point at this object (uploaded here, or already in it)."""
        return sha256 in self.uploaded() or self.references(sha256)

    def lfs_patterns(self, commit: Commit | None) -> list[str]:
        entry = commit.files.get(".gitattributes") if commit else None
        if entry is None or entry.size > 1024 * 1024:
            return lfs_patterns(DEFAULT_GITATTRIBUTES)
        return lfs_patterns(self.storage.blobs.read(entry.sha256).decode("utf-8", "replace"))


class Storage:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.blobs = BlobStore(self.root)
        self._lock = threading.Lock()
        self._repos: dict[tuple[str, str], Repo] = {}

    def repo_dir(self, repo_type: str, repo_id: str) -> Path:
        if repo_type not in REPO_TYPES:
            raise errors.bad_request(f"Invalid repo type: {repo_type}")
        return self.root / f"{repo_type}s" / validate_repo_id(repo_id)

    def get_repo(self, repo_type: str, repo_id: str) -> Repo | None:
        key = (repo_type, repo_id)
        repo = self._repos.get(key)
        if repo is not None:
            return repo
        try:
            directory = self.repo_dir(repo_type, repo_id)
        except errors.HubError:
            return None
        with self._lock:
            if key not in self._repos and (directory / "repo.json").exists():
                self._repos[key] = Repo(self, repo_type, repo_id, directory)
            return self._repos.get(key)

    def iter_repos(self) -> Iterable[Repo]:
        for repo_type in REPO_TYPES:
            base = self.root / f"{repo_type}s"
            for meta in [*base.glob("*/repo.json"), *base.glob("*/*/repo.json")]:
                repo = self.get_repo(repo_type, meta.parent.relative_to(base).as_posix())
                if repo is not None:
                    yield repo

    def create_repo(
        self,
        repo_type: str,
        repo_id: str,
        *,
        private: bool = False,
        gated: bool | str = False,
        author: str | None = None,
        initial_commit: bool = True,
    ) -> Repo:
        directory = self.repo_dir(repo_type, repo_id)
        with self._lock:
            if (directory / "repo.json").exists():
                raise errors.conflict(f"You already created this {repo_type} repo: {repo_id}")
            (directory / "commits").mkdir(parents=True, exist_ok=True)
            now = time.time()
            meta = {
                "id": repo_id,
                "type": repo_type,
                "private": bool(private),
                "gated": ("manual" if gated is True else gated) or False,
                "granted": [],
                "created_at": now,
                "last_modified": now,
                "next_pr": 1,
            }
            _write_json(directory / "refs.json", {"heads": {}, "tags": {}, "prs": {}})
            # repo.json last: its presence is what marks the repo as existing.
            _write_json(directory / "repo.json", meta)
            repo = Repo(self, repo_type, repo_id, directory)
            self._repos[(repo_type, repo_id)] = repo
        if initial_commit:
            content = DEFAULT_GITATTRIBUTES.encode()
            entry = FileEntry.make(self.blobs.put_bytes(content), len(content), False, content)
            repo.commit([AddFile(".gitattributes", entry)], summary="initial commit", author=author)
        return repo

    def delete_repo(self, repo_type: str, repo_id: str) -> None:
        import shutil

        directory = self.repo_dir(repo_type, repo_id)
        with self._lock:
            self._repos.pop((repo_type, repo_id), None)
            if not (directory / "repo.json").exists():
                raise errors.repo_not_found(repo_id, authenticated=True)
            # Blobs stay: they may be shared with other repos, and keeping them is what lets
            # an upload of the same content be skipped later.
            shutil.rmtree(directory)

    def add_file_from_bytes(self, path: str, data: bytes, *, lfs: bool | None = None) -> AddFile:
        sha256 = self.blobs.put_bytes(data)
        if lfs is None:
            lfs = should_use_lfs(path, len(data), data[:512], lfs_patterns(DEFAULT_GITATTRIBUTES))
        return AddFile(validate_path(path), FileEntry.make(sha256, len(data), lfs, None if lfs else data))

    def add_file_from_path(self, path: str, source: Path, *, patterns: Iterable[str] | None = None) -> AddFile:
        size = source.stat().st_size
        with open(source, "rb") as fh:
            sample = fh.read(512)
        patterns = lfs_patterns(DEFAULT_GITATTRIBUTES) if patterns is None else patterns
        lfs = should_use_lfs(path, size, sample, patterns)
        if not lfs:
            return self.add_file_from_bytes(path, source.read_bytes(), lfs=False)
        with open(source, "rb") as fh:
            sha256, size = self.blobs.put_stream(fh)
        return AddFile(validate_path(path), FileEntry.make(sha256, size, True))

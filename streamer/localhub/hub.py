"""`LocalHub`: the server plus the helpers tests and benches use to set it up and inspect it."""

from __future__ import annotations

import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from . import errors
from .auth import Users, can_write
from .faults import FaultPlan
from .lfs import DEFAULT_MULTIPART_CHUNK, LfsUploads
from .server import HubHTTPServer, HubState
from .storage import DeleteFile, Repo, Storage, lfs_patterns
from .transport import RequestRecord


@dataclass(frozen=True)
class CommitRecord:
    sha: str
    parent: str | None
    message: str  # the summary line
    description: str
    author: str | None
    date: str  # ISO 8601, UTC
    added: tuple[str, ...]
    modified: tuple[str, ...]
    deleted: tuple[str, ...]

    @property
    def files_changed(self) -> tuple[str, ...]:
        return tuple(sorted(self.added + self.modified + self.deleted))


class LocalHub:
    """A Hub-compatible server on loopback, serving the repos stored under `root`.

    >>> with LocalHub(tmp_path) as hub:
    ...     hub.add_user("alice", "hf_alice")
    ...     HfApi(endpoint=hub.url, token="hf_alice").whoami()
    """

    def __init__(
        self,
        root: Path | str,
        port: int = 0,
        host: str = "127.0.0.1",
        *,
        multipart_chunk_size: int = DEFAULT_MULTIPART_CHUNK,
        redirect_lfs: bool = False,
    ):
        self.root = Path(root)
        self.host = host
        self.port = port
        self.storage = Storage(self.root)
        # A previous run may have died mid-upload; nobody can resume those temp files.
        shutil.rmtree(self.storage.blobs.tmp_dir, ignore_errors=True)
        self.storage.blobs.tmp_dir.mkdir(parents=True, exist_ok=True)
        self.users = Users(self.root / "users.json")
        self.uploads = LfsUploads(self.storage.blobs, multipart_chunk_size, on_stored=self._record_upload)
        self.state = HubState(self.storage, self.users, self.uploads)
        self._server: HubHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.set_redirect_lfs(redirect_lfs)

    def _record_upload(self, repo_type: str, repo_id: str, sha256: str) -> None:
        repo = self.storage.get_repo(repo_type, repo_id)
        if repo is not None:  # deleted while the upload went on: nothing to record it in
            repo.record_upload(sha256)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "LocalHub":
        if self._server is not None:
            return self
        self._server = HubHTTPServer((self.host, self.port), self.state)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="localhub", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.close_connections()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.uploads.abort_all()

    def __enter__(self) -> "LocalHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("LocalHub is not started")
        return f"http://{self.host}:{self.port}"

    def serve_forever(self) -> None:
        """Start and block until interrupted (used by the CLI)."""
        self.start()
        assert self._thread is not None
        try:
            while self._thread.is_alive():
                self._thread.join(timeout=0.5)
        finally:
            self.stop()

    # ------------------------------------------------------------------ users & repos
    def add_user(self, name: str, token: str, orgs: Iterable[str] = (), role: str = "write") -> None:
        """Register a token; `orgs` are the namespaces besides `name` that the user may write to."""
        self.users.add(name, token, tuple(orgs), role)

    def _repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        repo = self.storage.get_repo(repo_type, repo_id)
        if repo is None:
            raise KeyError(f"No {repo_type} repo {repo_id!r} under {self.root}")
        return repo

    def create_repo(
        self,
        repo_id: str,
        owner_token: str | None = None,
        private: bool = False,
        gated: bool | str = False,
        *,
        repo_type: str = "model",
        exist_ok: bool = False,
    ) -> str:
        """Create a repo like `POST /api/repos/create` does (with its initial .gitattributes commit).

        With `owner_token`, that token's user must be allowed to write to the namespace.
        Returns the repo URL.
        """
        author = None
        if owner_token is not None:
            user = self.users.by_token(owner_token)
            namespace = repo_id.split("/")[0] if "/" in repo_id else None
            if user is None or not can_write(user, namespace):
                raise PermissionError(f"token may not create repos under {namespace!r}")
            author = user.name
        try:
            self.storage.create_repo(repo_type, repo_id, private=private, gated=gated, author=author)
        except errors.HubError as exc:
            if not (exist_ok and exc.status == 409):
                raise FileExistsError(str(exc)) from None
        return f"{self._base()}/{'' if repo_type == 'model' else repo_type + 's/'}{repo_id}"

    def delete_repo(self, repo_id: str, *, repo_type: str = "model") -> None:
        self.storage.delete_repo(repo_type, repo_id)

    def set_repo(self, repo_id: str, *, private: bool | None = None, gated: bool | str | None = None,
                 repo_type: str = "model") -> None:
        changes: dict = {}
        if private is not None:
            changes["private"] = private
        if gated is not None:
            changes["gated"] = ("manual" if gated is True else gated) or False
        self._repo(repo_id, repo_type).update_meta(**changes)

    def grant_gated(self, repo_id: str, user: str, *, repo_type: str = "model") -> None:
        """Record that `user` accepted the gate's terms (and was approved)."""
        self._repo(repo_id, repo_type).grant(user)

    def seed_repo(
        self,
        repo_id: str,
        folder: Path | str,
        message: str = "seed",
        private: bool = False,
        gated: bool | str = False,
        *,
        repo_type: str = "model",
        revision: str = "main",
        author: str | None = None,
    ) -> str:
        """Commit every file under `folder` (recursively) in one commit; returns its sha.

        Creates the repo if needed, without the Hub's initial commit, so a seeded repo has
        exactly one commit. Files go to LFS by the Hub's rules (size, binary, .gitattributes).
        Privacy and gating only apply when the repo is created here.
        """
        folder = Path(folder)
        repo = self.storage.get_repo(repo_type, repo_id)
        if repo is None:
            repo = self.storage.create_repo(
                repo_type, repo_id, private=private, gated=gated, author=author, initial_commit=False
            )
        gitattributes = folder / ".gitattributes"
        patterns = lfs_patterns(gitattributes.read_text()) if gitattributes.is_file() else None
        operations = [
            self.storage.add_file_from_path(path.relative_to(folder).as_posix(), path, patterns=patterns)
            for path in sorted(folder.rglob("*"))
            if path.is_file() and ".git" not in path.relative_to(folder).parts
        ]
        commit, _ = repo.commit(operations, revision=revision, summary=message, author=author)
        return commit.sha

    def delete_files(self, repo_id: str, paths: Iterable[str], message: str = "delete", *,
                     repo_type: str = "model", revision: str = "main") -> str:
        commit, _ = self._repo(repo_id, repo_type).commit(
            [DeleteFile(p) for p in paths], revision=revision, summary=message
        )
        return commit.sha

    # ------------------------------------------------------------------ inspection
    def commits(self, repo_id: str, revision: str = "main", *, repo_type: str = "model") -> list[CommitRecord]:
        """History of `revision`, newest first, with the files each commit changed."""
        repo = self._repo(repo_id, repo_type)
        history = repo.history(revision)
        records = []
        for commit, parent in zip(history, history[1:] + [None]):
            before = parent.files if parent else {}
            after = commit.files
            records.append(CommitRecord(
                sha=commit.sha,
                parent=commit.parent,
                message=commit.summary,
                description=commit.description,
                author=commit.author,
                date=commit.date,
                added=tuple(sorted(p for p in after if p not in before)),
                modified=tuple(sorted(p for p in after if p in before and before[p] != after[p])),
                deleted=tuple(sorted(p for p in before if p not in after)),
            ))
        return records

    def files(self, repo_id: str, revision: str = "main", *, repo_type: str = "model") -> dict[str, int]:
        commit = self._repo(repo_id, repo_type).resolve(revision)
        return {path: entry.size for path, entry in sorted(commit.files.items())}

    def blob_path(self, repo_id: str, path: str, revision: str = "main", *, repo_type: str = "model") -> Path:
        """Where the content of a file lives on disk (read-only: blobs are shared)."""
        entry = self._repo(repo_id, repo_type).resolve(revision).files.get(path)
        if entry is None:
            raise FileNotFoundError(f"{path} not in {repo_id}@{revision}")
        return self.storage.blobs.path(entry.sha256)

    def read_file(self, repo_id: str, path: str, revision: str = "main", *, repo_type: str = "model") -> bytes:
        return self.blob_path(repo_id, path, revision, repo_type=repo_type).read_bytes()

    def refs(self, repo_id: str, *, repo_type: str = "model") -> dict:
        """{"heads": {branch: sha}, "tags": {...}, "prs": {"1": sha}}"""
        return dict(self._repo(repo_id, repo_type).refs)

    def repo_exists(self, repo_id: str, *, repo_type: str = "model") -> bool:
        return self.storage.get_repo(repo_type, repo_id) is not None

    # ------------------------------------------------------------------ traffic control
    @property
    def request_log(self) -> list[RequestRecord]:
        return self.state.log_snapshot()

    def clear_log(self) -> None:
        self.state.clear_log()

    def set_throttle(self, down_bytes_per_s: float | None = None, up_bytes_per_s: float | None = None, *,
                     per_client: bool = False) -> None:
        """Limit bandwidth per direction (response bodies / request bodies); None = unlimited.

        The limit is shared by every client, or with PER_CLIENT applies to each client address
        separately (one link per machine of a cluster on loopback: 127.0.0.2, 127.0.0.3 …)."""
        self.state.throttle.set(down_bytes_per_s, up_bytes_per_s, per_client=per_client)

    def set_faults(
        self,
        every: int | None = None,
        kinds: Iterable[str] = ("drop",),
        *,
        retry_after: int = 1,
        slow_seconds: float = 0.5,
        only_paths: str | None = "resolve",
        methods: Iterable[str] | None = None,
        max_faults: int | None = None,
    ) -> None:
        """Every `every`-th request whose path matches the regex `only_paths` (and whose method is
        in `methods`) gets a fault, cycling through `kinds`:

        - "drop": the request is handled, then the response is cut after half of its body (no
          answer at all when there is no body, e.g. HEAD) and the connection closed;
        - "500"/"502"/"503"/"504": that server error, the request is not handled;
        - "429": Too Many Requests with `Retry-After: retry_after`, not handled;
        - "slow": wait `slow_seconds` before handling.

        `set_faults(None)` turns injection off. Counting restarts at each call.
        """
        if every is None:
            self.state.faults.set(None)
            return
        plan = FaultPlan(
            every=every,
            kinds=tuple(str(k) for k in kinds),
            retry_after=retry_after,
            slow_seconds=slow_seconds,
            only_paths=only_paths,
            methods=tuple(m.upper() for m in methods) if methods is not None else None,
            max_faults=max_faults,
        )
        self.state.faults.set(plan)

    def set_redirect_lfs(self, enabled: bool = True, cdn_host: str | None = None) -> None:
        """Answer resolve requests for LFS files with a 302 to a signed "CDN" URL, as the Hub does.

        The CDN URL uses another name for this server (`localhost` when serving on 127.0.0.1)
        so that clients treat it as a foreign host: they take the file metadata from the
        redirect itself and do not send their token there. Its path is `/cdn-lfs/<sha256>`
        (match it in `set_faults(only_paths=...)` to inject faults on those downloads).
        """
        if not enabled:
            self.state.cdn_host = None
            return
        if cdn_host is None:
            cdn_host = {"127.0.0.1": "localhost", "localhost": "127.0.0.1"}.get(self.host)
            if cdn_host is None:
                raise ValueError(f"pass cdn_host: another name than {self.host!r} that reaches this server")
        # Another name than the Hub's: the client follows same-origin redirects on HEAD and would
        # then miss the `X-Repo-Commit` header.
        self.state.cdn_host = cdn_host

    @property
    def multipart_chunk_size(self) -> int:
        """LFS objects larger than this are uploaded in parts of this size (when the client offers multipart)."""
        return self.uploads.multipart_chunk_size

    @multipart_chunk_size.setter
    def multipart_chunk_size(self, value: int) -> None:
        self.uploads.multipart_chunk_size = int(value)

    def _base(self) -> str:
        return self.url if self._server is not None else f"http://{self.host}:{self.port}"

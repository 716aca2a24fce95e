"""The Hub endpoints that `huggingface_hub` calls, on top of transport.py.

URL shapes (repo ids are `name` or `namespace/name`; revisions arrive percent-encoded with
`safe=""`, so `refs/pr/1` is one segment `refs%2Fpr%2F1`):

    GET  /api/whoami-v2
    POST /api/validate-yaml
    POST /api/repos/create            DELETE /api/repos/delete
    GET  /api/{type}s/{repo}[/revision/{rev}]
    GET  /api/{type}s/{repo}/tree/{rev}[/{path}]      POST /api/{type}s/{repo}/paths-info/{rev}
    GET  /api/{type}s/{repo}/commits/{rev}            GET  /api/{type}s/{repo}/refs
    POST /api/{type}s/{repo}/preupload/{rev}          POST /api/{type}s/{repo}/commit/{rev}
    POST|DELETE /api/{type}s/{repo}/branch/{branch}   PUT  /api/{type}s/{repo}/settings
    HEAD|GET [/{type}s]/{repo}/resolve/{rev}/{path}
    POST [/{type}s]/{repo}.git/info/lfs/objects/batch  (and .../verify)
    HEAD|GET /cdn-lfs/{sha256}?repo&path&expires&sig  (signed blob URLs, see UrlSigner)
    PUT  /api/localhub/lfs/{upload}[/{part}]   POST /api/localhub/lfs/{upload}   (upload URLs we hand out)
    GET  /api/{type}s/{repo}/xet-write-token/{rev}    /api/localhub/xet/{store}/v1/...  (Xet uploads, see xet.py)
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import hmac
import json
import os
import re
import socket
import sys
import threading
import time
from http.server import ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlencode

import yaml

from . import errors
from .auth import (
    User,
    Users,
    can_read_content,
    can_write,
    check_content,
    check_read,
    check_write,
    user_from_header,
)
from .faults import FaultInjector
from .lfs import LfsUploads
from .storage import (
    LFS_SIZE_THRESHOLD,
    AddFile,
    DeleteFile,
    DeleteFolder,
    FileEntry,
    Repo,
    Storage,
    is_sha256,
    should_use_lfs,
    utc_iso,
    validate_path,
)
from .throttle import Throttle
from .transport import RequestRecord, TransportHandler, logger
from .views import Views, front_matter
from .xet import CAS_PREFIX, MAX_SHARD, XetStore, XetTokens, is_hash_hex, parse_shard

TYPE_PREFIXES = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
# Words that follow a repo id in API URLs, used to tell `name/tree/...` from `ns/name/...`.
REPO_SUBPATHS = {
    "revision", "tree", "paths-info", "preupload", "commit", "commits", "refs", "branch", "tag",
    "settings", "discussions", "lfs-files", "resolve", "treesize", "auth-check", "super-squash",
    "xet-write-token", "xet-read-token",
}
CDN_PREFIX = "cdn-lfs"
_RANGE_RE = re.compile(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", re.IGNORECASE)
# Byte positions longer than this are past the end of any file; int() would refuse them past
# 4300 digits anyway, and a Range header is untrusted input.
_MAX_POSITION_DIGITS = 18


class UrlSigner:
    """Signed, expiring blob URLs (`/cdn-lfs/<sha256>?…`), like the Hub's links to its CDN.

    They serve LFS redirects (on another host name, see `LocalHub.set_redirect_lfs`) and the
    download actions of the LFS batch API; whoever holds one may read that blob without a token.
    """

    def __init__(self, ttl: float = 3600.0):
        self.ttl = ttl
        self._secret = os.urandom(32)

    def _sign(self, sha256: str, repo: str, path: str, expires: str) -> str:
        message = f"{sha256}\n{repo}\n{path}\n{expires}".encode()
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()

    def path(self, sha256: str, repo: str, path: str) -> str:
        expires = str(int(time.time() + self.ttl))
        query = urlencode({"repo": repo, "path": path, "expires": expires,
                           "sig": self._sign(sha256, repo, path, expires)})
        return f"/{CDN_PREFIX}/{sha256}?{query}"

    def valid(self, sha256: str, params: dict[str, str]) -> bool:
        expires = params.get("expires", "0")
        expected = self._sign(sha256, params.get("repo", ""), params.get("path", ""), expires)
        return (
            is_sha256(sha256)
            and hmac.compare_digest(expected, params.get("sig", ""))
            and expires.isdigit()
            and int(expires) > time.time()
        )


class HubState:
    """Everything the request threads share."""

    def __init__(self, storage: Storage, users: Users, uploads: LfsUploads):
        self.signer = UrlSigner()
        self.cdn_host: str | None = None  # set to redirect LFS downloads to this host name, as the Hub does
        self.storage = storage
        self.users = users
        self.uploads = uploads
        self.views = Views(storage.blobs)
        self.xet = XetStore(storage.root, storage.blobs)
        self.xet_tokens = XetTokens()
        self.throttle = Throttle()
        self.faults = FaultInjector()
        self._log: list[RequestRecord] = []
        self._log_lock = threading.Lock()

    def log(self, record: RequestRecord) -> None:
        with self._log_lock:
            self._log.append(record)

    def log_snapshot(self) -> list[RequestRecord]:
        with self._log_lock:
            return list(self._log)

    def clear_log(self) -> None:
        with self._log_lock:
            self._log.clear()


class HubHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256  # benches open many pooled connections at once

    def __init__(self, address: tuple[str, int], state: HubState):
        self.state = state
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, HubHandler)

    def track(self, conn: socket.socket, alive: bool) -> None:
        with self._connections_lock:
            (self._connections.add if alive else self._connections.discard)(conn)

    def handle_error(self, request, client_address) -> None:
        # A client that resets a kept-alive connection, idle or half-way through a request line,
        # is routine for a server: not worth a traceback on stderr.
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            logger.debug("localhub: connection from %s:%s reset", *client_address[:2])
            return
        logger.exception("localhub: error on the connection from %s:%s", *client_address[:2])

    def close_connections(self) -> None:
        """Unblock threads parked on idle keep-alive connections so that stop() is prompt."""
        with self._connections_lock:
            conns = list(self._connections)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _truthy(value: str | None) -> bool:
    return value is not None and value.lower() in ("1", "true", "yes")


_KINDS = {str: "a string", int: "an integer", list: "a list", dict: "a JSON object"}


def _expect(value, kind: type, what: str, *, optional: bool = False):
    """`value` if it has the JSON type `kind`; anything else in a request body is the caller's error (400)."""
    if value is None and optional:
        return None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise errors.bad_request(f"Malformed request body: {what} must be {_KINDS[kind]}")
    return value


def _strings(value, what: str) -> list[str]:
    items = _expect(value, list, what)
    for i, item in enumerate(items):
        _expect(item, str, f"{what}[{i}]")
    return items


def _base64(value, what: str) -> bytes:
    try:
        return base64.b64decode(_expect(value, str, what))
    except ValueError:
        raise errors.bad_request(f"Malformed request body: {what} is not valid base64") from None


def _position(digits: str) -> int:
    digits = digits.lstrip("0") or "0"
    return int(digits) if len(digits) <= _MAX_POSITION_DIGITS else 10**_MAX_POSITION_DIGITS


def parse_range(header: str | None, size: int) -> tuple[int, int] | None | str:
    """(start, end) inclusive, None to serve the whole file, or "unsatisfiable"."""
    if not header:
        return None
    match = _RANGE_RE.fullmatch(header)
    if not match or (not match[1] and not match[2]):
        return None  # malformed or multi-range: RFC 9110 allows ignoring the header
    if not match[1]:
        suffix = _position(match[2])
        if suffix == 0 or size == 0:
            return "unsatisfiable"
        return max(0, size - suffix), size - 1
    start = _position(match[1])
    end = _position(match[2]) if match[2] else size - 1
    if match[2] and end < start:
        return None  # invalid: ignore it
    if start >= size:
        return "unsatisfiable"
    return start, min(end, size - 1)


def _gitignored(path: str, gitignore: str | None) -> bool:
    if not gitignore:
        return False
    name = path.rsplit("/", 1)[-1]
    for line in gitignore.splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith(("#", "!")):
            continue
        pattern = pattern.rstrip("/")
        if fnmatch.fnmatchcase(path, pattern.lstrip("/")) or fnmatch.fnmatchcase(name, pattern) or (
            path.startswith(pattern.lstrip("/") + "/")
        ):
            return True
    return False


class HubHandler(TransportHandler):
    # ------------------------------------------------------------------ routing
    def route(self, path: str, query: str) -> None:
        self.query = {k: v for k, v in parse_qs(query, keep_blank_values=True).items()}
        self.user: User | None = None
        if path.startswith(CAS_PREFIX) or path == "/v1/telemetry":
            return self._cas(path)  # authenticated by Xet tokens, not Hub tokens
        self.user = user_from_header(self.state.users, self.headers.get("Authorization"))
        self.record.user = self.user.name if self.user else None
        segs = path.split("/")[1:]
        if segs and segs[0] == "api":
            return self._route_api(segs[1:])
        if len(segs) == 2 and segs[0] == CDN_PREFIX:
            return self._cdn(segs[1])
        repo_type = "model"
        if segs and segs[0] in ("datasets", "spaces"):
            repo_type, segs = TYPE_PREFIXES[segs[0]], segs[1:]
        for i in (1, 2):
            if len(segs) > i + 1 and segs[i] == "resolve":
                return self._resolve(repo_type, "/".join(unquote(s) for s in segs[:i]), segs[i + 1 :])
        for i in (0, 1):
            if len(segs) == i + 5 and segs[i].endswith(".git") and segs[i + 1 : i + 4] == ["info", "lfs", "objects"]:
                repo_id = "/".join(unquote(s) for s in segs[:i] + [segs[i][: -len(".git")]])
                if self.command == "POST" and segs[i + 4] == "batch":
                    return self._lfs_batch(repo_type, repo_id)
                if self.command == "POST" and segs[i + 4] == "verify":
                    return self._lfs_verify(repo_type, repo_id)
        raise errors.HubError(404, f"Not found: {path}")

    def _route_api(self, segs: list[str]) -> None:
        method = self.command
        head = "/".join(segs[:2])
        if method == "GET" and segs == ["whoami-v2"]:
            return self._whoami()
        if method == "POST" and segs == ["validate-yaml"]:
            return self._validate_yaml()
        if method == "POST" and head == "repos/create":
            return self._create_repo()
        if method == "DELETE" and head == "repos/delete":
            return self._delete_repo()
        if segs[:2] == ["localhub", "lfs"] and len(segs) >= 3:
            return self._lfs_upload(segs[2:])
        if segs and segs[0] in TYPE_PREFIXES and len(segs) >= 2:
            return self._route_repo_api(TYPE_PREFIXES[segs[0]], segs[1:])
        raise errors.HubError(404, f"Not found: /api/{'/'.join(segs)}")

    def _route_repo_api(self, repo_type: str, segs: list[str]) -> None:
        if len(segs) >= 2 and segs[1] not in REPO_SUBPATHS:
            repo_id, rest = f"{unquote(segs[0])}/{unquote(segs[1])}", segs[2:]
        else:
            repo_id, rest = unquote(segs[0]), segs[1:]
        self.record.repo_id = repo_id
        action = rest[0] if rest else ""
        # Revision-taking endpoints end with the revision (encoded as one segment by the client,
        # but an unencoded `refs/pr/1` is accepted too).
        arg = unquote("/".join(rest[1:]))
        method = self.command
        if method == "GET" and action == "":
            return self._repo_info(repo_type, repo_id, "main")
        if method == "GET" and action == "revision" and len(rest) >= 2:
            return self._repo_info(repo_type, repo_id, unquote("/".join(rest[1:])))
        if method == "GET" and action == "tree" and len(rest) >= 2:
            return self._tree(repo_type, repo_id, unquote(rest[1]), unquote("/".join(rest[2:])))
        if method == "POST" and action == "paths-info" and len(rest) >= 2:
            return self._paths_info(repo_type, repo_id, arg)
        if method == "GET" and action == "commits" and len(rest) >= 2:
            return self._commits(repo_type, repo_id, arg)
        if method == "GET" and action == "refs":
            return self._refs(repo_type, repo_id)
        if method == "GET" and action == "discussions" and len(rest) == 2:
            return self._discussion(repo_type, repo_id, unquote(rest[1]))
        if method == "POST" and action == "preupload" and len(rest) >= 2:
            return self._preupload(repo_type, repo_id, arg)
        if method == "POST" and action == "commit" and len(rest) >= 2:
            return self._commit(repo_type, repo_id, arg)
        if method in ("POST", "DELETE") and action == "branch" and len(rest) >= 2:
            return self._branch(repo_type, repo_id, arg)
        if method == "PUT" and action == "settings":
            return self._settings(repo_type, repo_id)
        if method == "GET" and action == "xet-write-token" and len(rest) >= 2:
            return self._xet_write_token(repo_type, repo_id, arg)
        if method == "GET" and action == "auth-check":
            return self._auth_check(repo_type, repo_id, write=rest[1:] == ["write"])
        raise errors.HubError(404, f"Not found: {self.record.path}")

    # ------------------------------------------------------------------ helpers
    @property
    def base_url(self) -> str:
        # Build URLs from the Host the client used, so they work behind any alias of loopback.
        host = self.headers.get("Host") or "%s:%d" % self.server.server_address[:2]
        return f"http://{host}"

    def _readable(self, repo_type: str, repo_id: str) -> Repo:
        return check_read(self.user, self.state.storage.get_repo(repo_type, repo_id), repo_id)

    def _param(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[-1] if values else None

    def _repo_url(self, repo: Repo) -> str:
        return f"{self.base_url}/{URL_PREFIX[repo.repo_type]}{repo.repo_id}"

    # ------------------------------------------------------------------ users & repos
    def _whoami(self) -> None:
        if self.user is None:
            raise errors.unauthorized("You must be authenticated (Authorization: Bearer <token>)")
        self.send_json(200, self.state.views.whoami(self.user))

    def _validate_yaml(self) -> None:
        payload = self.body.json()
        block = front_matter(str(payload.get("content", "")))
        problems = []
        if block is not None:
            try:
                data = yaml.safe_load(block)
                if data is not None and not isinstance(data, dict):
                    problems.append({"message": "metadata must be a YAML mapping"})
            except yaml.YAMLError as exc:
                problems.append({"message": f"Invalid YAML: {exc}"})
        if problems:
            self.send_json(400, {"errors": problems, "warnings": [], "error": problems[0]["message"]})
        else:
            self.send_json(200, {"errors": [], "warnings": []})

    def _create_repo(self) -> None:
        payload = self.body.json()
        if self.user is None:
            raise errors.unauthorized("You must be authenticated to create a repo")
        name = payload.get("name")
        if not isinstance(name, str) or not name:
            raise errors.bad_request("Missing repo name")
        namespace = _expect(payload.get("organization"), str, "'organization'", optional=True) or self.user.name
        repo_id = f"{namespace}/{name}"
        repo_type = _expect(payload.get("type"), str, "'type'", optional=True) or "model"
        self.record.repo_id = repo_id
        if not can_write(self.user, namespace):
            raise errors.forbidden(f"You don't have the rights to create a {repo_type} under the namespace \"{namespace}\"")
        private = payload.get("private")
        if "visibility" in payload:
            private = payload["visibility"] == "private"
        url = f"{self.base_url}/{URL_PREFIX.get(repo_type, '')}{repo_id}"
        try:
            self.state.storage.create_repo(
                repo_type, repo_id, private=bool(private), gated=payload.get("gated") or False, author=self.user.name
            )
        except errors.HubError as exc:
            if exc.status == 409:
                exc.body["url"] = url  # the client reads it when called with exist_ok=True
            raise
        self.send_json(200, {"url": url, "name": repo_id, "id": repo_id})

    def _delete_repo(self) -> None:
        payload = self.body.json()
        name = _expect(payload.get("name"), str, "'name'")
        namespace = _expect(payload.get("organization"), str, "'organization'", optional=True) or (
            self.user.name if self.user else None)
        repo_id = f"{namespace}/{name}" if namespace else name
        repo = self._readable(_expect(payload.get("type"), str, "'type'", optional=True) or "model", repo_id)
        check_write(self.user, repo)
        self.state.storage.delete_repo(repo.repo_type, repo.repo_id)
        self.send_json(200, {})

    def _settings(self, repo_type: str, repo_id: str) -> None:
        payload = self.body.json()
        repo = self._readable(repo_type, repo_id)
        check_write(self.user, repo)
        changes: dict = {}
        if "private" in payload:
            changes["private"] = bool(payload["private"])
        if "visibility" in payload:
            changes["private"] = payload["visibility"] == "private"
        if "gated" in payload:
            changes["gated"] = payload["gated"] or False
        repo.update_meta(**changes)
        self.send_json(200, {})

    def _auth_check(self, repo_type: str, repo_id: str, *, write: bool) -> None:
        repo = self._readable(repo_type, repo_id)
        check_content(self.user, repo)
        if write:
            check_write(self.user, repo)
        self.send_json(200, {})

    def _branch(self, repo_type: str, repo_id: str, branch: str) -> None:
        payload = self.body.json() if self.command == "POST" else {}
        repo = self._readable(repo_type, repo_id)
        check_write(self.user, repo)
        if self.command == "POST":
            repo.create_branch(branch, _expect(payload.get("startingPoint"), str, "'startingPoint'", optional=True))
        else:
            repo.delete_branch(branch)
        self.send_json(200, {})

    # ------------------------------------------------------------------ reading
    def _repo_info(self, repo_type: str, repo_id: str, revision: str) -> None:
        repo = self._readable(repo_type, repo_id)
        self.record.revision = revision
        commit = repo.resolve(revision)
        expand = self.query.get("expand") or self.query.get("expand[]")
        blobs = _truthy(self._param("blobs"))
        self.send_json(200, self.state.views.repo_info(repo, commit, blobs=blobs, expand=expand))

    def _tree(self, repo_type: str, repo_id: str, revision: str, path: str) -> None:
        repo = self._readable(repo_type, repo_id)
        self.record.revision = revision
        commit = repo.resolve(revision)
        items = self.state.views.tree(
            repo, commit, path, recursive=_truthy(self._param("recursive")), expand=_truthy(self._param("expand"))
        )
        self.send_json(200, items)

    def _paths_info(self, repo_type: str, repo_id: str, revision: str) -> None:
        raw = self.body.read_all(64 * 1024 * 1024)
        try:
            if "json" in self.headers.get("Content-Type", ""):
                payload = _expect(json.loads(raw or b"{}"), dict, "the body")
                paths, expand = _strings(payload.get("paths") or [], "'paths'"), bool(payload.get("expand"))
            else:
                form = parse_qs(raw.decode(), keep_blank_values=True)
                paths, expand = form.get("paths", []), _truthy((form.get("expand") or ["false"])[-1])
        except (ValueError, RecursionError):
            raise errors.bad_request("Malformed request body: send JSON {\"paths\": [...]} or a form") from None
        repo = self._readable(repo_type, repo_id)
        commit = repo.resolve(revision)
        self.send_json(200, self.state.views.paths_info(repo, commit, [str(p) for p in paths], expand=expand))

    def _commits(self, repo_type: str, repo_id: str, revision: str) -> None:
        repo = self._readable(repo_type, repo_id)
        self.send_json(200, [self.state.views.commit_item(c) for c in repo.history(revision)])

    def _discussion(self, repo_type: str, repo_id: str, num: str) -> None:
        """A pull request's page as the Hub's API gives it (what HfApi.get_discussion_details reads:
        its target branch, author and status; no events, no diff)."""
        repo = self._readable(repo_type, repo_id)
        pull = repo.pull_request(num)
        if pull is None:
            raise errors.HubError(404, f"Discussion {num} not found in {repo_id}")
        self.send_json(200, {
            "num": int(num), "title": pull["title"], "status": "open", "isPullRequest": True,
            "author": {"name": pull["author"] or "deleted"}, "createdAt": utc_iso(pull["created"]),
            "repo": {"name": repo_id, "type": repo_type}, "events": [], "filesWithConflicts": [],
            "changes": {"base": pull["base"]}, "diff": "",
        })  # fmt: skip

    def _refs(self, repo_type: str, repo_id: str) -> None:
        repo = self._readable(repo_type, repo_id)
        self.send_json(200, self.state.views.refs(repo, _truthy(self._param("include_prs"))))

    def _resolve(self, repo_type: str, repo_id: str, rest: list[str]) -> None:
        if self.command not in ("GET", "HEAD"):
            raise errors.HubError(405, "Method not allowed")
        revision, rest = unquote(rest[0]), rest[1:]
        # Also accept an unencoded `refs/pr/1` spread over three segments.
        if revision == "refs" and len(rest) > 2 and rest[0] in ("pr", "heads", "tags", "convert"):
            revision, rest = f"refs/{rest[0]}/{unquote(rest[1])}", rest[2:]
        path = unquote("/".join(rest))
        self.record.repo_id, self.record.revision, self.record.file = repo_id, revision, path
        repo = self._readable(repo_type, repo_id)
        check_content(self.user, repo)
        commit = repo.resolve(revision)
        entry = commit.files.get(path)
        if entry is None:
            raise errors.entry_not_found(path, commit.sha)
        headers = {
            "X-Repo-Commit": commit.sha,
            "ETag": f'"{entry.etag}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream" if entry.lfs else "text/plain; charset=utf-8",
            "Content-Disposition": f"inline; filename*=UTF-8''{path.rsplit('/', 1)[-1]}",
        }
        if entry.lfs:
            # On the Hub these come with the redirect to the CDN and describe the linked blob.
            headers["X-Linked-Etag"] = f'"{entry.sha256}"'
            headers["X-Linked-Size"] = str(entry.size)
            if self.state.cdn_host is not None:
                headers["ETag"] = f'"{entry.git_oid}"'  # the pointer's, as the Hub's redirect has
                signed = self.state.signer.path(entry.sha256, f"{repo_type}s/{repo_id}", path)
                headers["Location"] = f"http://{self.state.cdn_host}:{self.server.server_address[1]}{signed}"
                self.send_bytes(302, b"", headers)
                return
        self._send_blob(entry.sha256, entry.size, headers, {"X-Repo-Commit": commit.sha})

    def _send_blob(self, sha256: str, size: int, headers: dict[str, str], error_headers: dict[str, str]) -> None:
        blob = str(self.state.storage.blobs.path(sha256))
        wanted = parse_range(self.headers.get("Range"), size)
        if wanted == "unsatisfiable":
            match = _RANGE_RE.fullmatch(self.headers.get("Range", ""))
            if match and match[1]:
                self.record.range = (_position(match[1]), _position(match[2]) if match[2] else size - 1)
            raise errors.HubError(416, "Requested range not satisfiable", None,
                                  {"Content-Range": f"bytes */{size}", **error_headers})
        if wanted is None:
            self.send_file_range(200, blob, 0, size, headers)
            return
        start, end = wanted
        self.record.range = (start, end)
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        self.send_file_range(206, blob, start, end - start + 1, headers)

    def _cdn(self, sha256: str) -> None:
        """A signed-URL blob server standing in for the Hub's CDN (no token needed, no repo headers)."""
        if self.command not in ("GET", "HEAD"):
            raise errors.HubError(405, "Method not allowed")
        params = {k: v[-1] for k, v in self.query.items()}
        if not self.state.signer.valid(sha256, params):
            raise errors.HubError(403, "Request has expired or its signature does not match")
        self.record.repo_id = params.get("repo", "").split("/", 1)[-1] or None
        self.record.file = params.get("path")
        size = self.state.storage.blobs.size(sha256)
        if size is None:
            raise errors.HubError(404, "No such blob")
        headers = {"ETag": f'"{sha256}"', "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        self._send_blob(sha256, size, headers, {})

    # ------------------------------------------------------------------ writing
    def _writable(self, repo_type: str, repo_id: str, *, create_pr: bool, revision: str = "main") -> Repo:
        repo = self._readable(repo_type, repo_id)
        # Anyone who can read may open a pull request or push to one, as on the Hub.
        if create_pr or revision.startswith("refs/pr/"):
            if self.user is None:
                raise errors.unauthorized("You must be authenticated to open a pull request")
        else:
            check_write(self.user, repo)
        return repo

    def _preupload(self, repo_type: str, repo_id: str, revision: str) -> None:
        payload = self.body.json()
        create_pr = _truthy(self._param("create_pr"))
        repo = self._writable(repo_type, repo_id, create_pr=create_pr, revision=revision)
        commit = None
        if repo.refs["heads"] or revision != "main":
            commit = repo.resolve(revision)
        patterns = repo.lfs_patterns(commit)
        gitignore = _expect(payload.get("gitIgnore"), str, "'gitIgnore'", optional=True)
        if gitignore is None and commit is not None and ".gitignore" in commit.files:
            entry = commit.files[".gitignore"]
            gitignore = self.state.storage.blobs.read(entry.sha256).decode("utf-8", "replace")
        answers = []
        for i, item in enumerate(_expect(payload.get("files", []), list, "'files'")):
            _expect(item, dict, f"files[{i}]")
            path = validate_path(_expect(item.get("path"), str, f"files[{i}].path"))
            sample = _base64(item.get("sample") or "", f"files[{i}].sample")
            size = _expect(item.get("size"), int, f"files[{i}].size", optional=True) or 0
            lfs = should_use_lfs(path, size, sample, patterns)
            answer = {"path": path, "uploadMode": "lfs" if lfs else "regular",
                      "shouldIgnore": _gitignored(path, gitignore)}
            existing = commit.files.get(path) if commit else None
            if existing is not None:
                # Lets the client drop unchanged files from the commit (sha256 for LFS, git oid otherwise).
                answer["oid"] = existing.sha256 if lfs else existing.git_oid
            answers.append(answer)
        self.send_json(200, {"files": answers, "commitOid": commit.sha if commit else None})

    def _commit(self, repo_type: str, repo_id: str, revision: str) -> None:
        raw = self.body.read_all()
        create_pr = _truthy(self._param("create_pr"))
        repo = self._writable(repo_type, repo_id, create_pr=create_pr, revision=revision)
        self.record.revision = revision
        header: dict | None = None
        operations = []
        blobs = self.state.storage.blobs
        for line in raw.splitlines():
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except (ValueError, RecursionError):
                item = None
            if not isinstance(item, dict) or not isinstance(item.get("key"), str) or not isinstance(
                item.get("value"), dict
            ):
                raise errors.bad_request(
                    'Malformed NDJSON commit payload: each line must be {"key": ..., "value": {...}}'
                )
            key, value = item["key"], item["value"]
            if key == "header":
                header = value
            elif key == "file":
                path = validate_path(_expect(value.get("path"), str, "file.path"))
                encoding = _expect(value.get("encoding"), str, "file.encoding", optional=True) or "base64"
                if encoding == "base64":
                    content = _base64(value.get("content", ""), f"the content of {path}")
                else:
                    content = _expect(value.get("content", ""), str, "file.content").encode()
                if len(content) >= LFS_SIZE_THRESHOLD:
                    raise errors.bad_request(
                        f"Your push was rejected because it contains files larger than 10 MiB: {path}. "
                        "Please use Git LFS to store large files."
                    )
                entry = FileEntry.make(blobs.put_bytes(content), len(content), False, content)
                operations.append(AddFile(path, entry))
            elif key == "lfsFile":
                path, oid = validate_path(_expect(value.get("path"), str, "lfsFile.path")), value.get("oid")
                size = value.get("size")
                # One answer whether the blob is missing or only somebody else's, so that the
                # answer does not tell which private contents exist.
                if not is_sha256(oid) or not blobs.has(oid, size) or not (repo.holds(oid) or self._reachable(oid)):
                    raise errors.bad_request(
                        "Your push was rejected because an LFS pointer pointed to a file that does not exist "
                        f"({path}, oid {oid}): upload its content to this repo before committing it"
                    )
                operations.append(AddFile(path, FileEntry.make(oid, blobs.size(oid) or 0, True)))
            elif key == "deletedFile":
                operations.append(DeleteFile(validate_path(_expect(value.get("path"), str, "deletedFile.path"))))
            elif key == "deletedFolder":
                folder = _expect(value.get("path"), str, "deletedFolder.path").rstrip("/")
                operations.append(DeleteFolder(validate_path(folder)))
            else:
                raise errors.bad_request(f"Unsupported commit operation: {key}")
        summary = _expect(header.get("summary", ""), str, "header.summary") if header is not None else ""
        if not summary.strip():
            raise errors.bad_request("Missing commit header or empty commit summary")
        description = _expect(header.get("description"), str, "header.description", optional=True) or ""
        parent_commit = _expect(header.get("parentCommit"), str, "header.parentCommit", optional=True)
        commit, pr_num = repo.commit(
            operations,
            revision=revision,
            summary=summary,
            description=description,
            author=self.user.name if self.user else None,
            parent_commit=parent_commit,
            create_pr=create_pr,
        )
        answer = {"success": True, "commitOid": commit.sha, "commitUrl": f"{self._repo_url(repo)}/commit/{commit.sha}",
                  "hookOutput": ""}
        if pr_num is not None:
            answer["pullRequestUrl"] = f"{self._repo_url(repo)}/discussions/{pr_num}"
            answer["pullRequestNum"] = pr_num
        self.send_json(200, answer)

    # ------------------------------------------------------------------ LFS
    def _reachable(self, sha256: str) -> bool:
        """Whether the caller may already read this LFS object: some repo whose files they can read holds it."""
        return any(
            repo.references(sha256) for repo in self.state.storage.iter_repos() if can_read_content(self.user, repo)
        )

    def _lfs_batch(self, repo_type: str, repo_id: str) -> None:
        payload = self.body.json()
        self.record.repo_id = repo_id
        operation = payload.get("operation")
        if operation not in ("upload", "download"):
            raise errors.bad_request("Malformed request body: 'operation' must be \"upload\" or \"download\"")
        objects = _expect(payload.get("objects"), list, "'objects'")
        for i, obj in enumerate(objects):
            _expect(obj, dict, f"objects[{i}]")
        transfers = _strings(payload.get("transfers") or ["basic"], "'transfers'")
        ref = _expect(payload.get("ref"), dict, "'ref'", optional=True)
        revision = _expect(ref.get("name"), str, "'ref.name'") if ref is not None else None
        if operation == "download":
            repo = self._readable(repo_type, repo_id)
            check_content(self.user, repo)
            answer = self._lfs_downloads(repo, objects)
        else:
            # The rights of the commit that will follow: write for a branch; reading is enough
            # for a pull request, which is what an upload without a ref is for (create_pr).
            repo = self._writable(repo_type, repo_id, create_pr=revision is None,
                                  revision=(revision or "main").removeprefix("refs/heads/"))
            blobs = self.state.storage.blobs
            verify = f"{self._repo_url(repo)}.git/info/lfs/objects/verify"
            answer = self.state.uploads.batch(
                objects, transfers, (repo.repo_type, repo.repo_id), self.base_url, verify,
                known=lambda oid, size: blobs.has(oid, size) and (repo.holds(oid) or self._reachable(oid)),
            )
        self.send_json(200, answer, {"Content-Type": "application/vnd.git-lfs+json"})

    def _lfs_downloads(self, repo: Repo, objects: list[dict]) -> dict:
        blobs = self.state.storage.blobs
        answers = []
        for obj in objects:
            oid, size = obj.get("oid"), obj.get("size")
            if is_sha256(oid) and type(size) is int and blobs.has(oid, size) and repo.references(oid):
                href = self.base_url + self.state.signer.path(oid, f"{repo.repo_type}s/{repo.repo_id}", "")
                answers.append({"oid": oid, "size": size, "authenticated": True,
                                "actions": {"download": {"href": href, "expires_in": int(self.state.signer.ttl)}}})
            else:
                answers.append({"oid": str(oid), "size": size if type(size) is int else 0,
                                "error": {"code": 404, "message": "Object does not exist in this repo"}})
        return {"transfer": "basic", "objects": answers, "hash_algo": "sha256"}

    def _lfs_verify(self, repo_type: str, repo_id: str) -> None:
        payload = self.body.json()
        # Verifying follows an upload: the same rights (those of a pull request at least).
        repo = self._writable(repo_type, repo_id, create_pr=True)
        oid, size = payload.get("oid"), payload.get("size")
        if is_sha256(oid) and type(size) is int and self.state.storage.blobs.has(oid, size) and repo.holds(oid):
            self.send_json(200, {"message": "ok"})
        else:
            raise errors.HubError(404, "Object not found in this repo: upload it through the batch API first")

    # ------------------------------------------------------------------ Xet
    def _xet_write_token(self, repo_type: str, repo_id: str, revision: str) -> None:
        # huggingface_hub asks for `…/xet-write-token/None?create_pr=1` when it opens a pull request.
        create_pr = _truthy(self._param("create_pr")) or revision == "None"
        repo = self._writable(repo_type, repo_id, create_pr=create_pr, revision=revision)
        assert self.user is not None  # _writable refuses anonymous callers
        token, expires = self.state.xet_tokens.issue(repo.repo_type, repo.repo_id, self.user.name)
        cas_url = f"{self.base_url}{CAS_PREFIX}{self.state.xet.store_id}"
        self.send_json(200, {"accessToken": token, "exp": expires, "casUrl": cas_url},
                       {"X-Xet-Access-Token": token, "X-Xet-Token-Expiration": str(expires), "X-Xet-Cas-Url": cas_url})

    def _cas(self, path: str) -> None:
        if path == "/v1/telemetry":
            self.send_json(200, {})  # hf_xet reports its transfer statistics to the CAS host; dropped
            return
        store, _, rest = path[len(CAS_PREFIX):].partition("/")
        if store != self.state.xet.store_id:
            raise errors.HubError(404, "Unknown Xet store: ask xet-write-token again for the current casUrl")
        grant = self.state.xet_tokens.check(self.headers.get("Authorization"))
        self.record.user, self.record.repo_id = grant.user, grant.repo_id
        segs = rest.split("/")
        if self.command == "GET" and len(segs) == 4 and segs[:2] == ["v1", "chunks"]:
            # No global deduplication: the client then uploads every xorb it does not know we have.
            raise errors.HubError(404, "No deduplication information for this chunk")
        if self.command == "POST" and len(segs) == 4 and segs[:3] == ["v1", "xorbs", "default"] and (
            is_hash_hex(segs[3])
        ):
            inserted = self.state.xet.put_xorb(segs[3], self.body, self.body.length)
            self.send_json(200, {"was_inserted": inserted})
            return
        if self.command == "POST" and segs == ["v1", "shards"]:
            files = parse_shard(self.body.read_all(MAX_SHARD))
            repo = self.state.storage.get_repo(grant.repo_type, grant.repo_id)
            if repo is None:
                raise errors.HubError(404, f"Repository {grant.repo_id} no longer exists")
            for file in files:
                sha256, _ = self.state.xet.reassemble(file)
                repo.record_upload(sha256)
            self.send_json(200, {"result": 1})  # 1: "sync performed"
            return
        # /v2/shards among others: a 404 there makes hf_xet fall back to /v1/shards.
        raise errors.HubError(404, f"Not found: {path}")

    def _lfs_upload(self, segs: list[str]) -> None:
        upload_id = segs[0]
        uploads = self.state.uploads
        self.record.repo_id = uploads.repo_of(upload_id)
        length = self.body.length
        if self.command == "PUT" and len(segs) == 1:
            uploads.put_object(upload_id, self.body, length)
            self.send_bytes(200, b"")
        elif self.command == "PUT" and len(segs) == 2 and segs[1].isdigit():
            etag = uploads.put_part(upload_id, int(segs[1]), self.body, length)
            self.send_bytes(200, b"", {"ETag": etag})
        elif self.command == "POST" and len(segs) == 1:
            uploads.complete(upload_id, self.body.json())
            self.send_json(200, {"success": True})
        else:
            raise errors.HubError(404, "Not found")

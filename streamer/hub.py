"""The Hub at both ends: HubSource reads with HTTP range requests, HubSink publishes in one commit.

Every Hub call goes through huggingface_hub (HfApi for the API, its shared HTTP session for range
reads), so endpoints, auth headers and proxies behave exactly as the rest of the ecosystem.
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import json
import logging
import mmap
import os
import random
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import build_hf_headers, get_session

from .card import read_provenance
from .errors import HubError, InputError, TargetError
from .sink import ShardWriter, Sink, check_relpath
from .source import Source, Span

log = logging.getLogger("streamer")

CHUNK_BYTES = 16 * 1024 * 1024  # a large span is fetched as parallel requests of this size
CONNECTIONS = 8  # parallel range requests per source
RETRIES = 8
RETRY_STATUS = {408, 429, 500, 502, 503, 504}


def _endpoint(endpoint: str | None) -> str:
    return (endpoint or hf_constants.ENDPOINT).rstrip("/")


def explain(e: Exception, repo_id: str, *, what: str = "repo") -> HubError:
    """Turn a huggingface_hub error into a sentence a user can act on. Never includes a token."""
    status = getattr(getattr(e, "response", None), "status_code", None)
    if isinstance(e, GatedRepoError):
        return HubError(
            f"{repo_id} is a gated model and this account has not been granted access: accept its "
            f"terms at https://huggingface.co/{repo_id}, then run again with that account's token"
        )
    if isinstance(e, RevisionNotFoundError):
        return HubError(f"revision not found in {repo_id}: check the branch, tag or commit after '@'")
    if isinstance(e, RepositoryNotFoundError):
        return HubError(
            f"{what} {repo_id} not found, or it is private and the token does not give access "
            "(pass --token or set HF_TOKEN)"
        )
    if status == 401:
        return HubError("the Hugging Face token was rejected (invalid or expired): check --token / HF_TOKEN")
    if status == 403:
        return HubError(f"the token has no write access to {repo_id}: use a write token, or a namespace you own")
    server = getattr(e, "server_message", "") or ""
    detail = f": {server}" if server else ""
    return HubError(f"Hub request for {repo_id} failed ({status or type(e).__name__}){detail}")


# --- source ------------------------------------------------------------------------------------


class RangeError(HubError):
    """The server did not honour a range request exactly; never fall back to a full download."""


class HubSource(Source):
    """A Hub repo pinned to one commit, read with range requests only."""

    def __init__(
        self,
        repo_id: str,
        *,
        revision: str | None = None,
        token: str | None = None,
        endpoint: str | None = None,
        connections: int = CONNECTIONS,
        chunk_bytes: int = CHUNK_BYTES,
    ):
        self.repo_id = repo_id
        self.endpoint = _endpoint(endpoint)
        self.api = HfApi(endpoint=self.endpoint, token=token)
        self._token = token
        self.chunk_bytes = chunk_bytes
        try:
            info = self.api.model_info(repo_id, revision=revision, files_metadata=True)
        except HfHubHTTPError as e:
            raise explain(e, repo_id, what="source repo") from None
        # Every file is read at this sha, so a push to the source mid-run cannot mix versions.
        self.commit = info.sha
        self.label = repo_id if revision is None else f"{repo_id}@{revision}"
        self._files = {s.rfilename: (s.size or 0) for s in (info.siblings or [])}
        self._urls: dict[str, str] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(connections, thread_name_prefix="streamer-range")
        self.requests = 0  # range requests sent, for tests and --json
        self.bytes_fetched = 0

    def files(self) -> dict[str, int]:
        return self._files

    def _resolve(self, path: str) -> tuple[str, dict]:
        """The URL to send ranges to: the redirect target, resolved once per file."""
        base = f"{self.endpoint}/{self.repo_id}/resolve/{self.commit}/{path}"
        headers = build_hf_headers(token=self._token)
        with self._lock:
            url = self._urls.get(path)
        if url is None:
            r = self._send("HEAD", base, headers, path=path)
            url = base
            if r.status_code in (301, 302, 303, 307, 308) and r.headers.get("location"):
                loc = r.headers["location"]
                url = loc if loc.startswith("http") else self.endpoint + loc
            with self._lock:
                self._urls[path] = url
        # A redirect goes to a signed CDN URL: it must not receive the token.
        same_host = url.startswith(self.endpoint)
        return url, (headers if same_host else {})

    def _send(self, method: str, url: str, headers: dict, *, path: str):
        attempt = 0
        while True:
            try:
                r = get_session().request(method, url, headers=headers, follow_redirects=False)
            except Exception as e:  # connection reset, timeout …: retry
                attempt = self._backoff(attempt, f"{path}: {type(e).__name__}", None)
                continue
            if r.status_code in RETRY_STATUS:
                attempt = self._backoff(attempt, f"{path}: HTTP {r.status_code}", r.headers.get("retry-after"))
                continue
            if r.status_code >= 400:
                self._raise(r, path)
            return r

    def _raise(self, response, path: str):
        from huggingface_hub.utils import hf_raise_for_status

        try:
            hf_raise_for_status(response)
        except HfHubHTTPError as e:
            if response.status_code == 404 and response.headers.get("x-error-code") == "EntryNotFound":
                raise InputError(f"{path} is listed in {self.repo_id} but cannot be downloaded") from None
            raise explain(e, self.repo_id, what="source repo") from None
        raise HubError(f"unexpected HTTP {response.status_code} reading {path} from {self.repo_id}")

    def _backoff(self, attempt: int, why: str, retry_after: str | None) -> int:
        attempt += 1
        if attempt > RETRIES:
            raise HubError(f"giving up after {RETRIES} retries reading from {self.repo_id} ({why})")
        delay = min(0.25 * 2 ** (attempt - 1), 8.0) * (0.5 + random.random())
        if retry_after:
            delay = max(delay, _parse_retry_after(retry_after))
        log.debug("retry %d in %.1fs: %s", attempt, delay, why)
        time.sleep(delay)
        return attempt

    def _fetch(self, path: str, span: Span, out: memoryview) -> None:
        """One range request, resumed where it broke off on a dropped connection."""
        got = 0
        attempt = 0
        while got < span.size:
            url, headers = self._resolve(path)
            want = Span(span.start + got, span.end)
            h = {**headers, "Range": f"bytes={want.start}-{want.end - 1}", "Accept-Encoding": "identity"}
            try:
                with get_session().stream("GET", url, headers=h, follow_redirects=False) as r:
                    if r.status_code in RETRY_STATUS:
                        attempt = self._backoff(attempt, f"{path}: HTTP {r.status_code}", r.headers.get("retry-after"))
                        continue
                    if r.status_code == 403 and url != f"{self.endpoint}/{self.repo_id}/resolve/{self.commit}/{path}":
                        with self._lock:  # a signed URL expired: resolve again
                            self._urls.pop(path, None)
                        attempt = self._backoff(attempt, f"{path}: signed URL expired", None)
                        continue
                    if r.status_code >= 400:
                        r.read()
                        self._raise(r, path)
                    self._check_range(r, path, want)
                    with self._lock:
                        self.requests += 1
                    # Raw blocks as the socket delivers them: a third less CPU than iter_bytes'
                    # re-chunking, and the body is exact file bytes (_check_range refused any
                    # Content-Encoding).
                    for block in r.iter_raw():
                        n = min(len(block), span.size - got)
                        out[got : got + n] = block[:n]
                        got += n
                        with self._lock:
                            self.bytes_fetched += n
                    if got < span.size:
                        raise ConnectionError("body ended early")
            except (HubError, InputError):
                raise
            except Exception as e:  # dropped mid-body: keep what arrived, ask for the rest
                attempt = self._backoff(attempt, f"{path}: {type(e).__name__} after {got} bytes", None)

    def _check_range(self, r, path: str, want: Span) -> None:
        if r.status_code != 206:
            raise RangeError(
                f"{path}: the server answered HTTP {r.status_code} to a range request instead of "
                "206; refusing to download whole files"
            )
        encoding = r.headers.get("content-encoding", "identity").lower()
        if encoding != "identity":
            raise RangeError(f"{path}: the server sent a {encoding}-encoded body to a range request")
        expected = f"bytes {want.start}-{want.end - 1}/"
        content_range = r.headers.get("content-range", "")
        length = r.headers.get("content-length")
        if not content_range.startswith(expected) or (length is not None and int(length) != want.size):
            raise RangeError(
                f"{path}: asked for bytes {want.start}-{want.end - 1}, server sent "
                f"{content_range or 'no Content-Range'} ({length} bytes)"
            )

    def read_into(self, path: str, span: Span, out: memoryview) -> None:
        self.read_spans_into(path, [span], [out])

    def read_spans_into(self, path: str, spans: list[Span], outs: list[memoryview]) -> None:
        if path not in self._files:
            raise InputError(f"{path} is not in {self.repo_id}@{self.commit}")
        tasks = []
        for span, out in zip(spans, outs):
            out = out.cast("B") if out.format != "B" else out
            for start in range(span.start, span.end, self.chunk_bytes):
                end = min(start + self.chunk_bytes, span.end)
                part = out[start - span.start : end - span.start]
                tasks.append(self._pool.submit(self._fetch, path, Span(start, end), part))
        errors = [t.exception() for t in tasks]
        for err in errors:
            if err is not None:
                raise err

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _parse_retry_after(value: str) -> float:
    try:
        return min(float(value), 60.0)
    except ValueError:
        parsed = email.utils.parsedate_to_datetime(value)
        return max(0.0, min(parsed.timestamp() - time.time(), 60.0)) if parsed else 1.0


# --- sink --------------------------------------------------------------------------------------


class _BufferedShard(ShardWriter):
    """A shard assembled in memory, uploaded (LFS or Xet) as soon as it is complete.

    On Linux the buffer is an anonymous in-memory file (memfd): huggingface_hub uploads it by
    path, so the shard is never copied into a second buffer. Elsewhere it is a bytearray, copied
    once into the bytes huggingface_hub needs.
    """

    def __init__(self, sink: "HubSink", name: str, size: int):
        super().__init__(name, size)
        self.sink = sink
        self.fd = -1
        if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd") and size > 0:
            self.fd = os.memfd_create(f"streamer-{os.path.basename(name)}")
            os.ftruncate(self.fd, size)
            self.buf = mmap.mmap(self.fd, size)
        else:
            self.buf = bytearray(size)

    def write_at(self, offset: int, data) -> None:
        view = memoryview(data).cast("B")
        self.buf[offset : offset + len(view)] = view

    def close(self) -> Future:
        if self.fd >= 0:
            self.buf.close()
            self.buf = None
            return self.sink._upload_pool.submit(self._upload_fd)
        data, self.buf = bytes(self.buf), None
        return self.sink._upload_pool.submit(self.sink._preupload, self.name, data)

    def _upload_fd(self) -> str:
        try:
            return self.sink._preupload(self.name, f"/proc/self/fd/{self.fd}")
        finally:
            os.close(self.fd)
            self.fd = -1

    def discard(self) -> None:
        if self.fd >= 0:
            if self.buf is not None:
                self.buf.close()
            os.close(self.fd)
            self.fd = -1
        self.buf = None


class HubSink(Sink):
    """Shards are uploaded as content while the run goes on; the branch moves once, at commit."""

    buffers_shards = True

    def __init__(
        self,
        repo_id: str,
        *,
        token: str | None = None,
        revision: str | None = None,
        private: bool = False,
        create_pr: bool = False,
        overwrite: bool = False,
        endpoint: str | None = None,
        upload_workers: int = 4,
    ):
        self.repo_id = repo_id
        self.endpoint = _endpoint(endpoint)
        self.api = HfApi(endpoint=self.endpoint, token=token)
        self.revision = revision or "main"
        self.private = private
        self.create_pr = create_pr
        self.overwrite = overwrite
        self.label = repo_id
        self.url = f"{self.endpoint}/{repo_id}"
        self._ops: dict[str, CommitOperationAdd] = {}
        self._deletes: list[str] = []
        self._lock = threading.Lock()
        self._upload_pool = ThreadPoolExecutor(upload_workers, thread_name_prefix="streamer-upload")
        self._parent: str | None = None
        self.bytes_uploaded = 0

    def check(self) -> None:
        """Refuse what must not be written; creates nothing (a dry run stays a dry run)."""
        try:
            me = self.api.whoami()
        except HfHubHTTPError as e:
            raise explain(e, self.repo_id, what="target repo") from None
        except Exception as e:  # no token at all
            raise HubError(f"writing to the Hub needs a token: pass --token or set HF_TOKEN ({type(e).__name__})") from None
        namespace = self.repo_id.split("/")[0]
        mine = [me.get("name")] + [o.get("name") for o in me.get("orgs") or []]
        role = ((me.get("auth") or {}).get("accessToken") or {}).get("role")
        if namespace not in mine:
            raise TargetError(
                f"no write access to {namespace!r}: this token belongs to {me.get('name')!r}"
                f"{' (orgs: ' + ', '.join(mine[1:]) + ')' if mine[1:] else ''}; pick a namespace you can write to"
            )
        if role == "read":
            raise TargetError("this token is read-only: writing to the Hub needs a write token")
        existing = self._existing_files()
        self._create_repo = existing is None
        self._create_branch = self.revision != "main" and self._parent is None
        existing = existing or {}
        model_files = [f for f in existing if f not in (".gitattributes",)]
        if model_files and not self.overwrite and not self.create_pr:
            if not self._written_by_streamer(existing):
                raise TargetError(
                    f"target {self.repo_id} already holds files that streamer did not write "
                    f"({', '.join(sorted(model_files)[:3])}…); choose another repo or pass --overwrite"
                )
        # Files of an earlier conversion that this one does not produce are deleted in the same
        # commit, so the target never mixes two conversions.
        self._existing = existing

    def begin(self) -> None:
        """Create the repo and branch the uploads need; abort() removes what this run created."""
        self._created: list[str] = []
        try:
            if getattr(self, "_create_repo", False):
                self.api.create_repo(self.repo_id, private=self.private, exist_ok=True)
                self._created.append("repo")
                self._existing_files()
            if getattr(self, "_create_branch", False) or (self.revision != "main" and self._parent is None):
                self.api.create_branch(self.repo_id, branch=self.revision, exist_ok=True)
                self._created.append("branch")
                self._existing_files()
        except HfHubHTTPError as e:
            raise explain(e, self.repo_id, what="target repo") from None

    def abort(self, *, cancelled: bool = False) -> None:
        """Nothing is committed, so the branch holds no partial model. A user's cancel also drops
        the repo or branch this run created; after a failure or Ctrl-C they stay, holding the
        uploaded shard contents that a rerun of the same command resumes from."""
        created = getattr(self, "_created", []) if cancelled else []
        try:
            if "repo" in created:
                self.api.delete_repo(self.repo_id, missing_ok=True)
            elif "branch" in created:
                self.api.delete_branch(self.repo_id, branch=self.revision)
        except Exception as e:  # best effort: the branch still holds no partial model
            log.warning("could not remove the empty %s created for this run: %s", created[0], type(e).__name__)
        self._created = []

    def _existing_files(self) -> dict[str, int] | None:
        try:
            info = self.api.model_info(self.repo_id, revision=self.revision, files_metadata=False)
        except RevisionNotFoundError:
            return {} if self._repo_exists() else None
        except RepositoryNotFoundError:
            return None
        except HfHubHTTPError as e:
            raise explain(e, self.repo_id, what="target repo") from None
        self._parent = info.sha
        return {s.rfilename: s.size or 0 for s in (info.siblings or [])}

    def _repo_exists(self) -> bool:
        try:
            self.api.model_info(self.repo_id)
            return True
        except HfHubHTTPError:
            return False

    def _written_by_streamer(self, existing: dict) -> bool:
        if "README.md" not in existing:
            return False
        text = self.read_text("README.md")
        return text is not None and read_provenance(text) is not None

    def read_text(self, path: str) -> str | None:
        """A small file of the target at the branch head, straight into memory (no HF cache)."""
        url = f"{self.endpoint}/{self.repo_id}/resolve/{self.revision}/{path}"
        try:
            r = get_session().get(url, headers=build_hf_headers(token=self.api.token), follow_redirects=True)
        except Exception:
            return None
        return r.text if r.status_code == 200 else None

    def open_shard(self, name: str, size: int) -> ShardWriter:
        check_relpath(name)
        return _BufferedShard(self, name, size)

    # -- resume: a rerun after a crash skips shards whose content the Hub already holds --------

    def _state_path(self, fingerprint: str):
        key = hashlib.sha256(f"{self.endpoint}|{self.repo_id}|{self.revision}|{fingerprint}".encode()).hexdigest()
        return Path(hf_constants.HF_HOME) / "streamer" / "uploads" / f"{key[:32]}.json"

    def resume(self, fingerprint: str, shards: list[str]) -> set[str]:
        """Shards recorded as uploaded by an earlier run of this exact plan, and still on the Hub.

        The record (a few hundred bytes per shard: name, sha256, size) is the only thing written
        to local disk; the shards themselves are never read, quantized or uploaded again.
        """
        from huggingface_hub.lfs import UploadInfo, post_lfs_batch_info

        self._state = self._state_path(fingerprint)
        try:
            record = json.loads(self._state.read_text())
        except (OSError, ValueError):
            record = {}
        record = {k: v for k, v in record.items() if k in shards}
        if not record:
            return set()
        infos = {
            name: UploadInfo(sha256=bytes.fromhex(r["sha256"]), size=r["size"], sample=base64.b64decode(r["sample"]))
            for name, r in record.items()
        }
        try:
            actions, errors, _ = post_lfs_batch_info(
                upload_infos=list(infos.values()), token=self.api.token, repo_type="model",
                repo_id=self.repo_id, revision=self.revision, endpoint=self.endpoint,
            )  # fmt: skip
        except Exception:
            return set()  # cannot confirm: convert those shards again, nothing is lost
        missing = {a["oid"] for a in actions if a.get("actions")} | {e.get("oid") for e in errors}
        reused = set()
        for name, info in infos.items():
            if info.sha256.hex() in missing:
                continue
            op = CommitOperationAdd(path_in_repo=name, path_or_fileobj=b"")
            op.upload_info = info
            op._upload_mode = "lfs"
            op._is_uploaded = True
            with self._lock:
                self._ops[name] = op
            reused.add(name)
        if reused:
            log.info("resuming: %d shard(s) already on the Hub are not converted again", len(reused))
        return reused

    def _remember(self, name: str, op: CommitOperationAdd) -> None:
        path = getattr(self, "_state", None)
        if path is None:
            return
        with self._lock:
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError):
                record = {}
            info = op.upload_info
            record[name] = {"sha256": info.sha256.hex(), "size": info.size, "sample": base64.b64encode(info.sample).decode()}
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(record))
            os.replace(tmp, path)

    def _preupload(self, name: str, data: bytes | str) -> str:
        """Upload one shard's content (bytes, or a path to it) ahead of the commit."""
        op = CommitOperationAdd(path_in_repo=name, path_or_fileobj=data)
        del data
        try:
            # Upload the content now (Xet when hf_xet is installed, else LFS); the commit later
            # only references it. Content the server already has is skipped: that is the resume.
            self.api.preupload_lfs_files(self.repo_id, [op], revision=self.revision, free_memory=True)
        except HfHubHTTPError as e:
            raise explain(e, self.repo_id, what="target repo") from None
        with self._lock:
            self._ops[name] = op
            self.bytes_uploaded += op.upload_info.size
        self._remember(name, op)
        log.debug("uploaded %s", name)
        return name

    def put_file(self, path: str, data: bytes) -> None:
        check_relpath(path)
        with self._lock:
            self._ops[path] = CommitOperationAdd(path_in_repo=path, path_or_fileobj=bytes(data))

    def commit(self, message: str, description: str = "") -> str:
        from huggingface_hub import CommitOperationDelete

        ops = list(self._ops.values())
        produced = set(self._ops)
        stale = [f for f in getattr(self, "_existing", {}) if f not in produced and f != ".gitattributes"]
        ops += [CommitOperationDelete(path_in_repo=f) for f in stale]
        try:
            info = self.api.create_commit(
                self.repo_id,
                operations=ops,
                commit_message=message,
                commit_description=description,
                revision=self.revision,
                create_pr=self.create_pr,
                parent_commit=None if self.create_pr else self._parent,
            )
        except HfHubHTTPError as e:
            if getattr(e.response, "status_code", None) == 412:
                raise TargetError(
                    f"{self.repo_id}@{self.revision} changed while converting; run again"
                ) from None
            raise explain(e, self.repo_id, what="target repo") from None
        self.url = info.pr_url or info.commit_url
        state = getattr(self, "_state", None)
        if state is not None:
            state.unlink(missing_ok=True)
        return self.url

    def close(self) -> None:
        self._upload_pool.shutdown(wait=True, cancel_futures=True)

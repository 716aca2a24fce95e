"""A Hub repo as a Sink: shards are uploaded while the run goes on, and published in one commit.

Each output shard is assembled in memory (`_BufferedShard`) and uploaded as content (Xet or LFS)
the moment it is complete, by a few daemon threads (`_UploadThreads`); the branch moves once, at
commit, so it never holds a partial model. Every upload is recorded in an UploadJournal, so a rerun
after a crash skips the shards the Hub already holds. All Hub calls go through hub_http's retry
policy.

Uploads report their bytes as they go (ShardWriter.on_bytes) and stop within a fraction of a
second when the run stops: an LFS upload reads the shard through `_ShardReader`, which counts
and refuses to read on; a Xet upload runs in its own hf_xet upload commit (`_DirectXet`), whose
progress callback counts and whose abort() ends it.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import logging
import mmap
import os
import queue
import threading
import time
from concurrent.futures import Future
from typing import Callable, Sequence

from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import (
    HfHubHTTPError,
    LocalTokenNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.lfs import UploadInfo, post_lfs_batch_info
from huggingface_hub.utils import build_hf_headers

from streamer.errors import Cancelled, Hint, HubError, Note, StreamerError, TargetError
from streamer.formats import hub_token
from streamer.io.hub_http import (
    account_name,
    classify,
    content_ids,
    explain,
    hub_call,
    hub_endpoint,
    own_pull_request,
    pr_refs,
    read_text,
    retry_wait,
    short_error,
)
from streamer.io.provenance import read_provenance
from streamer.io.sink import ShardWriter, Sink, check_relpath
from streamer.io.upload_journal import UploadJournal

log = logging.getLogger("streamer")


def uploaded_operation(path_in_repo: str, info: UploadInfo) -> CommitOperationAdd:
    """A commit operation adding PATH_IN_REPO with content the Hub already holds, known by INFO.

    One of the two places streamer touches huggingface_hub's internals (the other: `_DirectXet`),
    because it has no public way to say "this content was uploaded by an earlier process": a
    resumed run commits shards that an interrupted run uploaded (and a Xet upload of our own,
    one uploaded by this process). It sets two private fields of CommitOperationAdd: `_upload_mode`
    "lfs" (commit the file as a pointer to LFS/Xet content, without asking the Hub how to upload
    it) and `_is_uploaded` (preupload_lfs_files and create_commit send no content).
    tests/test_hub.py pins that the installed huggingface_hub still reads them so.
    """
    op = CommitOperationAdd(path_in_repo=path_in_repo, path_or_fileobj=b"")
    op.upload_info = info
    op._upload_mode = "lfs"
    op._is_uploaded = True
    return op


class _UploadThreads:
    """A few daemon threads running uploads. Unlike ThreadPoolExecutor's workers (joined when
    the interpreter exits), an upload that a stopping run abandons cannot keep the process alive:
    Ctrl-C or a failed upload ends the run at once instead of after every transfer in flight."""

    def __init__(self, workers: int, prefix: str):
        self._workers = workers
        self._prefix = prefix
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._unfinished: set[Future] = set()

    @property
    def unfinished(self) -> int:
        """Uploads submitted and not finished (queued or in flight)."""
        with self._lock:
            return len(self._unfinished)

    def submit(self, fn, *args) -> Future:
        fut: Future = Future()
        with self._lock:
            self._unfinished.add(fut)
            if len(self._threads) < self._workers:
                t = threading.Thread(target=self._work, name=f"{self._prefix}-{len(self._threads)}", daemon=True)
                self._threads.append(t)
                t.start()
        self._queue.put((fut, fn, args))
        return fut

    def fail_pending(self, error: BaseException) -> None:
        """Resolve every unfinished upload's future with ERROR now: whoever waits on one (the
        pipeline waits on them in order) learns at once that the run is over, instead of after
        the transfers still in flight. Their threads finish (or give up) in the background."""
        with self._lock:
            pending, self._unfinished = list(self._unfinished), set()
        for fut in pending:
            try:
                fut.set_exception(error)
            except Exception:  # finished meanwhile: its own outcome stands
                pass

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            fut, fn, args = item
            try:
                # A future fail_pending already resolved still runs its task: a stopped sink
                # makes it return at once, and it frees what it holds (the shard's memfd).
                if not (fut.done() or fut.set_running_or_notify_cancel()):
                    continue  # cancelled by its owner
                try:
                    result = fn(*args)
                except BaseException as e:  # handed to whoever waits on the future
                    outcome = (fut.set_exception, e)
                else:
                    outcome = (fut.set_result, result)
                try:
                    outcome[0](outcome[1])
                except Exception:  # fail_pending resolved it first
                    pass
            except Exception:  # a future in an unexpected state: never kill the worker
                pass
            finally:
                with self._lock:
                    self._unfinished.discard(fut)

    def shutdown(self, *, wait: bool) -> None:
        with self._lock:
            threads = list(self._threads)
        for _ in threads:
            self._queue.put(None)
        if wait:
            for t in threads:
                t.join()


def _xet_possible() -> bool:
    """Whether huggingface_hub may upload through hf_xet (which reads the file itself, from Rust)."""
    if getattr(hf_constants, "HF_HUB_DISABLE_XET", False):
        return False
    # huggingface_hub's own test (is_xet_available: the same two facts) left huggingface_hub.utils in 2.x
    return importlib.util.find_spec("hf_xet") is not None


class _DirectXet:
    """What a Xet upload of one shard in an upload commit of its own needs (hf_xet >= 1.8's
    XetSession, and huggingface_hub's session and token-URL helpers of the same era); None from
    `load` where the installed versions lack them (huggingface_hub then uploads, unstoppable and
    with no progress before the end).

    The second place streamer touches huggingface_hub's internals (`utils._xet`, the helpers its
    own `_upload_xet_files` uses): preupload_lfs_files cannot report progress (its bars aside)
    nor stop one upload (only every Xet transfer of the process), and a commit of our own can.
    tests/test_progress_granularity.py uploads through it."""

    def __init__(self, hf_xet, helpers):
        self.hf_xet = hf_xet
        self.session = helpers.get_xet_session
        self.refresh_url = helpers.xet_connection_info_refresh_url
        self.write = helpers.XetTokenType.WRITE
        self.without_auth = helpers.xet_headers_without_auth

    @staticmethod
    def load() -> "_DirectXet | None":
        if not _xet_possible():
            return None
        try:
            import hf_xet
            from huggingface_hub.utils import _xet as helpers
        except ImportError:
            return None
        needed = ("get_xet_session", "xet_connection_info_refresh_url", "XetTokenType", "xet_headers_without_auth")
        if not all(hasattr(helpers, n) for n in needed) or not hasattr(hf_xet, "COMPUTE_SHA256"):
            return None
        if not hasattr(getattr(hf_xet, "XetSession", None), "new_upload_commit"):
            return None
        return _DirectXet(hf_xet, helpers)


# The repos this process's sinks are about to write or writing to (from check() to close()), and those a
# failed run left its uploads in for a rerun: a run that ends for good must not delete a new repo
# that another conversion of this process (a mirror's parallel job, another user of a Space)
# still uploads to or keeps work in. Runs in other processes leave nothing to see until they commit.
_WRITING: dict[str, int] = {}
_KEPT: set[str] = set()
_WRITING_LOCK = threading.Lock()


class _Stopped(Exception):
    """Raised inside an upload when the sink stops (never seen outside this module)."""


class _UploadMeter:
    """Reports a shard's bytes as they upload to ON_BYTES (ShardWriter.on_bytes): the furthest
    any attempt got, so a retry that sends again what a failed attempt sent counts those bytes
    once, and never more than SIZE; a few calls a second at most; nothing once STOP is set."""

    EVERY_S = 0.25

    def __init__(self, size: int, on_bytes: Callable[[int], None] | None, stop: threading.Event):
        self.size = size
        self.on_bytes = on_bytes
        self.stop = stop
        self.best = 0  # the furthest an attempt got
        self.reported = 0
        self.last = time.monotonic()
        self.lock = threading.Lock()

    def reach(self, sent: int, *, flush: bool = False) -> None:
        """An attempt has sent SENT bytes of the shard (FLUSH: report now, not in a while)."""
        if self.on_bytes is None:
            return
        with self.lock:
            self.best = max(self.best, min(sent, self.size))
            now = time.monotonic()
            due = flush or self.best == self.size or now - self.last >= self.EVERY_S
            if due and self.best > self.reported and not self.stop.is_set():
                n, self.reported, self.last = self.best - self.reported, self.best, now
                self.on_bytes(n)

    def finish(self) -> None:
        """The shard is on the Hub (content it already held counts as sent)."""
        self.reach(self.size, flush=True)


class _ShardReader(io.BufferedIOBase):
    """A shard's bytes (a memfd, read with pread, or bytes) as the file object an LFS upload
    streams: each read tells METER how far the upload got, and once STOP is set a read raises,
    which ends the request at once (huggingface_hub does not retry an error of its file).
    The memfd stays its owner's: closing the reader never closes it."""

    def __init__(self, content: bytes | int, size: int, stop: threading.Event):
        super().__init__()
        self._content = content
        self._size = size
        self._stop = stop
        self._pos = 0
        self.meter: _UploadMeter | None = None  # set once hashing is done: only uploads count

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def read(self, n: int | None = -1) -> bytes:
        if self._stop.is_set():
            raise _Stopped()
        end = self._size if n is None or n < 0 else min(self._size, self._pos + n)
        if end <= self._pos:
            return b""
        if isinstance(self._content, int):
            chunk = os.pread(self._content, end - self._pos, self._pos)
        else:
            chunk = self._content[self._pos : end]
        self._pos += len(chunk)
        if self.meter is not None:
            self.meter.reach(self._pos)
        return chunk

    def read1(self, n: int = -1) -> bytes:
        return self.read(n)


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
        # Another shard's upload failed for good: stop producing this one now, not after the
        # whole model has been read and quantized for nothing.
        self.sink.raise_if_failed()
        view = memoryview(data).cast("B")
        self.buf[offset : offset + len(view)] = view

    def close(self) -> Future:
        if self.fd >= 0:
            self.buf.close()
            self.buf = None
            return self.sink._upload_pool.submit(self._upload_fd)
        data, self.buf = bytes(self.buf), None
        return self.sink._upload_pool.submit(self.sink._preupload, self.name, data, self.notes, self.on_bytes)

    def _upload_fd(self) -> str:
        try:
            return self.sink._preupload(self.name, self.fd, self.notes, self.on_bytes)
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


def _git_blob_oid(data: bytes) -> str:
    """The git object id of a regular (non-LFS) file, as the Hub reports it in `blobId`."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _holds_content(entry: tuple[str | None, str | None], data: bytes) -> bool:
    """Whether a tree entry (LFS sha256 or None, git blob id) is the content DATA (an entry
    without either id is not known to be)."""
    lfs_sha, blob_id = entry
    if lfs_sha is not None:
        return lfs_sha == hashlib.sha256(data).hexdigest()
    return blob_id is not None and blob_id == _git_blob_oid(data)


class HubSink(Sink):
    """Branch REVISION (None: main) of the Hub repo REPO_ID as a destination: shards are uploaded
    as content while the run goes on; the branch moves once, at commit.

    TOKEN False sends no token (and so cannot write); None lets huggingface_hub pick HF_TOKEN or
    the login cache. PRIVATE is the visibility of a repo this run creates (an existing repo keeps
    its own); None means public. CREATE_PR opens the commit as a pull request; OVERWRITE replaces
    a target that streamer did not write. ENDPOINT is the Hub's URL (None: HF_ENDPOINT);
    UPLOAD_WORKERS shards upload at once.
    """

    buffers_shards = True

    def __init__(
        self,
        repo_id: str,
        *,
        token: str | bool | None = None,
        revision: str | None = None,
        private: bool | None = False,
        create_pr: bool = False,
        overwrite: bool = False,
        endpoint: str | None = None,
        upload_workers: int = 4,
    ):
        self.repo_id = repo_id
        self.endpoint = hub_endpoint(endpoint)
        self.api = HfApi(endpoint=self.endpoint, token=hub_token(token))
        self.revision = revision or "main"
        self.private = bool(private)
        self.create_pr = create_pr
        self.overwrite = overwrite
        self.label = repo_id
        self.url = f"{self.endpoint}/{repo_id}"
        self._ops: dict[str, CommitOperationAdd] = {}
        self._git_oids: dict[str, str] = {}  # small files: their git blob id, to compare with the Hub's
        self._lock = threading.Lock()
        self._upload_pool = _UploadThreads(upload_workers, "streamer-upload")
        self._xet_commits: set = set()  # hf_xet upload commits in flight: abort() ends them
        self._stop = threading.Event()  # set when the run stops: uploads give up
        self._failure: BaseException | None = None  # the first upload that failed for good
        self._parent: str | None = None
        self._remote: dict | None = None  # the branch head's files with their oids
        self._card: str | None = None  # the branch head's README.md, when check() read it
        self._target_private: bool | None = None
        # What check() found, and what begin() created (removed again by a final abort()).
        self._existing: dict[str, int] = {}  # the target's files before this run
        self._create_repo = False
        self._create_branch = False
        self._created: list[str] = []
        self._leftover: list[str] = []  # what a final abort() leaves settle() to remove
        self._kept = False  # abort() kept uploaded shards for a rerun (see keeps_work)
        self._repo_key = repo_id.lower()  # the Hub's repo names ignore case
        self._writing = False  # counted in _WRITING (from check() to close())
        self._created_head: str | None = None  # the head commit of what begin() created
        self._journal: UploadJournal | None = None  # set by resume() when the plan can resume
        self._journal_lock = threading.Lock()
        self._forgotten = False  # the record was dropped (a final abort): nothing is added again
        self.bytes_uploaded = 0

    def _call(self, what: str, fn, *args, **kwargs):
        return hub_call(what, fn, *args, where=self.endpoint, **kwargs)

    def check(self) -> None:
        """Refuse what must not be written; creates nothing (a dry run stays a dry run). From here
        to close() the repo counts as written to by this process (see _WRITING)."""
        self._check()
        if not self._writing:
            with _WRITING_LOCK:
                _WRITING[self._repo_key] = _WRITING.get(self._repo_key, 0) + 1
            self._writing = True

    def _check(self) -> None:
        try:
            me = self._call("checking the token (whoami)", self.api.whoami)
        except HfHubHTTPError as e:
            raise explain(e, self.repo_id, what="target repo") from None
        except (LocalTokenNotFoundError, ValueError) as e:  # no token at all, or token=False
            raise HubError(f"writing to the Hub needs a token ({type(e).__name__})", hints=(Hint("token"),)) from None
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
        if model_files and self.revision != "main" and self._branch_is_a_copy_of_main():
            # A branch with no commit of its own (left by an interrupted first run, or made by
            # hand for this): its files are main's, and the commit takes them off the branch.
            model_files = []
        if model_files and not self.overwrite and not self.create_pr:
            if not self._written_by_streamer(existing):
                raise TargetError(
                    f"target {self.repo_id} already holds files that streamer did not write "
                    f"({', '.join(sorted(model_files)[:3])}…)",
                    hints=(Hint("target"), Hint("overwrite")),
                )
        # Files of an earlier conversion that this one does not produce are deleted in the same
        # commit, so the target never mixes two conversions.
        self._existing = existing

    def visibility_note(self, source_private: bool = False) -> Note | None:
        """Who will see the result (after check()); None when there is nothing to say.

        SOURCE_PRIVATE: the source is private or gated."""
        if self._create_repo:
            if self.private and source_private:  # the hint: how to publish it anyway
                return Note(
                    f"target {self.repo_id} will be created as a private repo because the source is private or gated",
                    hints=(Hint("public"),),
                )  # fmt: skip
            if self.private:
                return Note(f"target {self.repo_id} will be created as a private repo")
            as_asked = ", as asked, although the source is private or gated" if source_private else ""
            return Note(f"target {self.repo_id} will be created as a public repo{as_asked}")
        if self._target_private is False and source_private:
            return Note(
                f"warning: target {self.repo_id} exists and is public, and the source is private or gated: "
                "everyone will be able to read the converted weights"
            )
        return None

    def begin(self) -> None:
        """Create the repo and branch the uploads need; abort() removes what this run created."""
        self._created = []
        try:
            # Created by this run only when the Hub says it created it: a repo or branch that
            # another run (another user of a Space) created since check() is not ours to remove
            # on a cancel.
            if self._create_repo:
                if self._create("repo", self.api.create_repo, private=self.private):
                    self._created.append("repo")
                self._existing = self._existing_files() or {}
                # the commit the new repo starts at: what abort() must find if the branch fails next
                self._created_head = self._parent if self._parent is not None else self._main_head()
            if self._create_branch or (self.revision != "main" and self._parent is None):
                if self._create(f"branch {self.revision}", self.api.create_branch, branch=self.revision):
                    self._created.append("branch")
                # A new branch starts as a copy of main: main's files go in this run's commit, so
                # the branch holds this conversion alone (main keeps them).
                self._existing = self._existing_files() or {}
            self._created_head = self._parent
        except HfHubHTTPError as e:
            raise explain(e, self.repo_id, what="target repo") from None

    def _create(self, what: str, fn, **kwargs) -> bool:
        """Create WHAT (the repo, or a branch) with FN; False when it exists already (409)."""
        try:
            self._call(f"creating {what} of {self.repo_id}", fn, self.repo_id, exist_ok=False, **kwargs)
        except HfHubHTTPError as e:
            if getattr(e.response, "status_code", None) != 409:
                raise
            log.info("%s of %s was created meanwhile by someone else: it stays after a cancel", what, self.repo_id)
            return False
        return True

    def _stop_uploads(self) -> int:
        """Make every upload give up now; returns how many were queued or in flight.

        An LFS upload's next read raises (`_ShardReader`); a Xet upload's commit is aborted, which
        ends its transfers and its wait at once. (Only where the installed hf_xet is too old for
        `_DirectXet` does a Xet upload run on to its end, in a daemon thread nobody waits for:
        its content is then neither recorded nor committed, see `_preupload`.)"""
        self._stop.set()
        with self._lock:
            commits = list(self._xet_commits)
        for commit in commits:
            try:
                commit.abort()
            except Exception:  # finished or failed meanwhile
                pass
        return self._upload_pool.unfinished

    def _fail(self, error: BaseException) -> None:
        with self._lock:
            if self._failure is None:
                self._failure = error
        self._stop_uploads()
        self._upload_pool.fail_pending(self._stopped_error())

    def raise_if_failed(self) -> None:
        """Raise the error of the upload that failed for good, if one did: the run is over."""
        if self._failure is not None:
            raise self._stopped_error()

    def _stopped_error(self) -> BaseException:
        failure = self._failure
        if failure is not None:
            # The same sentence for every shard, so whichever the run looks at first says what
            # went wrong (not "cancelled").
            if isinstance(failure, StreamerError):
                return HubError(failure.message, hints=failure.hints)
            return HubError(str(failure))
        return Cancelled("upload stopped: the run is stopping")

    def abort(self, *, resumable: bool = True) -> None:
        """Nothing is committed, so the branch holds no partial model. After a failure or a
        Ctrl-C (RESUMABLE) the repo or branch this run created stays, holding the uploaded shard
        contents that a rerun resumes from; a run that ends for good (a user's cancel, an input
        refused before any shard was up) leaves them to settle() to remove."""
        pending = self._stop_uploads()
        if pending and self._failure is None:
            log.warning("stopping %d upload(s) in flight: nothing is committed to %s", pending, self.repo_id)
        self._upload_pool.fail_pending(self._stopped_error())
        self._kept = resumable and self.delivered() > 0
        if resumable:
            if self._created and self.delivered():
                what, drop = ((self.repo_id, "delete it from its settings page") if "repo" in self._created
                              else (f"branch {self.revision} of {self.repo_id}", "delete the branch"))  # fmt: skip
                log.warning("%s was created for this run and stays, with nothing committed: a rerun of the same "
                            "plan reuses its %d uploaded shard(s) (or %s)",
                            what, self.delivered(), drop)  # fmt: skip
        else:
            # Nothing will resume from the record, and it names the tensors of a possibly private
            # model on what may be a shared machine (a Space).
            self._forget_state()
            self._leftover = self._created
        self._created = []

    def keeps_work(self) -> bool:
        """After abort(): whether the repo holds this run's uploaded shards for a rerun to resume."""
        return self._kept

    def settle(self, siblings: Sequence[Sink] = (), *, last: bool = True) -> None:
        """After abort(), once SIBLINGS (the other targets of the same run) are done too: remove
        the repo or branch this run created for nothing, unless written to since (a commit,
        branch, tag or pull request of anyone else's, a sibling's commit) or kept by a sibling
        for its resume; a repo that must stay loses only the branch made for this run. Not LAST
        (a first round over the siblings): a repo whose removal a sibling's branch still blocks
        waits for the next round, when that branch may be gone."""
        created = self._leftover
        if not created:
            return
        with _WRITING_LOCK:  # another conversion of this process writes there, or kept its uploads there
            busy = _WRITING.get(self._repo_key, 0) - self._writing > 0 or self._repo_key in _KEPT
        shared = busy or any(
            s is not self and isinstance(s, HubSink) and s._repo_key == self._repo_key and s.keeps_work() for s in siblings
        )
        what = "repo" if "repo" in created else f"branch {self.revision}"
        try:
            if "repo" in created and not shared and self._as_created(created):
                self._call(f"deleting {self.repo_id}", self.api.delete_repo, self.repo_id, missing_ok=True)
            elif "repo" in created and not shared and not last:
                return  # the next round
            elif "branch" in created and self._as_created(["branch"]):
                if "repo" in created:  # the repo holds someone else's work now: only our branch goes
                    log.info("the repo %s created for this run stays (another target or run uses it), "
                             "without the branch %s made for this run", self.repo_id, self.revision)  # fmt: skip
                self._call(f"deleting branch {self.revision}", self.api.delete_branch, self.repo_id, branch=self.revision)
            elif not shared:
                log.warning("the %s created for this run has been written to since (by another target or run): "
                            "it stays", what)
        except Exception as e:  # best effort: the branch still holds no partial model
            log.warning("could not remove the empty %s created for this run: %s", what, type(e).__name__)
        self._leftover = []

    def _as_created(self, created: list[str]) -> bool:
        """Whether CREATED (what begin() created: ["repo", "branch"], or ["branch"]) is as begin()
        left it: no commit, branch, tag or pull request since (another target of a fan-out into
        branches of one new repo, another run) that deleting it would take with it."""
        refs = self._call(
            f"listing the refs of {self.repo_id}", self.api.list_repo_refs, self.repo_id, include_pull_requests=True,
        )  # fmt: skip
        heads = {b.name: b.target_commit for b in refs.branches}
        if "repo" not in created:
            return heads.get(self.revision) == self._created_head
        mine = {"main", self.revision}
        return set(heads) <= mine and set(heads.values()) == {self._created_head} and not refs.tags and not (
            getattr(refs, "pull_requests", None) or []
        )

    def _existing_files(self) -> dict[str, int] | None:
        try:
            info = self._call(
                f"reading {self.repo_id}'s files", self.api.model_info, self.repo_id,
                revision=self.revision, files_metadata=True,
            )  # fmt: skip
        except RevisionNotFoundError:
            return {} if self._repo_exists() else None
        except RepositoryNotFoundError:
            return None
        except HfHubHTTPError as e:
            raise explain(e, self.repo_id, what="target repo") from None
        self._parent = info.sha
        self._remote = content_ids(info)
        self._target_private = getattr(info, "private", None)
        return {s.rfilename: s.size or 0 for s in (info.siblings or [])}

    def _main_head(self) -> str | None:
        """The commit main points at (None when it cannot be read)."""
        try:
            return self._call(f"reading {self.repo_id}", self.api.model_info, self.repo_id, revision="main").sha
        except HfHubHTTPError:
            return None

    def _branch_is_a_copy_of_main(self) -> bool:
        """Whether the target branch (read by _existing_files) points at main's head commit."""
        try:
            main = self._call(f"reading {self.repo_id}", self.api.model_info, self.repo_id, revision="main")
        except (RepositoryNotFoundError, RevisionNotFoundError):
            return False
        except HfHubHTTPError as e:
            raise explain(e, self.repo_id, what="target repo") from None
        return main.sha is not None and main.sha == self._parent

    def _repo_exists(self) -> bool:
        try:
            info = self._call(f"reading {self.repo_id}", self.api.model_info, self.repo_id)
        except RepositoryNotFoundError:
            return False
        except HfHubHTTPError as e:
            raise explain(e, self.repo_id, what="target repo") from None
        self._target_private = getattr(info, "private", None)
        return True

    def holds(self, accepts: Callable[[dict | None], bool], files: dict, fingerprint: str | None = None) -> str | None:
        """The URL of the branch head's commit, or with create_pr of a pull request this account
        opened, that holds this very conversion (see Sink.holds). The branch is judged from the
        files check() listed at its head and one small GET of its card; each of the newest pull
        requests costs a listing of its files besides, and one of its history once all matched."""
        if self.overwrite:
            return None
        if self._parent is not None and self._tree_holds(
            self._remote or {}, self._existing, self._parent, accepts, files, card=self._card
        ):  # the branch itself (with create_pr: a pull request merged into it, say)
            url = self._commit_url(self._parent)
        elif self.create_pr and self._parent is not None:
            url = self._pr_holding(accepts, files)
        else:
            url = None
        if url is not None and fingerprint is not None:
            try:  # a record of a run that uploaded this very conversion and failed to commit it
                UploadJournal.for_plan(self.endpoint, self.repo_id, self.revision, fingerprint).forget()
            except OSError as e:
                log.warning("could not delete the stale resume record: %s", e)
        return url

    def _pr_holding(self, accepts: Callable[[dict | None], bool], files: dict) -> str | None:
        """The discussion URL of a pull request (open or closed) to the target branch that holds
        this conversion and whose newest commit is this account's (anyone may open a pull request
        with a card that says the same): a rerun of a `--create-pr` command must not open the same
        pull request again, whatever the branch did since (as a mirroring job's check decides)."""
        mine = None
        for ref in pr_refs(self.api, self.repo_id):
            try:
                info = self._call(
                    f"reading {self.repo_id}'s {ref}", self.api.model_info, self.repo_id, revision=ref, files_metadata=True
                )  # fmt: skip
            except HfHubHTTPError:  # a pull request that cannot be read holds nothing for this run
                continue
            sizes = {f.rfilename: f.size or 0 for f in (info.siblings or [])}
            if not self._tree_holds(content_ids(info), sizes, ref, accepts, files):
                continue
            if mine is None:
                mine = account_name(self.api) or ""
            if mine and own_pull_request(self.api, self.repo_id, ref, mine, self.revision or "main"):
                return f"{self.endpoint}/{self.repo_id}/discussions/{ref.rsplit('/', 1)[-1]}"
        return None

    def _tree_holds(
        self, tree: dict, sizes: dict[str, int], revision: str, accepts, files: dict, *, card: str | None = None
    ) -> bool:
        """Whether the files TREE (content ids) of SIZES at REVISION are exactly FILES beside a card
        whose streamer block ACCEPTS takes (see Sink.holds; CARD: its text when already read)."""
        if "README.md" not in tree or set(tree) - {".gitattributes", "README.md"} != set(files):
            return False
        later = {path: want for path, want in files.items() if callable(want)}
        for path, want in files.items():
            if isinstance(want, int):  # the size alone
                if sizes.get(path) != want:
                    return False
            elif path not in later and not _holds_content(tree[path], want):
                return False
        if card is None:
            card = read_text(self.repo_id, "README.md", revision=revision, token=self.api.token,
                             endpoint=self.endpoint, what="target repo")  # fmt: skip
        if not accepts(read_provenance(card)):
            return False
        return all(_holds_content(tree[path], read()) for path, read in later.items())

    def delivered(self) -> int:
        """Shards uploaded (or resumed) so far, not yet committed (see Sink.delivered)."""
        return len(self.uploaded())

    def _written_by_streamer(self, existing: dict) -> bool:
        if "README.md" not in existing:
            return False
        self._card = text = self.read_text("README.md")
        return text is not None and read_provenance(text) is not None

    def read_text(self, path: str) -> str | None:
        """The small file PATH of the target at the branch head, straight into memory (no HF
        cache); None when there is none."""
        return read_text(self.repo_id, path, revision=self.revision, token=self.api.token, endpoint=self.endpoint,
                         what="target repo")  # fmt: skip

    def open_shard(self, name: str, size: int) -> ShardWriter:
        """A shard held in memory and uploaded as soon as it is complete (see Sink.open_shard)."""
        check_relpath(name)
        self.raise_if_failed()
        return _BufferedShard(self, name, size)

    # -- resume: a rerun after a crash skips shards whose content the Hub already holds --------

    def resume(self, fingerprint: str, shards: list[str]) -> set[str]:
        """The SHARDS recorded as uploaded by an earlier run of the plan FINGERPRINT, and still on the Hub.

        The record (a few hundred bytes per shard: name, sha256, size) is the only thing written
        to local disk; the shards themselves are never read, quantized or uploaded again.
        """
        self._journal = UploadJournal.for_plan(self.endpoint, self.repo_id, self.revision, fingerprint)
        infos = self._journal.recorded(shards)
        if not infos:
            return set()
        try:
            actions, errors, _ = self._call(
                f"checking the uploads of an earlier run on {self.repo_id}",
                lambda: post_lfs_batch_info(
                    upload_infos=list(infos.values()), token=self.api.token, repo_type="model",
                    repo_id=self.repo_id, revision=self.revision, endpoint=self.endpoint,
                ),
            )  # fmt: skip
        except Exception:
            return set()  # cannot confirm: convert those shards again, nothing is lost
        missing = {a["oid"] for a in actions if a.get("actions")} | {e.get("oid") for e in errors}
        reused = set()
        for name, info in infos.items():
            if info.sha256.hex() in missing:
                continue
            with self._lock:
                self._ops[name] = uploaded_operation(name, info)
            reused.add(name)
        if reused:
            log.info("resuming: %d shard(s) already on the Hub are not converted again", len(reused))
        return reused

    def resumed_notes(self, name: str) -> dict:
        """The notes recorded with the resumed shard NAME (see Sink.resumed_notes)."""
        return self._journal.notes(name) if self._journal is not None else {}

    # -- shards uploaded by other processes: the nodes of a cluster (engine/cluster.py) ----------

    def uploaded(self) -> dict[str, UploadInfo]:
        """Shard name -> what the Hub knows its content by, for each shard this sink uploaded."""
        with self._lock:
            return {name: op.upload_info for name, op in self._ops.items() if name not in self._git_oids}

    def adopt(self, name: str, info: UploadInfo, notes: dict | None = None) -> None:
        """Commit the shard NAME, whose content INFO another process (a cluster node) uploaded to
        this repo's branch, with the others; recorded for resume (with NOTES) like a shard
        uploaded here."""
        check_relpath(name)
        with self._lock:
            self._ops[name] = uploaded_operation(name, info)
        self._record(name, info, notes)

    def _preupload(self, name: str, content: bytes | int, notes: dict | None = None,
                   on_bytes: Callable[[int], None] | None = None) -> str:
        """Upload one shard's content (bytes, or a memfd holding it) ahead of the commit, telling
        ON_BYTES of its bytes as they go; NOTES go into the resume record with it."""
        if self._stop.is_set():
            raise self._stopped_error()
        size = len(content) if isinstance(content, bytes) else os.fstat(content).st_size
        meter = _UploadMeter(size, on_bytes, self._stop)
        try:
            # Upload the content now; the commit later only references it. Content the server
            # already has is skipped (or, with Xet, deduplicated): that is the resume.
            direct = _DirectXet.load()
            if direct is not None:
                info = self._call(
                    f"uploading {name} to {self.repo_id}", self._upload_xet, direct, content, size, meter,
                    cancel=self._stop,
                )  # fmt: skip
                op = uploaded_operation(name, info)
            elif not _xet_possible():
                op = self._upload_lfs(name, content, size, meter)
            else:  # a Xet that only huggingface_hub drives: its progress shows at the end
                path = content if isinstance(content, bytes) else f"/proc/self/fd/{content}"
                op = CommitOperationAdd(path_in_repo=name, path_or_fileobj=path)
                self._call(
                    f"uploading {name} to {self.repo_id}", self.api.preupload_lfs_files, self.repo_id, [op],
                    revision=self.revision, free_memory=True, cancel=self._stop,
                )  # fmt: skip
            del content
        except Exception as e:
            if self._stop.is_set():  # stopped on purpose (an error of ours may follow from it)
                raise self._stopped_error() from None
            if isinstance(e, HfHubHTTPError):
                error: BaseException = explain(e, self.repo_id, what="target repo")
            elif isinstance(e, (HubError, TargetError)):
                error = e
            else:
                error = HubError(f"uploading {name} to {self.repo_id} failed ({short_error(e)}); run again to resume")
            # The first definitive failure ends the run: the other uploads stop now instead of
            # finishing (or retrying) for a commit that will not happen.
            self._fail(error)
            raise error from None
        if self._stop.is_set():  # the content may be cut short: never record it for a resume
            raise self._stopped_error()
        # The digest, now: huggingface_hub may hash lazily from the path, and once the memfd is
        # closed /proc/self/fd/N is gone (or is another file).
        op.upload_info.sha256  # noqa: B018
        meter.finish()
        with self._lock:
            self._ops[name] = op
            self.bytes_uploaded += op.upload_info.size
        self._record(name, op.upload_info, notes)
        log.debug("uploaded %s", name)
        return name

    def _upload_lfs(self, name: str, content: bytes | int, size: int, meter: _UploadMeter) -> CommitOperationAdd:
        """Upload CONTENT as LFS through preupload_lfs_files, read through a `_ShardReader`."""
        reader = _ShardReader(content, size, self._stop)
        op = CommitOperationAdd(path_in_repo=name, path_or_fileobj=reader)  # hashes it (not counted)
        reader.meter = meter

        def attempt() -> None:
            reader.seek(0)  # a failed attempt leaves the reader where it stopped
            self.api.preupload_lfs_files(self.repo_id, [op], revision=self.revision, free_memory=True)

        self._call(f"uploading {name} to {self.repo_id}", attempt, cancel=self._stop)
        return op

    def _upload_xet(self, direct: _DirectXet, content: bytes | int, size: int, meter: _UploadMeter) -> UploadInfo:
        """Upload CONTENT through Xet in an upload commit of its own, which `_stop_uploads` can
        abort; what the Hub will know the content by."""
        api = self.api
        headers = build_hf_headers(
            token=api.token, library_name=api.library_name, library_version=api.library_version,
            user_agent=api.user_agent, headers=api.headers,
        )  # fmt: skip
        url = direct.refresh_url(
            token_type=direct.write, repo_id=self.repo_id, repo_type="model", revision=self.revision,
            endpoint=self.endpoint,
        )  # fmt: skip

        def progress(report, *_) -> None:  # from hf_xet's threads, about ten times a second
            meter.reach(report.total_bytes_completed)

        commit = direct.session().new_upload_commit(
            token_refresh_url=url, token_refresh_headers=headers, custom_headers=direct.without_auth(headers),
            progress_callback=progress,
        )  # fmt: skip
        with self._lock:
            self._xet_commits.add(commit)
        try:
            if self._stop.is_set():  # stopped before the commit was registered
                raise _Stopped()
            compute = direct.hf_xet.COMPUTE_SHA256
            if isinstance(content, bytes):
                handle = commit.start_upload_bytes(content, sha256=compute)
                sample = content[:512]
            else:
                handle = commit.start_upload_file(f"/proc/self/fd/{content}", sha256=compute)
                sample = os.pread(content, 512, 0)
            commit.wait_to_finish()
            info = handle.result().xet_info
        except BaseException:
            with contextlib.suppress(Exception):  # already ended (aborted by _stop_uploads, or failed)
                commit.abort()
            raise
        finally:
            with self._lock:
                self._xet_commits.discard(commit)
        return UploadInfo(size=info.file_size, sample=sample, sha256=bytes.fromhex(info.sha256))

    def put_file(self, path: str, data: bytes) -> None:
        """Add the small file PATH with DATA to the commit (uploaded with it)."""
        check_relpath(path)
        data = bytes(data)
        with self._lock:
            self._ops[path] = CommitOperationAdd(path_in_repo=path, path_or_fileobj=data)
            self._git_oids[path] = _git_blob_oid(data)

    # -- the commit ------------------------------------------------------------------------------

    def _holds_exactly(self, tree: dict | None) -> bool:
        """Whether TREE (path -> (lfs sha256, git blob id)) is what this commit would leave:
        every file with our content, and nothing else but .gitattributes."""
        if tree is None or not self._ops:
            return False
        if set(tree) - {".gitattributes"} != set(self._ops) - {".gitattributes"}:
            return False
        for path, op in self._ops.items():
            lfs_sha, blob_id = tree.get(path, (None, None))
            if lfs_sha is not None:
                if lfs_sha != op.upload_info.sha256.hex():
                    return False
            elif blob_id is None or blob_id != self._git_oids.get(path):
                return False
        return True

    def _commit_url(self, sha: str) -> str:
        return f"{self.endpoint}/{self.repo_id}/commit/{sha}"

    def _pr_refs(self) -> set[str]:
        refs = self._call(
            f"listing the pull requests of {self.repo_id}", self.api.list_repo_refs, self.repo_id,
            include_pull_requests=True,
        )  # fmt: skip
        return {r.ref for r in (getattr(refs, "pull_requests", None) or [])}

    def _landed(self, prs_before: set[str] | None) -> str | None:
        """After a commit whose answer was lost: the URL of our commit if the Hub applied it.

        Decided from what the branch (or a new pull request) holds: a head that moved past the
        parent we committed on and holds exactly our files (same sha256 / git oids) is ours. A
        head still at the parent means nothing landed and the commit can be sent again (with
        parent_commit, so even a wrong guess is refused by the Hub instead of committed twice)."""
        what = f"reading {self.repo_id} after an unanswered commit"
        if prs_before is None:
            info = self._call(what, self.api.model_info, self.repo_id, revision=self.revision, files_metadata=True)
            if info.sha != self._parent and self._holds_exactly(content_ids(info)):
                return self._commit_url(info.sha)
            return None
        for ref in sorted(self._pr_refs() - prs_before):
            info = self._call(what, self.api.model_info, self.repo_id, revision=ref, files_metadata=True)
            if self._holds_exactly(content_ids(info)):
                return f"{self.endpoint}/{self.repo_id}/discussions/{ref.rsplit('/', 1)[-1]}"
        return None

    def commit(self, message: str, description: str = "") -> str:
        """Commit every uploaded shard and small file to the branch (or a pull request) in one
        commit titled MESSAGE with DESCRIPTION, deleting the files of an earlier conversion that
        this one does not produce. Returns the commit's (or the pull request's) URL."""
        if self._stop.is_set():
            raise self._stopped_error()
        # Nothing would change (a rerun, or a resumed run, on a target that already holds exactly
        # this conversion): no commit, not even an empty one; the existing commit is the result.
        if self._parent is not None and self._holds_exactly(self._remote):
            self.url = self._commit_url(self._parent)
            log.info("%s already holds exactly this conversion: nothing to commit", self.repo_id)
            self._forget_state()
            return self.url
        ops = list(self._ops.values())
        produced = set(self._ops)
        stale = [f for f in self._existing if f not in produced and f != ".gitattributes"]
        ops += [CommitOperationDelete(path_in_repo=f) for f in stale]
        prs_before = self._pr_refs() if self.create_pr else None
        attempt = 0
        while True:
            attempt += 1
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
                self.url = info.pr_url or info.commit_url
                break
            except Exception as e:
                kind, retry_after = classify(e)
                if kind is None:
                    if isinstance(e, HfHubHTTPError):
                        if getattr(e.response, "status_code", None) == 412:
                            raise TargetError(f"{self.repo_id}@{self.revision} changed while converting; run again") from None
                        raise explain(e, self.repo_id, what="target repo") from None
                    raise
                # The answer was lost or refused transiently: the commit may still have been
                # applied (a connection closed after the server committed). Never send it twice.
                landed = self._landed(prs_before)
                if landed is not None:
                    log.info("the commit was applied although its answer was lost (%s)", short_error(e))
                    self.url = landed
                    break
                error = e
            retry_wait(f"committing to {self.repo_id}", attempt, error, kind, retry_after, where=self.endpoint)
        self._forget_state()
        return self.url

    def _record(self, name: str, info: UploadInfo, notes: dict | None) -> None:
        """Add the shard NAME (uploaded as INFO, with NOTES) to the resume record, unless the
        record was dropped: an upload that ends after a final abort must not write it again."""
        with self._journal_lock:
            if self._journal is not None and not self._forgotten:
                self._journal.add(name, info, notes)

    def _forget_state(self) -> None:
        with self._journal_lock:
            self._forgotten = True
            if self._journal is not None:
                self._journal.forget()

    def close(self) -> None:
        """Let the upload threads go; after a stop, uploads still in flight are abandoned."""
        if self._writing:
            with _WRITING_LOCK:
                _WRITING[self._repo_key] -= 1
                if not _WRITING[self._repo_key]:
                    del _WRITING[self._repo_key]
                if self._kept:
                    _KEPT.add(self._repo_key)
            self._writing = False
        # After a stop, uploads still in flight are abandoned (their threads are daemons); after
        # a commit every upload is long done.
        self._upload_pool.shutdown(wait=not self._stop.is_set())

"""Where the output goes: the Sink interface, and LocalSink (staging folder + atomic swap).

A sink receives output shards as they are produced and small files at the end, and makes them
visible all at once in `commit`. Until then nothing at the destination changes, and `abort`
leaves it as it was. HubSink (hub_sink.py) publishes to a Hub repo in one commit.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import shutil
import stat
import sys
import tempfile
from concurrent.futures import Future
from pathlib import Path
from typing import Callable, Sequence

try:
    import fcntl
except ImportError:  # not POSIX: staging folders are not locked, and none is ever removed
    fcntl = None

from streamer.errors import Hint, Note, TargetError
from streamer.formats import safe_relpath
from streamer.io.provenance import read_provenance

log = logging.getLogger("streamer")


class ShardWriter:
    """One output shard being assembled; pieces arrive in any order at known offsets.

    NAME is the shard's path inside the destination, SIZE its final size in bytes.
    """

    def __init__(self, name: str, size: int):
        self.name = name
        self.size = size
        # What the run knows of the shard beyond its bytes (the quality report's sums), as plain
        # JSON data set before close(): a sink that can resume keeps it with its resume record,
        # so a resumed run reports the same as one that converted every shard.
        self.notes: dict = {}
        # Set before close() by whoever shows progress: a sink that delivers the shard gradually
        # (an upload) calls it with each number of the shard's bytes that went out, never more
        # than SIZE in all however often it retries, and never after the sink was stopped. A
        # sink that delivers the shard at once (a local file) may never call it: the caller
        # counts the whole shard when close()'s future resolves.
        self.on_bytes: Callable[[int], None] | None = None

    def write_at(self, offset: int, data) -> None:
        """Put DATA (any buffer) at byte OFFSET of the shard."""
        raise NotImplementedError

    def close(self) -> Future:
        """Finish the shard; the future resolves once the sink no longer needs its bytes."""
        raise NotImplementedError

    def discard(self) -> None:
        """Drop the shard unfinished (the run is failing): free what it holds."""


class Sink:
    """Interface of every destination; the engine uses nothing of a sink that is not declared here."""

    label: str = ""  # how logs name the destination: a path, or a repo id
    url: str | None = None  # where the result can be seen, once committed
    repo_id: str | None = None  # the Hub repo written to; None for a local folder
    folder: Path | None = None  # the local folder written to (links resolved); None for a Hub repo
    # Whether an open shard is held in memory until it is delivered: the memory budget then
    # counts each open shard whole.
    buffers_shards: bool = False

    def check(self) -> None:
        """Refuse a destination that must not be written, before any work starts."""

    def visibility_note(self, source_private: bool = False) -> Note | None:
        """Who will see the result (after check()), a Note; None when there is nothing to say.

        SOURCE_PRIVATE: the source is private or gated."""
        return None

    def begin(self) -> None:
        """Called once the run really starts (not for a dry run): create what uploads need."""

    def resume(self, fingerprint: str, shards: list[str]) -> set[str]:
        """The SHARDS an interrupted run of the plan FINGERPRINT already delivered: the run skips them."""
        return set()

    def resumed_notes(self, name: str) -> dict:
        """The notes (ShardWriter.notes) of the shard NAME that `resume` found delivered."""
        return {}

    def open_shard(self, name: str, size: int) -> ShardWriter:
        """A writer for the output shard NAME of SIZE bytes."""
        raise NotImplementedError

    def put_file(self, path: str, data: bytes) -> None:
        """Write the small file PATH (config, card …) with the bytes DATA."""
        raise NotImplementedError

    def commit(self, message: str, description: str = "") -> str:
        """Make everything written visible at once; MESSAGE and DESCRIPTION describe the change
        where the destination keeps a history. Returns where the result is (a path or a URL)."""
        raise NotImplementedError

    def holds(self, accepts: Callable[[dict | None], bool], files: dict, fingerprint: str | None = None) -> str | None:
        """Where the destination already holds this very conversion, after check(): ACCEPTS (a
        function of the card's streamer block, `read_provenance`, e.g. `Provenance.produced`)
        says yes, and besides the card it has exactly FILES, each at its size (an int) or with
        that content (bytes, or a function giving them, called only once everything else
        matched); a sink that proposes its changes may find them in a proposal it made earlier
        (a Hub pull request). None when it does not, when the sink cannot tell cheaply, and when
        the destination is to be replaced anyway. A resume record of the plan FINGERPRINT (an
        earlier run that failed to commit) is then dropped."""
        return None

    def delivered(self) -> int:
        """How many output shards this run has put in place so far (uploaded, or resumed from an
        earlier run): what a rerun could reuse after a failure."""
        return 0

    def abort(self, *, resumable: bool = True) -> None:
        """Leave the destination as it was. RESUMABLE: a rerun of the same conversion may pick up
        this run's work (it failed on the way); False when the run ends for good (the user
        stopped it, or its input was refused before anything a rerun could reuse was
        delivered), so that what the sink created for it goes too, in settle()."""

    def keeps_work(self) -> bool:
        """After abort(): whether the destination keeps this run's output for a rerun to resume."""
        return False

    def settle(self, siblings: Sequence[Sink] = (), *, last: bool = True) -> None:
        """After abort(), once SIBLINGS (the other targets of the same run, all done by now) are
        too: remove what this run created for a run that ended for good, unless something else
        uses it since (another target of a fan-out into one new repo, another run). Not LAST:
        a first round over the siblings, after which each is settled again."""

    def close(self) -> None:
        """Let go of what the sink holds (threads, locks); after commit or abort."""


def check_relpath(path: str) -> str:
    """PATH, an output file name, normalized; TargetError when it would land outside the destination."""
    norm = safe_relpath(path)
    if norm is None:
        raise TargetError(f"refusing to write {path!r}: the name would escape the destination folder")
    return norm


class _FileShardWriter(ShardWriter):
    def __init__(self, name: str, size: int, path: Path):
        super().__init__(name, size)
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.ftruncate(self._fd, size)

    def write_at(self, offset: int, data) -> None:
        view = memoryview(data).cast("B")
        while view:
            n = os.pwrite(self._fd, view, offset)
            view, offset = view[n:], offset + n

    def close(self) -> Future:
        os.close(self._fd)
        self._fd = -1
        done: Future = Future()
        done.set_result(self.path)
        return done

    def discard(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


# The model card streamer writes; its front matter says streamer made the folder (provenance.py).
CARD_NAME = "README.md"
# A model card is a few kB; a larger README.md is read only this far to look for the block.
_CARD_READ_LIMIT = 1_000_000

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2  # renameat2 flag (Linux 3.15+): swap two paths in one atomic step


def _exchange(a: Path, b: Path) -> None:
    """Swap the folders at A and B atomically (renameat2 RENAME_EXCHANGE): at every instant
    each path holds one complete folder. OSError when the system or file system cannot."""
    func = getattr(_libc(), "renameat2", None) if sys.platform.startswith("linux") else None
    if func is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available")
    if func(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(a))


_LIBC = None


def _libc():
    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL(None, use_errno=True)
    return _LIBC


def written_by_streamer(folder: Path) -> bool:
    """Whether FOLDER holds a model card with streamer's provenance block, i.e. streamer wrote it.

    The card must be a regular file (a link could make any folder look like streamer's)."""
    card = folder / CARD_NAME
    try:
        if not stat.S_ISREG(os.lstat(card).st_mode):
            return False
        with open(card, "rb") as f:
            text = f.read(_CARD_READ_LIMIT).decode("utf-8", errors="replace")
    except OSError:
        return False
    return read_provenance(text) is not None


class LocalSink(Sink):
    """Build the output in a staging folder beside DST, then swap it into place in one step.

    Staging folders are named `.DST.streamer-XXXXXXXX`, each owned by a lock file
    `.DST.streamer-XXXXXXXX.lock` that its run holds (flock) until the folder is gone and that
    records the run's pid. A run killed with SIGKILL cannot clean up, but the kernel drops its
    lock: the next run to the same destination removes every staging folder whose lock it can
    take, and never one whose lock is held (another live run).

    A destination that exists is replaced only when it is empty, when streamer wrote it (its
    README.md carries streamer's provenance: a rerun refreshes it), or with `overwrite`. The
    replacement is an atomic exchange (renameat2): there is no instant at which DST is missing
    or half-written. Where the exchange is not available, DST is moved aside to
    `.DST.streamer-XXXXXXXX.old` and the new folder renamed in; should the run die between the
    two renames, the next run puts the old folder back before doing anything else.
    """

    def __init__(self, dst: str | os.PathLike, *, overwrite: bool = False):
        given = Path(dst).expanduser().absolute()
        # A destination that is a link to a folder: replace the folder it points to, and keep the
        # link (swapping the link itself would leave the old folder where the link pointed).
        self.dst = given.resolve() if given.is_symlink() else given
        self.folder = self.dst.resolve()
        self.overwrite = overwrite
        self.label = str(given)
        self.url = str(given)
        self._tmp: Path | None = None
        self._lock_fd: int | None = None
        self._lock_path: Path | None = None
        self._made: list[Path] = []  # parent folders this run created, removed again on abort

    @property
    def _prefix(self) -> str:
        return f".{self.dst.name}.streamer-"

    def check(self) -> None:
        """Refuse a destination that is not a folder, holds files streamer did not write (unless
        overwrite), or cannot be created."""
        if self.dst.exists():
            if not self.dst.is_dir():
                raise TargetError(f"destination {self.dst} exists and is not a folder")
            if any(self.dst.iterdir()) and not self.overwrite and not written_by_streamer(self.dst):
                raise TargetError(
                    f"destination {self.dst} is not empty and streamer did not write it (no "
                    f"{CARD_NAME} with streamer's provenance)",
                    hints=(Hint("target"), Hint("overwrite")),
                )
        parent = self.dst.parent
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir():
            raise TargetError(f"{parent} is not a folder: cannot create {self.dst} under it")
        if not os.access(parent, os.W_OK):
            raise TargetError(f"cannot write into {parent}: permission denied")

    # -- staging folders and their owners ---------------------------------------------------

    def _staging(self) -> Path:
        if self._tmp is None:
            try:
                missing = [p for p in reversed(self.dst.parents) if not p.exists()]
                for p in missing:
                    try:
                        p.mkdir()
                    except FileExistsError:  # made by another run meanwhile (a fan-out's other target): not ours
                        continue
                    self._made.append(p)
                self.remove_stale()
                self._tmp = self._claim()
            except OSError as e:  # a folder that takes no files (/proc, a read-only mount …)
                raise TargetError(
                    f"cannot write the destination {self.dst}: {e.strerror or e}", hints=(Hint("target"),)
                ) from None
        return self._tmp

    def _claim(self) -> Path:
        """Create a lock file, hold it, then create its staging folder (in that order, so that a
        staging folder never exists without a held lock that another run could mistake)."""
        parent = self.dst.parent
        while True:
            fd, lock_name = tempfile.mkstemp(prefix=self._prefix, suffix=".lock", dir=parent)
            lock = Path(lock_name)
            try:
                if fcntl is not None:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                # A cleaning run may have taken the fresh, not yet locked file for a stale one
                # and unlinked it: then this lock guards nothing, so start over.
                same = os.fstat(fd).st_ino == os.stat(lock).st_ino
            except FileNotFoundError:
                same = False
            except BaseException:
                os.close(fd)
                raise
            if not same:
                os.close(fd)
                continue
            staging = lock.with_name(lock.name[: -len(".lock")])
            try:
                os.mkdir(staging, 0o777)  # the umask applies, as for any folder the user makes
            except FileExistsError:  # an unowned folder of an older streamer has this name
                os.unlink(lock)
                os.close(fd)
                continue
            except BaseException:
                os.unlink(lock)
                os.close(fd)
                raise
            os.write(fd, f"{os.getpid()}\n".encode())
            self._lock_fd, self._lock_path = fd, lock
            return staging

    def _release(self) -> None:
        """Drop this run's lock file (after its staging folder is gone)."""
        if self._lock_fd is not None:
            try:
                os.unlink(self._lock_path)
            except OSError:
                pass
            os.close(self._lock_fd)
            self._lock_fd = self._lock_path = None

    def remove_stale(self) -> list[Path]:
        """Remove the staging folders that dead runs left beside the destination; returns them.

        A run's lock file is held for as long as its staging folder exists, so a lock that can
        be taken belongs to a run that is gone. Folders of a live run are never touched."""
        removed: list[Path] = []
        parent = self.dst.parent
        if fcntl is None or not parent.is_dir():
            return removed
        prefix = self._prefix
        names = {e.name for e in os.scandir(parent) if e.name.startswith(prefix)}
        for name in sorted(n for n in names if n.endswith(".lock")):
            lock = parent / name
            try:
                fd = os.open(lock, os.O_RDWR | os.O_NOFOLLOW)
            except OSError:
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a live run holds it
                try:
                    if os.fstat(fd).st_ino != os.stat(lock).st_ino:
                        continue  # replaced meanwhile: not the file that was locked
                except FileNotFoundError:
                    continue
                staging = lock.with_name(name[: -len(".lock")])
                old = staging.with_name(staging.name + ".old")
                if old.is_dir() and not os.path.lexists(self.dst):
                    # the fallback swap died between its two renames: put the old folder back
                    os.rename(old, self.dst)
                for folder in (staging, old):
                    if folder.is_dir() and not folder.is_symlink():
                        shutil.rmtree(folder, ignore_errors=True)
                        removed.append(folder)
                os.unlink(lock)
            finally:
                os.close(fd)
        unowned = sorted(
            n for n in names
            if not n.endswith((".lock", ".old")) and n + ".lock" not in names and (parent / n).is_dir()
        )  # fmt: skip
        if unowned:
            log.warning(
                "%s: staging folder(s) with no owner record, left by an older streamer: %s; "
                "remove them by hand if no conversion to %s is running",
                parent, ", ".join(unowned), self.dst.name,
            )  # fmt: skip
        if removed:
            log.info("removed %d staging folder(s) of interrupted runs beside %s", len(removed), self.dst)
        return removed

    # -- writing ----------------------------------------------------------------------------

    def open_shard(self, name: str, size: int) -> ShardWriter:
        """A writer for shard NAME of SIZE bytes, written straight into the staging folder."""
        return _FileShardWriter(name, size, self._staging() / check_relpath(name))

    def put_file(self, path: str, data: bytes) -> None:
        """Write the small file PATH with DATA into the staging folder."""
        target = self._staging() / check_relpath(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)

    def commit(self, message: str = "", description: str = "") -> str:
        """Swap the staging folder into place in one step (MESSAGE and DESCRIPTION are not kept:
        a folder has no history); the replaced folder is removed. Returns the destination path."""
        staging = self._staging()
        if os.path.lexists(self.dst):
            try:
                _exchange(staging, self.dst)
            except OSError as e:
                if e.errno not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
                    raise
                old = staging.with_name(staging.name + ".old")
                os.rename(self.dst, old)  # killed after this: the next run's remove_stale() puts it back
                try:
                    os.rename(staging, self.dst)
                except BaseException:
                    os.rename(old, self.dst)  # interrupted (not killed): put it back right away
                    raise
                os.rename(old, staging)
        else:
            os.rename(staging, self.dst)
        # STAGING now holds the replaced folder (or nothing); the lock is dropped once it is gone.
        self._tmp = None
        self._made.clear()  # the parents hold the result now
        shutil.rmtree(staging, ignore_errors=True)
        self._release()
        return str(self.dst)

    def abort(self, *, resumable: bool = True) -> None:
        """Remove the staging folder and the parents this run created; the destination is untouched."""
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
        self._release()
        for p in reversed(self._made):
            try:
                p.rmdir()
            except OSError:
                pass
        self._made.clear()

    def close(self) -> None:
        """Drop this run's lock, if commit or abort did not already."""
        # Normally commit or abort released the lock already; this covers a caller that did
        # neither. The staging folder is left for the next run's remove_stale().
        self._release()


"""Where checkpoint bytes come from: the Source interface, and LocalSource for a folder on this machine.

A Source answers three questions: which files exist (with sizes), give me bytes [start, end) of a
file, and give me a whole small file. Everything above this module is the same for every kind;
HubSource (hub_source.py) reads a Hub repo, and locations.open_source picks one by name.
"""

from __future__ import annotations

import os
import stat
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from streamer.errors import InputError


@dataclass(frozen=True)
class Span:
    """A half-open byte range [start, end) of one file."""

    start: int
    end: int

    @property
    def size(self) -> int:
        """The number of bytes in the span."""
        return self.end - self.start


class Source:
    """Interface shared by LocalSource and HubSource: the checkpoint's files, read by byte range."""

    label: str = ""  # how logs and model cards name the source: a path, or "org/name@sha"
    repo_id: str | None = None
    folder: Path | None = None  # the local folder read (links resolved); None for a Hub repo
    commit: str | None = None  # the exact source commit on the Hub, None for a local folder
    # Who may read the source: a private or gated one makes a private target unless asked otherwise.
    private: bool = False
    gated: bool = False
    # Set by the pipeline before a run. A source that reads over the network stops its transfers
    # in flight once CANCEL is set; one that REPORTS_BYTES calls ON_BYTES(n) as bytes arrive (else
    # progress counts each piece when it has been read), ON_BYTES(n, rated=False) for bytes it
    # had already (they say nothing about the link's rate).
    cancel: threading.Event | None = None
    on_bytes: Callable[[int], None] | None = None
    reports_bytes: bool = False

    @property
    def held_bytes(self) -> int:
        """At most how many bytes of the model this source holds in memory now, outside the run's
        budget (a start-up reader's, streamer.io.prefetch); the runner reserves them in its budget."""
        return 0

    def will_read(self, pieces: list) -> None:
        """Told by the pipeline before its first read: PIECES, each a list of the catalog's
        TensorInfo read together. A plain source ignores it; one shared by several conversions
        (streamer.engine.fanout) keeps each tensor it read until every conversion has taken it."""

    def files(self) -> dict[str, int]:
        """Relative path (POSIX) -> size in bytes, for every file of the checkpoint."""
        raise NotImplementedError

    def read_into(self, path: str, span: Span, out: memoryview) -> None:
        """Fill OUT (exactly span.size bytes) with bytes [start, end) of PATH."""
        raise NotImplementedError

    def read_spans_into(self, path: str, spans: list[Span], outs: list[memoryview]) -> None:
        """Several ranges of one file; sources that can fetch in parallel override this."""
        for span, out in zip(spans, outs):
            self.read_into(path, span, out)

    def read(self, path: str, span: Span) -> bytearray:
        """Bytes SPAN of file PATH, in a new buffer."""
        out = bytearray(span.size)
        self.read_into(path, span, memoryview(out))
        return out

    def read_file(self, path: str) -> bytes:
        """The whole file PATH (a small one: config, tokenizer …)."""
        return self.read(path, Span(0, self.files()[path]))

    def close(self) -> None:
        """Let go of what the source holds (files, connections)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# Folders a checkpoint never keeps its files in; a local clone of a Hub repo has .git and .cache.
_SKIP_DIRS = {".git", ".cache", "__pycache__", ".huggingface"}


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


class LocalSource(Source):
    """The checkpoint folder ROOT on this machine.

    Every file read from it (shards and the small files copied to the output) must be a regular
    file inside the folder once links are resolved; anything else is refused when the folder is
    listed, before any work, with a sentence naming the file. A symlink is allowed when it
    resolves inside the folder, or, for a Hugging Face cache snapshot
    (`…/models--org--name/snapshots/REV`), inside that repo's own `blobs/` folder, where the
    cache keeps the real files. A link to anything else (a token file, `/etc/…`, another model)
    would copy a file the user never meant to publish. Linked folders are not walked: one that
    points outside is refused, one that points inside is skipped (its files are listed where they
    really are).
    """

    def __init__(self, root: str | os.PathLike):
        self.root = self.folder = Path(root).resolve()
        if not self.root.is_dir():
            raise InputError(f"source folder {root} does not exist or is not a folder")
        self.label = str(self.root)
        self._files: dict[str, int] | None = None
        self._real: dict[str, tuple[str, int, int]] = {}  # relpath -> (real path, st_dev, st_ino)
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()
        self._allowed = [self.root]
        snapshots = self.root.parent
        if snapshots.name == "snapshots" and snapshots.parent.name.startswith(("models--", "datasets--")):
            self._allowed.append(snapshots.parent / "blobs")

    def _inside(self, real: Path) -> bool:
        return any(real == a or a in real.parents for a in self._allowed)

    def _refuse(self, rel: str, why: str) -> InputError:
        return InputError(
            f"source file {rel} {why}; streamer reads only regular files inside the source folder "
            f"{self.root}: replace it with a copy of the file, or remove it"
        )

    def _check_file(self, rel: str) -> tuple[str, os.stat_result]:
        """The real path of source file REL and its stat, or InputError saying what it is."""
        full = self.root / rel
        real = Path(os.path.realpath(full))
        if not self._inside(real):
            raise self._refuse(rel, f"is a link to {real}, outside the folder")
        try:
            st = os.stat(real)
        except OSError as e:
            raise self._refuse(rel, f"cannot be read ({e.strerror})") from None
        if not stat.S_ISREG(st.st_mode):
            raise self._refuse(rel, f"is {_kind(st.st_mode)}")
        return str(real), st

    def files(self) -> dict[str, int]:
        """Relative path -> size of every file in the folder, checked once (see the class)."""
        if self._files is None:
            found: dict[str, int] = {}
            for dirpath, dirnames, filenames in os.walk(self.root):  # never follows linked folders
                keep = []
                for d in sorted(dirnames):
                    if d in _SKIP_DIRS:
                        continue
                    full = Path(dirpath) / d
                    if full.is_symlink():
                        real = Path(os.path.realpath(full))
                        if not self._inside(real):
                            rel = full.relative_to(self.root).as_posix()
                            raise self._refuse(rel, f"is a link to the folder {real}, outside the source")
                        continue  # inside: its files are listed at their real place
                    keep.append(d)
                dirnames[:] = keep
                for fn in sorted(filenames):
                    rel = (Path(dirpath) / fn).relative_to(self.root).as_posix()
                    real, st = self._check_file(rel)
                    self._real[rel] = (real, st.st_dev, st.st_ino)
                    found[rel] = st.st_size
            self._files = found
        return self._files

    def _fd(self, path: str) -> int:
        with self._lock:
            fd = self._fds.get(path)
            if fd is None:
                fd = self._open(path)
                self._fds[path] = fd
            return fd

    def _open(self, path: str) -> int:
        """Open a listed file, and make sure it is still the regular file that was listed: a
        file swapped for a link (or a FIFO) after listing is refused, never followed."""
        self.files()
        if path not in self._real:
            raise InputError(f"{path} is not a file of the source folder {self.root}")
        real, dev, ino = self._real[path]
        try:
            # O_NOFOLLOW: the real path has no link left in its last part unless one was swapped
            # in; O_NONBLOCK: opening a FIFO put in the file's place must not hang the run.
            fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as e:
            raise self._refuse(path, f"cannot be opened ({e.strerror})") from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != (dev, ino):
            os.close(fd)
            raise self._refuse(path, "changed while streamer was reading the folder")
        return fd

    def read_into(self, path: str, span: Span, out: memoryview) -> None:
        """Fill OUT (exactly span.size bytes) with bytes SPAN of file PATH."""
        fd = self._fd(path)
        view = out.cast("B") if out.format != "B" else out
        got = 0
        # pread may return short reads for very large spans; loop until the span is complete.
        while got < span.size:
            n = os.preadv(fd, [view[got:]], span.start + got)
            if n == 0:
                raise InputError(
                    f"{path} is shorter than its header says: wanted bytes "
                    f"{span.start}-{span.end}, file ends at {span.start + got}"
                )
            got += n

    def close(self) -> None:
        """Close the files opened for reading."""
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

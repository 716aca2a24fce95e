"""Where checkpoint bytes come from: a local folder, or a Hub repo read with HTTP range requests.

A Source answers three questions: which files exist (with sizes), give me bytes [start, end) of a
file, and give me a whole small file. Everything above this module is the same for both kinds.
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError


@dataclass(frozen=True)
class Span:
    """A half-open byte range [start, end) of one file."""

    start: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start


class Source:
    """Interface shared by LocalSource and HubSource."""

    label: str = ""  # how logs and model cards name the source: a path, or "org/name@sha"
    repo_id: str | None = None
    commit: str | None = None  # the exact source commit on the Hub, None for a local folder

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
        out = bytearray(span.size)
        self.read_into(path, span, memoryview(out))
        return out

    def read_file(self, path: str) -> bytes:
        return self.read(path, Span(0, self.files()[path]))

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# Folders a checkpoint never keeps its files in; a local clone of a Hub repo has .git and .cache.
_SKIP_DIRS = {".git", ".cache", "__pycache__", ".huggingface"}


class LocalSource(Source):
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise InputError(f"source folder {root} does not exist or is not a folder")
        self.label = str(self.root)
        self._files: dict[str, int] | None = None
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    def files(self) -> dict[str, int]:
        if self._files is None:
            found: dict[str, int] = {}
            for dirpath, dirnames, filenames in os.walk(self.root):
                dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
                for fn in sorted(filenames):
                    full = Path(dirpath) / fn
                    if full.is_file():
                        found[full.relative_to(self.root).as_posix()] = full.stat().st_size
            self._files = found
        return self._files

    def _fd(self, path: str) -> int:
        with self._lock:
            fd = self._fds.get(path)
            if fd is None:
                fd = os.open(self.root / path, os.O_RDONLY)
                self._fds[path] = fd
            return fd

    def read_into(self, path: str, span: Span, out: memoryview) -> None:
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
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[^\s]+)?$")


def is_hub_spec(spec: str) -> bool:
    """`org/name[@rev]` that is not an existing local path is a Hub repo id.

    Anything that exists on disk, starts with `/`, `.` or `~`, or does not have exactly one `/`
    before the optional `@revision`, is a local folder.
    """
    if spec.startswith("hub://"):
        return True
    if os.path.exists(spec) or spec.startswith(("/", ".", "~")):
        return False
    return _REPO_ID.match(spec) is not None


def split_revision(spec: str) -> tuple[str, str | None]:
    spec = spec.removeprefix("hub://")
    if "@" in spec:
        repo, rev = spec.split("@", 1)
        return repo, (rev or None)
    return spec, None


def open_source(spec: str | os.PathLike, *, token: str | None = None, **hub_options) -> Source:
    """A local folder if SPEC exists on disk, else a Hub repo id `org/name[@revision]`."""
    spec = os.fspath(spec)
    if not is_hub_spec(spec):
        return LocalSource(os.path.expanduser(spec))
    from .hub import HubSource  # imported lazily: local runs need no HTTP machinery

    repo_id, revision = split_revision(spec)
    return HubSource(repo_id, revision=revision, token=token, **hub_options)

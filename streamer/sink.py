"""Where the output goes: a local folder (temp folder + atomic rename) or a Hub repo (hub.py).

A sink receives output shards as they are produced and small files at the end, and makes them
visible all at once in `commit`. Until then nothing at the destination changes, and `abort`
leaves it as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from concurrent.futures import Future
from pathlib import Path

from .errors import TargetError


class ShardWriter:
    """One output shard being assembled; pieces arrive in any order at known offsets."""

    def __init__(self, name: str, size: int):
        self.name = name
        self.size = size

    def write_at(self, offset: int, data) -> None:
        raise NotImplementedError

    def close(self) -> Future:
        """Finish the shard; the future resolves once the sink no longer needs its bytes."""
        raise NotImplementedError

    def discard(self) -> None:
        pass


class Sink:
    label: str = ""
    url: str | None = None  # where the result can be seen, once committed

    def check(self) -> None:
        """Refuse a destination that must not be written, before any work starts."""

    def begin(self) -> None:
        """Called once the run really starts (not for a dry run): create what uploads need."""

    def resume(self, fingerprint: str, shards: list[str]) -> set[str]:
        """Shards an interrupted run of the same plan already delivered: the run skips them."""
        return set()

    def open_shard(self, name: str, size: int) -> ShardWriter:
        raise NotImplementedError

    def put_file(self, path: str, data: bytes) -> None:
        raise NotImplementedError

    def commit(self, message: str, description: str = "") -> str:
        raise NotImplementedError

    def abort(self, *, cancelled: bool = False) -> None:
        pass

    def close(self) -> None:
        pass


def check_relpath(path: str) -> str:
    """Refuse an output file name that would land outside the destination folder."""
    norm = os.path.normpath(path)
    if os.path.isabs(path) or norm == ".." or norm.startswith(".." + os.sep) or "\x00" in path:
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


class LocalSink(Sink):
    """Write into a temp folder beside DST, then rename it into place in one step."""

    def __init__(self, dst: str | os.PathLike, *, overwrite: bool = False):
        self.dst = Path(dst).expanduser().absolute()
        self.overwrite = overwrite
        self.label = str(self.dst)
        self.url = str(self.dst)
        self._tmp: Path | None = None
        self._made: list[Path] = []  # parent folders this run created, removed again on abort

    def check(self) -> None:
        if self.dst.exists():
            if not self.dst.is_dir():
                raise TargetError(f"destination {self.dst} exists and is not a folder")
            if any(self.dst.iterdir()) and not self.overwrite:
                raise TargetError(
                    f"destination {self.dst} is not empty; choose another folder or pass --overwrite"
                )
        parent = self.dst.parent
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir():
            raise TargetError(f"{parent} is not a folder: cannot create {self.dst} under it")
        if not os.access(parent, os.W_OK):
            raise TargetError(f"cannot write into {parent}: permission denied")

    def _staging(self) -> Path:
        if self._tmp is None:
            missing = [p for p in reversed(self.dst.parents) if not p.exists()]
            for p in missing:
                p.mkdir()
                self._made.append(p)
            self._tmp = Path(tempfile.mkdtemp(prefix=f".{self.dst.name}.streamer-", dir=self.dst.parent))
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(self._tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result should not be
        return self._tmp

    def open_shard(self, name: str, size: int) -> ShardWriter:
        return _FileShardWriter(name, size, self._staging() / check_relpath(name))

    def put_file(self, path: str, data: bytes) -> None:
        target = self._staging() / check_relpath(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)

    def commit(self, message: str = "", description: str = "") -> str:
        staging = self._staging()
        old = None
        if self.dst.exists():
            old = self.dst.with_name(f".{self.dst.name}.streamer-old-{os.getpid()}")
            os.rename(self.dst, old)
        os.rename(staging, self.dst)
        self._tmp = None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return str(self.dst)

    def abort(self, *, cancelled: bool = False) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
        for p in reversed(self._made):
            try:
                p.rmdir()
            except OSError:
                pass
        self._made.clear()


def dumps_json(data) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()

"""The Git LFS batch API and the uploads it hands out (basic PUT and Hub multipart).

A batch request gets, per object, either nothing (the object is already in the repo or was
uploaded to it: the client skips the upload, which is what makes re-runs and resumes cheap) or
upload actions whose URLs embed an unguessable upload id, because the client sends those PUTs
without credentials, as it does to S3 on the real Hub. A blob stored for another repo is not
"already there": the caller must send its bytes, which is what proves they have them.

Every upload lands in a temp file and only enters the blob store once its sha256 matches
the announced oid, so a blob in the store is always complete and correct.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

from . import errors
from .storage import BlobStore, is_sha256

DEFAULT_MULTIPART_CHUNK = 64 * 1024 * 1024
IO_CHUNK = 1024 * 1024
UPLOAD_PREFIX = "/api/localhub/lfs/"


class Body(Protocol):
    def read(self, n: int) -> bytes: ...


@dataclass
class UploadSession:
    upload_id: str
    oid: str
    size: int
    repo_type: str
    repo_id: str
    chunk_size: int | None  # None: basic transfer (one PUT of the whole object)
    tmp: Path
    parts: dict[int, str] = field(default_factory=dict)  # part number -> etag handed out
    # Parts usually arrive in order, so the object is hashed as it is written and completion
    # does not need to read it back; out-of-order parts fall back to a full re-read.
    hasher: "hashlib._Hash" = field(default_factory=hashlib.sha256)
    hashed_upto: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    created: float = field(default_factory=time.time)
    # Finished sessions are kept so that a retried request whose first answer was lost
    # (a dropped connection) still succeeds instead of hitting an unknown upload id.
    done: bool = False

    @property
    def num_parts(self) -> int:
        assert self.chunk_size
        return max(1, -(-self.size // self.chunk_size))

    def part_range(self, part: int) -> tuple[int, int]:
        assert self.chunk_size
        start = (part - 1) * self.chunk_size
        return start, min(self.size, start + self.chunk_size) - start


def _etag(upload_id: str, part: int, length: int) -> str:
    return '"' + hashlib.sha1(f"{upload_id}:{part}:{length}".encode()).hexdigest() + '"'


class LfsUploads:
    def __init__(
        self,
        blobs: BlobStore,
        multipart_chunk_size: int = DEFAULT_MULTIPART_CHUNK,
        on_stored: Callable[[str, str, str], None] | None = None,
    ):
        self.blobs = blobs
        self.multipart_chunk_size = multipart_chunk_size
        # Called with (repo type, repo id, oid) once an upload's bytes are verified and stored.
        self.on_stored = on_stored
        self._lock = threading.Lock()
        self._sessions: dict[str, UploadSession] = {}

    # ------------------------------------------------------------------ batch
    def batch(
        self,
        objects: list[dict],
        transfers: list[str],
        repo: tuple[str, str],
        base_url: str,
        verify_href: str,
        known: Callable[[str, int], bool],
    ) -> dict:
        """Answer an upload batch for `repo` (type, id); `known(oid, size)` says which objects need no upload."""
        answers = []
        used_multipart = False
        for obj in objects:
            oid, size = obj.get("oid"), obj.get("size")
            if not is_sha256(oid) or type(size) is not int or size < 0:
                answers.append({"oid": str(oid), "size": size if type(size) is int else 0,
                                "error": {"code": 422, "message": "Invalid oid or size"}})
                continue
            if known(oid, size):
                answers.append({"oid": oid, "size": size})
                continue
            multipart = "multipart" in transfers and size > self.multipart_chunk_size
            used_multipart |= multipart
            answers.append({"oid": oid, "size": size, "authenticated": True,
                            "actions": self._new_upload(oid, size, repo, multipart, base_url, verify_href)})
        return {"transfer": "multipart" if used_multipart else "basic", "objects": answers, "hash_algo": "sha256"}

    def _new_upload(
        self, oid: str, size: int, repo: tuple[str, str], multipart: bool, base_url: str, verify_href: str
    ) -> dict:
        upload_id = uuid.uuid4().hex + uuid.uuid4().hex
        session = UploadSession(
            upload_id, oid, size, repo[0], repo[1], self.multipart_chunk_size if multipart else None,
            self.blobs.temp_path(".upload"),
        )
        href = f"{base_url}{UPLOAD_PREFIX}{upload_id}"
        upload: dict = {"href": href, "expires_at": _in_one_day()}
        if multipart:
            # The Hub's multipart protocol: numbered part URLs + chunk_size in the header,
            # and the href itself receives the completion POST listing the parts' etags.
            with open(session.tmp, "wb") as fh:
                fh.truncate(size)
            upload["header"] = {"chunk_size": str(session.chunk_size)} | {
                str(n): f"{href}/{n}" for n in range(1, session.num_parts + 1)
            }
        with self._lock:
            self._sessions[upload_id] = session
        return {"upload": upload, "verify": {"href": verify_href, "header": {}}}

    def repo_of(self, upload_id: str) -> str | None:
        session = self._sessions.get(upload_id)
        return session.repo_id if session else None

    def _session(self, upload_id: str) -> UploadSession:
        session = self._sessions.get(upload_id)
        if session is None:
            raise errors.HubError(404, "Unknown or expired upload id")
        return session

    def _finish(self, session: UploadSession, stored: bool = True) -> None:
        session.done = True
        if stored and self.on_stored is not None:
            self.on_stored(session.repo_type, session.repo_id, session.oid)

    # ------------------------------------------------------------------ basic
    def put_object(self, upload_id: str, body: Body, length: int | None) -> None:
        session = self._session(upload_id)
        if session.chunk_size is not None:
            raise errors.bad_request("This upload is multipart: PUT its parts")
        if length is not None and length != session.size:
            raise errors.bad_request(f"Expected {session.size} bytes, got Content-Length {length}")
        if session.done:
            _drain(body)
            return
        tmp = self.blobs.temp_path(".put")  # one file per attempt: a retry never sees a torn one
        hasher = hashlib.sha256()
        received = 0
        try:
            with open(tmp, "wb") as fh:
                while chunk := body.read(IO_CHUNK):
                    hasher.update(chunk)
                    fh.write(chunk)
                    received += len(chunk)
            if received != session.size:
                raise errors.bad_request(f"Expected {session.size} bytes, received {received}")
            if hasher.hexdigest() != session.oid:
                raise errors.bad_request(f"sha256 of the uploaded content does not match oid {session.oid}")
            self.blobs.adopt(tmp, session.oid)
        finally:
            tmp.unlink(missing_ok=True)
        self._finish(session)

    # ------------------------------------------------------------------ multipart
    def put_part(self, upload_id: str, part: int, body: Body, length: int | None) -> str:
        session = self._session(upload_id)
        if session.chunk_size is None:
            raise errors.bad_request("This upload is not multipart")
        if not 1 <= part <= session.num_parts:
            raise errors.bad_request(f"Part number {part} out of range 1..{session.num_parts}")
        offset, expected = session.part_range(part)
        if length is not None and length != expected:
            raise errors.bad_request(f"Part {part} must be {expected} bytes, got Content-Length {length}")
        if session.done:
            _drain(body)
            return _etag(upload_id, part, expected)
        with session.lock:
            hasher = session.hasher.copy() if session.hashed_upto == offset else None
        received = 0
        fd = os.open(session.tmp, os.O_WRONLY)
        try:
            while chunk := body.read(IO_CHUNK):
                if received + len(chunk) > expected:
                    raise errors.bad_request(f"Part {part} is larger than {expected} bytes")
                os.pwrite(fd, chunk, offset + received)
                if hasher is not None:
                    hasher.update(chunk)
                received += len(chunk)
        finally:
            os.close(fd)
        if received != expected:
            raise errors.bad_request(f"Part {part} must be {expected} bytes, received {received}")
        etag = _etag(upload_id, part, received)
        with session.lock:
            session.parts[part] = etag
            if hasher is not None and session.hashed_upto == offset:
                session.hasher, session.hashed_upto = hasher, offset + received
        return etag

    def complete(self, upload_id: str, payload: dict) -> None:
        session = self._session(upload_id)
        if session.chunk_size is None:
            raise errors.bad_request("This upload is not multipart")
        if payload.get("oid") != session.oid:
            raise errors.bad_request("oid does not match the upload")
        if session.done and self.blobs.has(session.oid, session.size):
            return
        parts = payload.get("parts")
        if not isinstance(parts, list) or not all(
            isinstance(p, dict) and type(p.get("partNumber")) is int for p in parts
        ):
            raise errors.bad_request(
                "The completion body must be {\"oid\": ..., \"parts\": [{\"partNumber\": N, \"etag\": ...}, ...]}"
            )
        given = {p["partNumber"]: p.get("etag") for p in parts}
        with session.lock:
            missing = [n for n in range(1, session.num_parts + 1) if session.parts.get(n) is None]
            if missing:
                raise errors.bad_request(f"Parts not uploaded: {missing}")
            wrong = [n for n in range(1, session.num_parts + 1) if given.get(n) != session.parts[n]]
            if wrong:
                raise errors.bad_request(f"Missing or wrong etag for parts {wrong}")
            if session.hashed_upto == session.size:
                digest = session.hasher.hexdigest()
            else:
                digest = _hash_file(session.tmp)
        if digest != session.oid:
            session.tmp.unlink(missing_ok=True)
            self._finish(session, stored=False)
            raise errors.bad_request(f"sha256 of the uploaded parts does not match oid {session.oid}")
        self.blobs.adopt(session.tmp, session.oid)
        self._finish(session)

    # ------------------------------------------------------------------ housekeeping
    def abort_all(self) -> None:
        with self._lock:
            sessions, self._sessions = list(self._sessions.values()), {}
        for session in sessions:
            session.tmp.unlink(missing_ok=True)


def _drain(body: Body) -> None:
    while body.read(IO_CHUNK):
        pass


def _hash_file(path: Path) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(8 * IO_CHUNK):
            hasher.update(chunk)
    return hasher.hexdigest()


def _in_one_day() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 86400))

"""Xet uploads: the content-addressed storage that huggingface_hub uploads to when hf_xet is installed.

huggingface_hub 1.0-1.19 ask the server which transfer to use (the LFS batch answer's
`transfer`, which localhub always answers with LFS); from 1.20 on, and in 2.x, the client
decides alone and goes to Xet whenever `hf_xet` is importable, so a Hub that cannot take Xet
uploads fails every upload with `404 … /xet-write-token/…` (huggingface_hub issues 4507 and
4786). localhub therefore takes Xet uploads:

    GET  /api/{type}s/{repo}/xet-write-token/{rev}   -> {"accessToken", "exp", "casUrl"} (+ X-Xet-* headers)
    then, on casUrl = {hub}/api/localhub/xet/{store id}, with `Authorization: Bearer <accessToken>`:
    GET  /v1/chunks/default/{hash}              global deduplication: always 404, none is offered
    POST /v1/xorb-grants/default/{hash}         reuse of a stored xorb without sending it: 404, send it
    POST /v1/xorbs/default/{hash}               a xorb: chunks (each compressed on its own), then a footer
    POST /v2/shards                             404, which makes the client fall back to /v1/shards
    POST /v1/shards                             a shard: per file, the xorb chunk ranges it is made of

Each file a shard describes is reassembled from its xorbs into the blob store under its sha256
(checked against the sha256 the shard announces) and recorded as uploaded to the token's repo,
so the commit that follows finds it exactly as it finds an LFS upload. Downloads stay on plain
HTTP: resolve answers carry no `X-Xet-Hash`, so no client asks for a read token.

Xorbs are shared by all repos, as on the Hub, where a client deduplicates against xorbs it
uploaded for another repo: a xorb's name derives from its bytes and localhub never discloses
one, so a shard that names it shows knowledge of those bytes. Names are not checked against
the bytes (that needs BLAKE3) and the first upload of a name wins; what protects the blobs is
that every reassembled file must hash to the sha256 it is stored and committed under.

Formats, from xet-core (xet_core_structures): a chunk header is 8 bytes (version 0, compressed
length u24 LE, scheme, uncompressed length u24 LE); schemes are 0 none, 1 LZ4 frame, 2 LZ4 frame
of the bytes regrouped by position mod 4. A shard as uploaded is a 48-byte header, then file
entries of 48-byte records until an all-ones "bookend" hash; hashes are 32 raw bytes whose hex
form prints each 8-byte word as a little-endian u64.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import os
import re
import secrets
import struct
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from . import errors
from .storage import BlobStore

CAS_PREFIX = "/api/localhub/xet/"
TOKEN_TTL = 3600
MAX_CHUNK = 128 * 1024  # xet-core's MAX_CHUNK_SIZE: 2 x the 64 KiB target
MAX_XORB = 2 * 64 * 1024 * 1024  # 64 MiB of chunk data, with room for headers and the footer
MAX_SHARD = 64 * 1024 * 1024
IO_CHUNK = 1024 * 1024
_HEX64 = re.compile(r"^[0-9a-f]{64}$")

SHARD_TAG = bytes([
    72, 70, 82, 101, 112, 111, 77, 101, 116, 97, 68, 97, 116, 97, 0, 85, 105, 103, 69, 106, 123,
    129, 87, 131, 165, 189, 217, 92, 205, 209, 74, 169,
])  # "HFRepoMetaData\0" + magic bytes
_ENTRY = 48
_BOOKEND = b"\xff" * 32
_WITH_VERIFICATION = 1 << 31
_WITH_METADATA_EXT = 1 << 30
_XORB_FOOTER_IDENT = b"XETBLOB"


class Body(Protocol):
    def read(self, n: int) -> bytes: ...


def hash_hex(raw: bytes) -> str:
    """xet-core's hex form of a 32-byte hash: four little-endian u64 words, each printed as 16 digits."""
    return "".join(raw[i : i + 8][::-1].hex() for i in range(0, 32, 8))


def is_hash_hex(value: str) -> bool:
    return bool(_HEX64.match(value))


# --------------------------------------------------------------------------- access tokens
@dataclass(frozen=True)
class XetGrant:
    repo_type: str
    repo_id: str
    user: str
    expires: float


class XetTokens:
    """Short-lived CAS tokens, each bound to one repo it may upload to (as the Hub's JWTs are)."""

    def __init__(self, ttl: float = TOKEN_TTL):
        self.ttl = ttl
        self._lock = threading.Lock()
        self._grants: dict[str, XetGrant] = {}

    def issue(self, repo_type: str, repo_id: str, user: str) -> tuple[str, int]:
        token = "xet_" + secrets.token_hex(24)
        expires = time.time() + self.ttl
        with self._lock:
            now = time.time()
            self._grants = {t: g for t, g in self._grants.items() if g.expires > now}
            self._grants[token] = XetGrant(repo_type, repo_id, user, expires)
        return token, int(expires)

    def check(self, authorization: str | None) -> XetGrant:
        scheme, _, token = (authorization or "").partition(" ")
        grant = self._grants.get(token.strip()) if scheme.lower() == "bearer" else None
        if grant is None or grant.expires <= time.time():
            raise errors.unauthorized("Missing or expired Xet token: ask the Hub for a new one at xet-write-token")
        return grant


# --------------------------------------------------------------------------- decompression
def _load_liblz4():
    try:
        lib = ctypes.CDLL("liblz4.so.1")
    except OSError:  # not Linux, or another soname: ask the slower way (it may run ldconfig)
        name = ctypes.util.find_library("lz4")
        try:
            lib = ctypes.CDLL(name) if name else None
        except OSError:
            lib = None
    fn = getattr(lib, "LZ4_decompress_safe_usingDict", None)
    if fn is not None:
        fn.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        fn.restype = ctypes.c_int
    return fn


# The system's liblz4 when there is one (about a hundred times faster than the Python decoder).
_LZ4_USING_DICT = _load_liblz4()


def _lz4_length(src: bytes, i: int, length: int) -> tuple[int, int]:
    """An LZ4 length whose 4-bit nibble is 15 continues in bytes until one below 255."""
    if length == 15:
        while True:
            b = src[i]
            i += 1
            length += b
            if b != 255:
                break
    return length, i


def _lz4_block_py(src: bytes, out: bytearray, limit: int) -> None:
    """Decode one LZ4 block, appending to `out`, whose earlier bytes are the match history."""
    i, n = 0, len(src)
    while i < n:
        token = src[i]
        i += 1
        length, i = _lz4_length(src, i, token >> 4)
        out += src[i : i + length]
        i += length
        if i >= n:
            break  # the last sequence is literals only
        offset = src[i] | (src[i + 1] << 8)
        i += 2
        length, i = _lz4_length(src, i, token & 15)
        length += 4
        if not 0 < offset <= len(out) or len(out) + length > limit:
            raise ValueError("LZ4 match out of range")
        start = len(out) - offset
        if length <= offset:
            out += out[start : start + length]
        else:  # the match overlaps what it produces: a repeating pattern
            pattern = out[start:]
            whole, rest = divmod(length, offset)
            out += pattern * whole + pattern[:rest]
    if len(out) > limit:
        raise ValueError("LZ4 block larger than announced")


def _lz4_block(src: bytes, out: bytearray, capacity: int, linked: bool) -> None:
    if _LZ4_USING_DICT is None:
        _lz4_block_py(src, out, len(out) + capacity)
        return
    history = bytes(out[-65536:]) if linked else b""
    dst = ctypes.create_string_buffer(capacity)
    n = _LZ4_USING_DICT(src, dst, len(src), capacity, history, len(history))
    if n < 0:
        raise ValueError("corrupt LZ4 block")
    out += dst.raw[:n]


def lz4_frame_decompress(data: bytes, expected: int) -> bytes:
    """An LZ4 frame (what lz4_flex's FrameEncoder writes) decoded to exactly `expected` bytes."""
    if len(data) < 7 or int.from_bytes(data[:4], "little") != 0x184D2204:
        raise ValueError("not an LZ4 frame")
    flags, block_desc = data[4], data[5]
    if flags >> 6 != 1:
        raise ValueError("unsupported LZ4 frame version")
    linked = not flags & 0x20
    block_checksum, content_size, content_checksum, dict_id = (flags & 0x10, flags & 0x08, flags & 0x04,
                                                                flags & 0x01)
    max_block = 1 << (8 + 2 * ((block_desc >> 4) & 7))  # 4: 64 KiB … 7: 4 MiB
    pos = 6 + (8 if content_size else 0) + (4 if dict_id else 0) + 1  # + header checksum
    out = bytearray()
    while True:
        if pos + 4 > len(data):
            raise ValueError("truncated LZ4 frame")
        size = int.from_bytes(data[pos : pos + 4], "little")
        pos += 4
        if size == 0:
            break
        stored, size = size & 0x80000000, size & 0x7FFFFFFF
        block = data[pos : pos + size]
        if len(block) != size:
            raise ValueError("truncated LZ4 block")
        pos += size + (4 if block_checksum else 0)
        room = min(max_block, expected - len(out))
        if stored:
            if size > room:
                raise ValueError("LZ4 block larger than announced")
            out += block
        else:
            _lz4_block(block, out, room, linked)
    pos += 4 if content_checksum else 0
    if len(out) != expected:
        raise ValueError(f"LZ4 frame holds {len(out)} bytes, the chunk header says {expected}")
    return bytes(out)


def bg4_regroup(grouped: bytes) -> bytes:
    """Undo xet-core's byte grouping: group k holds the bytes at positions k, k+4, k+8, …"""
    n = len(grouped)
    split, rem = divmod(n, 4)
    out = bytearray(n)
    pos = 0
    for k in range(4):
        size = split + (1 if rem > k else 0)
        out[k::4] = grouped[pos : pos + size]
        pos += size
    return bytes(out)


def decompress_chunk(scheme: int, data: bytes, size: int) -> bytes:
    if scheme == 0:
        if len(data) != size:
            raise ValueError("uncompressed chunk of the wrong length")
        return data
    if scheme == 1:
        return lz4_frame_decompress(data, size)
    if scheme == 2:
        return bg4_regroup(lz4_frame_decompress(data, size))
    raise ValueError(f"unknown compression scheme {scheme}")


# --------------------------------------------------------------------------- shards
@dataclass(frozen=True)
class Segment:
    xorb: str  # hex
    size: int  # bytes once decompressed
    first_chunk: int
    end_chunk: int  # exclusive


@dataclass(frozen=True)
class ShardFile:
    file_hash: str
    segments: tuple[Segment, ...]
    sha256: str | None  # announced by the client (hf_xet always sends it with huggingface_hub)

    @property
    def size(self) -> int:
        return sum(s.size for s in self.segments)


def parse_shard(data: bytes) -> list[ShardFile]:
    """The file section of an uploaded shard (the xorb section repeats what the xorbs hold)."""
    if len(data) < _ENTRY or data[:32] != SHARD_TAG:
        raise errors.bad_request("This is not a Xet shard (wrong magic number at the start of the body)")
    (version,) = struct.unpack_from("<Q", data, 32)
    if version != 2:
        raise errors.bad_request(f"Xet shard version {version} is not supported (localhub reads version 2)")
    files = []
    pos = _ENTRY
    while True:
        if pos + _ENTRY > len(data):
            raise errors.bad_request("Truncated Xet shard: the file section has no end marker")
        raw_hash = data[pos : pos + 32]
        flags, count = struct.unpack_from("<II", data, pos + 32)
        pos += _ENTRY
        if raw_hash == _BOOKEND:
            return files
        records = count * (2 if flags & _WITH_VERIFICATION else 1) + (1 if flags & _WITH_METADATA_EXT else 0)
        if pos + records * _ENTRY > len(data):
            raise errors.bad_request("Truncated Xet shard: a file entry runs past the end of the body")
        segments = []
        for _ in range(count):
            xorb = hash_hex(data[pos : pos + 32])
            _, size, first, end = struct.unpack_from("<IIII", data, pos + 32)
            if end <= first:
                raise errors.bad_request(f"Xet shard names an empty chunk range [{first}, {end}) of xorb {xorb}")
            segments.append(Segment(xorb, size, first, end))
            pos += _ENTRY
        if flags & _WITH_VERIFICATION:
            pos += count * _ENTRY
        sha256 = None
        if flags & _WITH_METADATA_EXT:
            sha256 = hash_hex(data[pos : pos + 32])  # stored like the merkle hashes, not as digest bytes
            pos += _ENTRY
        files.append(ShardFile(hash_hex(raw_hash), tuple(segments), sha256))


# --------------------------------------------------------------------------- storage
@dataclass(frozen=True)
class ChunkRef:
    offset: int  # of the chunk's data, past its header
    stored: int
    scheme: int
    size: int


class XetStore:
    """Xorbs under `<root>/xet/xorbs/`, and the reassembly of shard files into the blob store.

    The store id goes into casUrl: hf_xet keeps a deduplication cache per CAS URL, and a hub
    started later on the same port with another root must not be offered xorbs it never got.
    """

    def __init__(self, root: Path, blobs: BlobStore):
        self.dir = root / "xet"
        self.xorbs = self.dir / "xorbs"
        self.blobs = blobs
        self.xorbs.mkdir(parents=True, exist_ok=True)
        id_file = self.dir / "store-id"
        if not id_file.exists():
            tmp = self.dir / f".store-id.{os.getpid()}.tmp"
            tmp.write_text(secrets.token_hex(8))
            os.replace(tmp, id_file)
        self.store_id = id_file.read_text().strip()
        self._tables: OrderedDict[str, list[ChunkRef]] = OrderedDict()
        self._lock = threading.Lock()

    def xorb_path(self, xorb: str) -> Path:
        return self.xorbs / xorb[:2] / xorb

    # ----------------------------------------------------------------- xorbs
    def put_xorb(self, xorb: str, body: Body, length: int | None) -> bool:
        """Store a xorb (False when it was already there, as the CAS answers `was_inserted`)."""
        if length is not None and length > MAX_XORB:
            raise errors.HubError(413, f"A xorb is at most {MAX_XORB} bytes; this one is {length}")
        tmp = self.blobs.temp_path(".xorb")
        try:
            received = 0
            with open(tmp, "wb") as fh:
                while chunk := body.read(IO_CHUNK):
                    received += len(chunk)
                    if received > MAX_XORB:
                        raise errors.HubError(413, f"A xorb is at most {MAX_XORB} bytes")
                    fh.write(chunk)
            table = _chunk_table(tmp, xorb)
            target = self.xorb_path(xorb)
            if target.exists():
                return False  # first upload wins, like the CAS: content under a hash never changes
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, target)
            self._remember(xorb, table)
            return True
        finally:
            tmp.unlink(missing_ok=True)

    def _remember(self, xorb: str, table: list[ChunkRef]) -> None:
        with self._lock:
            self._tables[xorb] = table
            self._tables.move_to_end(xorb)
            while len(self._tables) > 256:
                self._tables.popitem(last=False)

    def _table(self, xorb: str) -> list[ChunkRef]:
        with self._lock:
            table = self._tables.get(xorb)
        if table is None:
            path = self.xorb_path(xorb)
            if not path.is_file():
                raise errors.bad_request(
                    f"The shard refers to xorb {xorb}, which was never uploaded here: upload its xorbs first"
                )
            table = _chunk_table(path, xorb)
            self._remember(xorb, table)
        return table

    # ----------------------------------------------------------------- shards
    def reassemble(self, file: ShardFile) -> tuple[str, int]:
        """Write a shard file's bytes into the blob store; returns (sha256, size)."""
        tmp = self.blobs.temp_path(".xet")
        hasher = hashlib.sha256()
        total = 0
        try:
            with open(tmp, "wb") as out:
                for seg in file.segments:
                    table = self._table(seg.xorb)
                    if seg.end_chunk > len(table):
                        raise errors.bad_request(
                            f"The shard asks for chunks [{seg.first_chunk}, {seg.end_chunk}) of xorb {seg.xorb}, "
                            f"which holds {len(table)}"
                        )
                    produced = 0
                    with open(self.xorb_path(seg.xorb), "rb") as fh:
                        for ref in table[seg.first_chunk : seg.end_chunk]:
                            fh.seek(ref.offset)
                            try:
                                data = decompress_chunk(ref.scheme, fh.read(ref.stored), ref.size)
                            except (ValueError, IndexError) as exc:
                                raise errors.bad_request(f"Xorb {seg.xorb} holds a corrupt chunk: {exc}") from None
                            hasher.update(data)
                            out.write(data)
                            produced += len(data)
                    if produced != seg.size:
                        raise errors.bad_request(
                            f"Chunks [{seg.first_chunk}, {seg.end_chunk}) of xorb {seg.xorb} hold {produced} bytes, "
                            f"the shard says {seg.size}"
                        )
                    total += produced
            sha256 = hasher.hexdigest()
            if file.sha256 is not None and file.sha256 != sha256:
                raise errors.bad_request(
                    f"File {file.file_hash} reassembles to sha256 {sha256}, not the {file.sha256} its shard announces"
                )
            self.blobs.adopt(tmp, sha256)
            return sha256, total
        finally:
            tmp.unlink(missing_ok=True)


def _chunk_table(path: Path, xorb: str) -> list[ChunkRef]:
    """Where each chunk of a xorb lies, from the chunk headers (the footer after them is not needed)."""
    table = []
    size = path.stat().st_size
    with open(path, "rb") as fh:
        pos = 0
        while pos + 8 <= size:
            fh.seek(pos)
            header = fh.read(8)
            if header.startswith(_XORB_FOOTER_IDENT):
                break
            version, stored, scheme, plain = header[0], int.from_bytes(header[1:4], "little"), header[4], (
                int.from_bytes(header[5:8], "little"))
            if version != 0 or scheme not in (0, 1, 2) or plain > MAX_CHUNK or stored > 2 * MAX_CHUNK or (
                scheme == 0 and stored != plain
            ) or pos + 8 + stored > size:
                raise errors.bad_request(f"Xorb {xorb} has a malformed chunk header at byte {pos}")
            table.append(ChunkRef(pos + 8, stored, scheme, plain))
            pos += 8 + stored
    if not table:
        raise errors.bad_request(f"Xorb {xorb} holds no chunk")
    return table

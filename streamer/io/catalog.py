"""The catalog: every tensor of the checkpoint (file, dtype, shape, byte range), from headers only.

safetensors headers are untrusted input: a Hub repo can hold anything. Each check below turns a
malformed file into an InputError that names the file and the tensor, before any tensor byte is
read.
"""

from __future__ import annotations

import json
import math
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from streamer.errors import InputError
from streamer.formats import DTYPES, dtype_size, human_bytes, safe_relpath
from streamer.io.source import Source, Span

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
CONFIG_NAME = "config.json"

# safetensors itself refuses headers over 100 MB; a larger length field is corruption or an attack.
MAX_HEADER_BYTES = 100_000_000
# Headers are read in two exact requests (length, then JSON) so no tensor byte is fetched twice;
# many files are read in parallel so the extra round trip costs nothing on a large repo.
HEADER_READERS = 8

# Weights in formats streamer does not convert (PyTorch, GGUF, TF/Keras, Flax, ONNX, TFLite, Rust,
# NumPy, Core ML, Paddle, NeMo): never copied, an unquantized copy would only bloat the output.
WEIGHT_SUFFIXES = (
    ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".keras", ".msgpack", ".onnx", ".onnx_data", ".pkl",
    ".tflite", ".ot", ".npz", ".npy", ".mlmodel", ".pdparams", ".nemo",
)  # fmt: skip
# The files copied as they are: what a loader reads next to the weights (config, tokenizer, chat
# template, code), all small. A larger one is data streamer does not convert; it is left out, and
# what is copied stays far below the memory budget (the files are held until the commit).
MAX_COPY_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as stored in a source file; `span` is absolute within the file."""

    name: str
    file: str
    dtype: str
    shape: tuple[int, ...]
    span: Span

    @property
    def nbytes(self) -> int:
        """Bytes the tensor takes in its file."""
        return self.span.size

    @property
    def key(self) -> tuple[str, int, int]:
        """(file, start, end): where its bytes are; the pipeline hands fetched bytes around by it."""
        return (self.file, self.span.start, self.span.end)


@dataclass
class Catalog:
    """Every tensor of a checkpoint and the files around them, from headers only."""

    tensors: dict[str, TensorInfo]  # name -> info, in shard order then offset order
    shards: list[str]  # weight files the index references, in index order
    copy_files: list[str]  # small files copied to the output as they are
    notices: list[str] = field(default_factory=list)  # skipped files and why, for the plan
    config: dict | None = None
    index_metadata: dict = field(default_factory=dict)
    file_sizes: dict[str, int] = field(default_factory=dict)
    header_bytes: int = 0  # bytes of safetensors headers read to build the catalog

    @property
    def source_bytes(self) -> int:
        """Bytes of every tensor of the checkpoint."""
        return sum(t.nbytes for t in self.tensors.values())


def parse_header(path: str, raw: bytes, file_size: int) -> tuple[int, list[TensorInfo], dict]:
    """Parse the header of the safetensors file PATH from RAW, its first bytes.

    file_size: the file's size (offsets are checked against it). Returns (data_start, tensors,
    metadata). Raises InputError for every malformation. `raw` must hold at least 8 bytes; if it
    does not hold the whole header, the caller reads more (see `header_length`).
    """
    n = header_length(path, raw, file_size)
    if len(raw) < 8 + n:
        raise InputError(f"{path}: header is truncated (need {8 + n} bytes, have {len(raw)})")
    try:
        text = bytes(raw[8 : 8 + n]).decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: header is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        header = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: header is not valid JSON ({e.msg} at char {e.pos})") from None
    except RecursionError:  # `[[[[…` thousands deep: not a header, and no reason to crash
        raise InputError(f"{path}: header is not valid JSON (nested too deeply)") from None
    if not isinstance(header, dict):
        raise InputError(f"{path}: header must be a JSON object, found {type(header).__name__}")

    data_start = 8 + n
    data_len = file_size - data_start
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    # safetensors itself reads __metadata__ as string -> string and refuses anything else
    if not isinstance(metadata, dict):
        raise InputError(
            f"{path}: __metadata__ must be an object of strings, found {_json_type(metadata)} "
            "(the file is corrupt; re-save it)"
        )
    for key, value in metadata.items():
        if not isinstance(value, str):
            raise InputError(
                f"{path}: __metadata__ key {key!r} must hold a string, found {_json_type(value)} "
                "(the file is corrupt; re-save it)"
            )

    tensors = []
    for name, entry in header.items():
        tensors.append(_parse_entry(path, name, entry, data_start, data_len))

    tensors.sort(key=lambda t: t.span.start)
    for prev, cur in zip(tensors, tensors[1:]):
        if cur.span.start < prev.span.end:
            raise InputError(
                f"{path}: tensors {prev.name!r} and {cur.name!r} overlap "
                f"(bytes {prev.span.start}-{prev.span.end} and {cur.span.start}-{cur.span.end})"
            )
    return data_start, tensors, metadata


def header_length(path: str, raw: bytes, file_size: int) -> int:
    """The length of PATH's JSON header, from RAW (at least its first 8 bytes) and FILE_SIZE;
    InputError when the length field cannot be right.
    """
    if file_size < 8 or len(raw) < 8:
        raise InputError(f"{path}: file is {file_size} bytes, too short to hold a safetensors header")
    (n,) = struct.unpack("<Q", bytes(raw[:8]))
    if n > MAX_HEADER_BYTES:
        raise InputError(
            f"{path}: header length field says {n} bytes, over the {MAX_HEADER_BYTES} byte limit "
            "(the file is corrupt or not a safetensors file)"
        )
    if 8 + n > file_size:
        raise InputError(
            f"{path}: header length field ({n} bytes) runs past the end of the {file_size}-byte "
            "file (truncated download?)"
        )
    return n


def _parse_entry(path: str, name: str, entry, data_start: int, data_len: int) -> TensorInfo:
    where = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise InputError(f"{where}: header entry must be an object, found {_json_type(entry)}")
    dtype = entry.get("dtype")
    shape = entry.get("shape")
    offsets = entry.get("data_offsets")
    # Types first: a list dtype would make the lookup below raise TypeError, and JSON `true` is
    # a Python int (bool subclasses int), so `"shape": [true]` must be refused by exact type.
    if not isinstance(dtype, str):
        raise InputError(f"{where}: dtype must be a string such as \"BF16\", found {_json_type(dtype)}")
    if dtype not in DTYPES:
        raise InputError(
            f"{where}: unknown dtype {dtype!r} (known: {', '.join(sorted(DTYPES))})"
        )
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise InputError(f"{where}: shape must be a list of non-negative integers, got {shape!r}")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
        raise InputError(
            f"{where}: data_offsets must be [begin, end] (two non-negative integers), got {offsets!r}"
        )
    begin, end = offsets
    if not 0 <= begin <= end <= data_len:
        raise InputError(
            f"{where}: data_offsets [{begin}, {end}] fall outside the file's {data_len} data bytes"
        )
    expected = math.prod(shape) * dtype_size(dtype)
    if end - begin != expected:
        raise InputError(
            f"{where}: shape {shape} of {dtype} needs {expected} bytes but data_offsets "
            f"span {end - begin}"
        )
    return TensorInfo(name, path, dtype, tuple(shape), Span(data_start + begin, data_start + end))


def _is_count(v) -> bool:
    """A JSON non-negative integer: not a bool, not a float such as 2.0, not a string."""
    return type(v) is int and v >= 0


def _json_type(v) -> str:
    """How a JSON value's type is named in messages (what the user sees in the file)."""
    if v is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string",
            list: "a list", dict: "an object"}.get(type(v), type(v).__name__)  # fmt: skip


def read_header(source: Source, path: str, size: int) -> tuple[int, list[TensorInfo], dict]:
    """(data_start, tensors, metadata) of file PATH (SIZE bytes) of SOURCE, reading exactly its
    header bytes.
    """
    raw = source.read(path, Span(0, min(size, 8)))
    n = header_length(path, raw, size)
    raw = bytes(raw) + bytes(source.read(path, Span(8, 8 + n)))
    return parse_header(path, raw, size)


def _is_weight_file(path: str) -> bool:
    return path.endswith(WEIGHT_SUFFIXES)


def build_catalog(source: Source, *, header_reader=read_header) -> Catalog:
    """The Catalog of SOURCE: read the index (or find the single file), then every referenced
    header (HEADER_READER: how one file's header is read, read_header by default).

    Raises InputError naming the file for a malformed or incomplete checkpoint.
    """
    files = source.files()
    for path in files:
        if safe_relpath(path) is None:
            raise InputError(f"source lists a file name that would escape the output folder: {path!r}")

    notices: list[str] = []
    index_metadata: dict = {}
    if INDEX_NAME in files:
        index = _load_json(source, INDEX_NAME, "the safetensors index")
        if not isinstance(index, dict):
            raise InputError(
                f"{INDEX_NAME} must hold a JSON object with a weight_map, found {_json_type(index)}; "
                "re-save the checkpoint"
            )
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise InputError(f"{INDEX_NAME} has no weight_map object; re-save the checkpoint")
        for name, shard in weight_map.items():
            if not isinstance(shard, str):
                raise InputError(
                    f"{INDEX_NAME}: weight_map[{name!r}] must be a file name (a string), found "
                    f"{_json_type(shard)}; re-save the checkpoint"
                )
        # The metadata is written back into the output index (with a new total_size): a wrong
        # type must fail here, not after every shard is written.
        index_metadata = index.get("metadata")
        if index_metadata is None:
            index_metadata = {}
        if not isinstance(index_metadata, dict):
            raise InputError(
                f"{INDEX_NAME}: metadata must be an object (such as {{\"total_size\": 123}}), "
                f"found {_json_type(index_metadata)}; fix or remove the key"
            )
        shards = sorted(set(weight_map.values()))
        for shard in shards:
            if safe_relpath(shard) is None:
                raise InputError(f"{INDEX_NAME} names a file that would escape the folder: {shard!r}")
        missing = [s for s in shards if s not in files]
        if missing:
            raise InputError(
                f"{INDEX_NAME} references {len(missing)} file(s) that the source does not have: "
                + ", ".join(missing[:5])
            )
    else:
        weight_map = None
        top = [f for f in files if f.endswith(".safetensors") and "/" not in f]
        if SINGLE_NAME in files:
            shards = [SINGLE_NAME]
        elif len(top) == 1:
            shards = top
        elif not top:
            raise InputError(
                "no safetensors weights found (looked for model.safetensors.index.json and "
                "*.safetensors); only safetensors checkpoints can be streamed"
            )
        else:
            raise InputError(
                f"several safetensors files ({', '.join(sorted(top)[:4])}) but no {INDEX_NAME}: "
                "add the index so streamer knows which files form the model"
            )

    tensors: dict[str, TensorInfo] = {}
    with ThreadPoolExecutor(HEADER_READERS, thread_name_prefix="streamer-header") as pool:
        headers = list(pool.map(lambda s: header_reader(source, s, files[s]), shards))
    header_bytes = 0
    for shard, (data_start, infos, _) in zip(shards, headers):
        header_bytes += data_start
        for info in infos:
            if weight_map is not None and weight_map.get(info.name) != shard:
                if info.name in weight_map:
                    raise InputError(
                        f"tensor {info.name!r} is stored in both {shard} and "
                        f"{weight_map[info.name]} (name clash); the index names "
                        f"{weight_map[info.name]}: remove the duplicate"
                    )
                notices.append(f"{shard}: tensor {info.name} is not in the index; skipped")
                continue
            if info.name in tensors:
                raise InputError(
                    f"tensor {info.name!r} is stored in both {tensors[info.name].file} and {shard}"
                )
            tensors[info.name] = info
    if weight_map is not None:
        absent = [n for n, f in weight_map.items() if n not in tensors]
        if absent:
            raise InputError(
                f"{INDEX_NAME} lists {len(absent)} tensor(s) that their file does not hold, "
                f"e.g. {absent[0]!r} in {weight_map[absent[0]]}"
            )

    copy_files = []
    shard_set = set(shards)
    for path in files:
        if path in shard_set or path == INDEX_NAME:
            continue
        if path.endswith(".safetensors"):
            notices.append(f"{path}: not referenced by the index; skipped (not converted, not copied)")
        elif path.endswith(".safetensors.index.json"):
            notices.append(f"{path}: another index; skipped")
        elif _is_weight_file(path):
            notices.append(f"{path}: {path.rsplit('.', 1)[-1]} weights are not converted; skipped")
        elif path in (".gitattributes", "README.md"):
            continue  # the output gets its own model card and attributes
        elif any(part.startswith(".") for part in path.split("/")):
            # .env, .ssh/…, editor and tool state: nothing a loader reads, maybe a secret
            notices.append(f"{path}: hidden file; not copied")
        elif files[path] > MAX_COPY_BYTES:
            notices.append(
                f"{path}: {human_bytes(files[path])}, more than a config or tokenizer file takes "
                f"({human_bytes(MAX_COPY_BYTES)}); not copied"
            )
        else:
            copy_files.append(path)

    config = _load_config(source) if CONFIG_NAME in files else None
    return Catalog(
        tensors=tensors,
        shards=shards,
        copy_files=copy_files,
        notices=notices,
        config=config,
        index_metadata=index_metadata,
        file_sizes=dict(files),
        header_bytes=header_bytes,
    )


# config.json and the index are parsed in memory; real ones are kilobytes (a 1T-parameter index
# is a few MB). Anything far larger is not a config, and would only cost memory.
MAX_JSON_BYTES = 64_000_000

# config.json keys that streamer or serving engines read, with the JSON type each must have.
# A wrong type here would otherwise surface as a Python error mid-run, or as an output config
# that vLLM and transformers refuse.
_CONFIG_TYPES = {
    "architectures": list,
    "model_type": str,
    "quantization_config": dict,
    "compression_config": dict,
    "text_config": dict,
    "vision_config": dict,
    "tie_word_embeddings": bool,
}


def _load_json(source: Source, path: str, what: str):
    size = source.files().get(path, 0)
    if size > MAX_JSON_BYTES:
        raise InputError(
            f"{path} ({what}) is {size} bytes, over the {MAX_JSON_BYTES} byte limit for a JSON "
            f"file streamer parses; it is not a real {what}"
        )
    raw = source.read_file(path)
    try:
        return json.loads(bytes(raw).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path} ({what}) is not valid JSON: {e}") from None
    except RecursionError:  # deeply nested arrays: the parser gives up, the file is not a config
        raise InputError(f"{path} ({what}) is not valid JSON: nested too deeply") from None


def _load_config(source: Source) -> dict:
    """config.json, checked to be an object whose well-known keys have the right types.

    It is copied into the output with `quantization_config` added; a list or null would lose
    `architectures` (or crash), and the output would not load anywhere.
    """
    config = _load_json(source, CONFIG_NAME, "the model config")
    if not isinstance(config, dict):
        raise InputError(
            f"{CONFIG_NAME} must hold a JSON object (the model config), found {_json_type(config)}; "
            "restore the checkpoint's config.json"
        )
    for key, kind in _CONFIG_TYPES.items():
        value = config.get(key)
        if value is None:
            continue
        if not isinstance(value, kind) or (kind is list and not all(isinstance(a, str) for a in value)):
            want = {list: "a list of strings", str: "a string", dict: "an object", bool: "true or false"}[kind]
            raise InputError(
                f"{CONFIG_NAME}: {key!r} must be {want}, found {_json_type(value)}; "
                "fix the checkpoint's config.json"
            )
    return config

"""Facts about names and numbers every layer shares, each written once: safetensors dtypes, Hub repo
ids, output paths, sizes and durations. Nothing here imports torch (front ends start fast), so
torch dtypes are looked up by name when asked for.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import re
from dataclasses import dataclass

from streamer.errors import Hint, HubError, StreamerError

# --- safetensors dtypes --------------------------------------------------------------------------


@dataclass(frozen=True)
class DType:
    """One safetensors dtype: its name in headers, bytes per element, and torch's name for it."""

    name: str
    size: int
    torch_name: str
    is_float: bool = False  # a floating-point weight dtype a scheme quantizes from


# Every dtype the safetensors format defines that a plan can size. Sub-byte dtypes (F4, F6) are
# not listed: no Hugging Face checkpoint stores them as tensors.
DTYPES: dict[str, DType] = {d.name: d for d in (
    DType("F64", 8, "float64"), DType("F32", 4, "float32", True),
    DType("F16", 2, "float16", True), DType("BF16", 2, "bfloat16", True),
    DType("I64", 8, "int64"), DType("I32", 4, "int32"), DType("I16", 2, "int16"), DType("I8", 1, "int8"),
    DType("U64", 8, "uint64"), DType("U32", 4, "uint32"), DType("U16", 2, "uint16"), DType("U8", 1, "uint8"),
    DType("BOOL", 1, "bool"),
    DType("F8_E4M3", 1, "float8_e4m3fn"), DType("F8_E5M2", 1, "float8_e5m2"), DType("F8_E8M0", 1, "float8_e8m0fnu"),
)}  # fmt: skip
FLOAT_DTYPES = frozenset(d.name for d in DTYPES.values() if d.is_float)
# The dense dtypes a quantized source can be dequantized to, by the names users give them.
DEQUANT_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
# What to do with a weight to quantize that holds NaN or Inf: "refuse" (the default) stops the
# run naming the tensor; "passthrough" quantizes it as it is (its scales come out NaN or Inf)
# with a warning. Front ends set it for one call with `nonfinite_policy(...)`; a Runner can also
# be given `allow_nonfinite` directly. Kept here, without torch, so that a mirroring check can ask.
NONFINITE_POLICIES = ("refuse", "passthrough")
_NONFINITE: contextvars.ContextVar[str] = contextvars.ContextVar("streamer_nonfinite", default="refuse")


@contextlib.contextmanager
def nonfinite_policy(policy: str):
    """`with nonfinite_policy("passthrough"): convert(...)` lets NaN/Inf weights through.

    policy: one of NONFINITE_POLICIES, for the conversions run inside the block (this context
    only: other threads and tasks keep theirs)."""
    if policy not in NONFINITE_POLICIES:
        raise StreamerError(
            f"unknown policy for NaN/Inf weights {policy!r}: the choices are {', '.join(NONFINITE_POLICIES)}",
            hints=(Hint("nonfinite", NONFINITE_POLICIES),),
        )
    token = _NONFINITE.set(policy)
    try:
        yield
    finally:
        _NONFINITE.reset(token)


def allows_nonfinite() -> bool:
    """Whether the calling context lets NaN/Inf weights through (see nonfinite_policy)."""
    return _NONFINITE.get() == "passthrough"


# --- schemes -------------------------------------------------------------------------------------

# compressed-tensors' preset schemes that quantize without calibration data (every one streamer
# accepts), named so that a jobs file can be checked without importing compressed-tensors (and
# torch). A preset missing here is still checked by compressed-tensors itself; tests/test_startup.py
# keeps this set equal to streamer.quant.schemes.accepted_presets().
DATA_FREE_SCHEMES = frozenset({
    "FP8_BLOCK", "FP8_DYNAMIC", "INT8", "MXFP4", "MXFP4A16", "MXFP4XFP8", "MXFP6A16", "MXFP6A8",
    "MXFP8", "MXFP8A16", "NVFP4A16", "W2A16", "W2A4", "W2A8", "W3A16", "W3A4", "W3A8", "W4A16",
    "W4A16_ASYM", "W4A4", "W4A8", "W4AFP8", "W5A16", "W5A8", "W6A16", "W6A8", "W7A16", "W7A8",
    "W8A16", "W8A8",
})  # fmt: skip


def dtype_size(name: str) -> int:
    """Bytes per element of the safetensors dtype NAME (KeyError for an unknown one)."""
    return DTYPES[name].size


def torch_dtype(name: str):
    """The torch dtype of the safetensors dtype NAME."""
    import torch

    return getattr(torch, DTYPES[name].torch_name)


def safetensors_name(dtype) -> str:
    """The safetensors name of the torch DTYPE (KeyError when safetensors has none)."""
    wanted = str(dtype).removeprefix("torch.")
    for d in DTYPES.values():
        if d.torch_name == wanted:
            return d.name
    raise KeyError(str(dtype))


# --- Hub tokens ----------------------------------------------------------------------------------

# What an HTTP header can carry: printable ASCII without spaces (Hub tokens are hf_ + letters, digits)
_TOKEN_CHARS = re.compile(r"[\x21-\x7e]+")


def hub_token(token: str | bool | None) -> str | bool | None:
    """TOKEN as the Hub takes it: the whitespace around it (a copied line's end, a Windows file's
    carriage return) dropped, "" as no token. True, False and None pass as they are (None after
    the same check of the HF_TOKEN environment variable, which huggingface_hub then reads).

    A token with spaces, control or non-ASCII characters inside cannot travel in an HTTP header:
    refused here, before any request, in words that do not repeat it (an HTTP library's error
    would quote the header, token and all)."""
    if token is None:  # huggingface_hub reads the variable itself, cleaned as below: the same check
        for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
            env = (os.environ.get(var) or "").replace("\r", "").replace("\n", "").strip()
            if env and not _TOKEN_CHARS.fullmatch(env):
                raise HubError(
                    f"the {var} environment variable holds spaces, control or non-ASCII characters: "
                    "copy the token again from https://huggingface.co/settings/tokens",
                    hints=(Hint("token"),),
                )
            if env:  # the first one set is the one used
                break
        return None
    if not isinstance(token, str):
        return token
    token = token.strip()
    if not token:
        return None
    if not _TOKEN_CHARS.fullmatch(token):
        raise HubError(
            "the Hugging Face token holds spaces, control or non-ASCII characters: copy it again "
            "from https://huggingface.co/settings/tokens",
            hints=(Hint("token"),),
        )
    return token


# --- Hub repo ids --------------------------------------------------------------------------------

# `org/name`: what the Hub accepts as a model repo id (huggingface_hub's validate_repo_id: each
# part at most 96 characters of letters, digits, `_`, `-` and `.`, beginning and ending with a
# letter, digit or `_`; no `--` or `..`; not ending in `.git`).
REPO_ID = re.compile(r"[A-Za-z0-9](?:[\w.-]{0,94}\w)?/\w(?:[\w.-]{0,94}\w)?")


def is_repo_id(text: str) -> bool:
    """TEXT is a Hub repo id `org/name` (no revision)."""
    return (
        REPO_ID.fullmatch(text) is not None and ".." not in text and "--" not in text and not text.endswith(".git")
    )


# A source or destination written `hub://org/name[@rev]` is a Hub repo whatever exists on disk.
HUB_PREFIX = "hub://"


def hub_spec(repo_id: str, revision: str | None = None) -> str:
    """The source or destination spec naming the Hub repo REPO_ID (at REVISION) even where a local
    folder of that name exists (a clone of the repo, a visitor's choice of name on a Space)."""
    return f"{HUB_PREFIX}{repo_id}" + (f"@{revision}" if revision else "")


def split_revision(spec: str) -> tuple[str, str | None]:
    """`org/name@rev` -> ("org/name", "rev"); no `@` (or nothing after it) gives None. `hub://` is dropped."""
    spec = spec.removeprefix(HUB_PREFIX)
    repo, _, rev = spec.partition("@")
    return repo, (rev or None)


# What git (and so the Hub) refuses in a branch name: `..`, `@{`, `//`, spaces and control
# characters, ~ ^ : ? * [ \, a leading `-` or `/`, a trailing `/` or `.`, a part that begins
# with `.` or ends in `.lock`.
_BAD_BRANCH = re.compile(r"\.\.|@\{|//|[\x00-\x20\x7f~^:?*\[\\]|^[-/]|[/.]$|(^|/)\.|\.lock(/|$)")


def is_branch_name(text: str) -> bool:
    """TEXT can name a git branch (as `git check-ref-format --branch` rules, in short), or is a
    pull request's ref `refs/pr/N` (the Hub's other `refs/…` names are not branches)."""
    if text.startswith("refs/"):
        return re.fullmatch(r"refs/pr/[1-9][0-9]*", text) is not None
    return bool(text) and text not in ("@", "HEAD") and _BAD_BRANCH.search(text) is None


def is_commit_sha(text: str) -> bool:
    """TEXT is a full commit sha (40 lowercase hex digits), as the Hub names commits."""
    return re.fullmatch(r"[0-9a-f]{40}", text) is not None


def is_repo_spec(spec: str) -> bool:
    """SPEC reads as `org/name[@revision]` (whether a local folder of that name exists is not asked)."""
    repo, rev = split_revision(spec.strip())
    if "@" in spec and rev is None:
        return False
    return is_repo_id(repo) and (rev is None or not any(c.isspace() for c in rev))


# --- output paths --------------------------------------------------------------------------------


def safe_relpath(path: str) -> str | None:
    """PATH normalized, or None when it would land outside the folder it is relative to.

    A backslash anywhere is refused too: it separates folders on Windows, where `..\\x` escapes.
    """
    if not path or "\x00" in path or "\\" in path or os.path.isabs(path) or path.startswith("/"):
        return None
    norm = os.path.normpath(path)
    if norm == ".." or norm.startswith(".." + os.sep) or norm.startswith("../"):
        return None
    return norm


# --- sizes and durations -------------------------------------------------------------------------


def human_bytes(n: float) -> str:
    """N bytes for people: decimal units, two decimals above a kilobyte ("2.09 GB")."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


def human_duration(seconds: float) -> str:
    """SECONDS as m:ss, or h:mm:ss from an hour."""
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


def parse_size(text: str) -> int:
    """TEXT, a size such as `8GB`, `512MiB` or `1000000`, in bytes (ValueError naming the problem)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?i?b?)?\s*", str(text).lower())
    if not m:
        raise ValueError(f"{text!r} is not a size (try 8GB, 512MiB)")
    num = float(m.group(1))
    unit = (m.group(2) or "b").rstrip("b") or ""
    base = 1024 if unit.endswith("i") else 1000
    power = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}[unit.rstrip("i")]
    size = int(num * base**power)
    if size < 1:  # 0 (or 0.5 bytes) used to mean "the default budget" without a word
        raise ValueError(
            f"{text!r} is less than one byte: a budget must hold at least one tensor; give a "
            "size such as 8GB, or leave the option out for half the free memory"
        )
    return size


def dumps_json(data) -> bytes:
    """DATA as the JSON files streamer writes: indented, keys sorted, one trailing newline."""
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()


# --- tensor and module names ---------------------------------------------------------------------


def natural_key(name: str) -> list:
    """A sort key that orders NAME's numbers by value (`layers.2` before `layers.10`)."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def collapse_names(names: list[str]) -> list[str]:
    """NAMES with layer indices folded: `model.layers.{0..31}.mlp.up_proj.weight  (32)` instead of
    32 lines. Each pattern counts its names when there are several; sorted naturally."""
    groups: dict[str, list[tuple[int, ...]]] = {}
    for n in names:
        nums = tuple(int(x) for x in re.findall(r"(?<=\.)\d+(?=\.|$)", n))
        # the name's own text split around its numbers (not a format string: a name may hold braces)
        parts = tuple(re.split(r"(?<=\.)\d+(?=\.|$)", n))
        groups.setdefault(parts, []).append(nums)
    out = []
    for parts, nums in groups.items():
        if not nums[0]:
            out.append(parts[0])
            continue
        slots = [_ranges(sorted({t[i] for t in nums})) for i in range(len(nums[0]))]
        joined = "".join(p + s for p, s in zip(parts, [*slots, ""]))
        out.append(joined + (f"  ({len(nums)})" if len(nums) > 1 else ""))
    return sorted(out, key=natural_key)


def _ranges(vals: list[int]) -> str:
    if len(vals) == 1:
        return str(vals[0])
    if vals == list(range(vals[0], vals[-1] + 1)):
        return f"{{{vals[0]}..{vals[-1]}}}"
    return "{" + ",".join(map(str, vals)) + "}"

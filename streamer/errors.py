"""Errors a user can act on. Every message names the problem; its hints name what to change.

A message is written once, in no front end's words: it says what is wrong ("the model needs
2.1 GB of memory to convert, more than the 1 MB allowed"). What the user can do about it is a
`Hint`: a *setting* (from `SETTINGS`) and, where one is known, the value to give it. Each front end
words hints for itself: the command line as flags (`--max-memory 4GB`), the web app as its form's
fields, and the Python API (`str(error)`) as `convert()`'s parameters. Several hints on one error
are alternatives: any one of them gets past it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Sequence

# The settings a hint can name: the vocabulary every front end words (tests check each front end
# has words for all of them). Each is named after `convert()`'s parameter where there is one.
SETTINGS = {
    "ignore": "keep these modules unquantized (value: the entries to add)",
    "skip_incompatible": "keep the weights the scheme cannot serve unquantized",
    "default_ignore": "turn the default policy off (quantize embeddings, routers …)",
    "quantize_towers": "quantize vision/audio towers too",
    "scheme": "choose another scheme (value: a scheme that fits, when one is known)",
    "scheme_file": "describe a custom scheme in a file",
    "max_memory": "raise the memory budget (value: a size that is enough)",
    "device": "run on another device (value: the device to use)",
    "nonfinite": "what to do with NaN/Inf weights (value: the policy)",
    "dequant_dtype": "the dtype a quantized source is dequantized to (value: the choices)",
    "force": "do it anyway (re-quantize a source that is already in the scheme)",
    "overwrite": "replace what is at the destination",
    "create_pr": "open the conversion as a pull request instead",
    "target": "choose another destination",
    "public": "publish the copy publicly although the source is private or gated",
    "token": "give a Hugging Face token (or one with access to this repo)",
    "revision": "name an existing branch, tag or commit of the source",
    "source": "check the source repo id or folder",
    "retry": "try again later: the failure was on the other side",
}


@dataclass(frozen=True)
class Hint:
    """One way past an error: change SETTING (one of `SETTINGS`), to VALUE where one is known.

    VALUE is a string, or a tuple of strings for a setting that takes several (ignore entries).
    """

    setting: str
    value: str | tuple[str, ...] | None = None

    def __post_init__(self):
        if self.setting not in SETTINGS:
            raise ValueError(f"unknown hint setting {self.setting!r}; add it to streamer.errors.SETTINGS")

    @property
    def values(self) -> tuple[str, ...]:
        """VALUE as a tuple (empty when there is none)."""
        if self.value is None:
            return ()
        return (self.value,) if isinstance(self.value, str) else tuple(self.value)


@dataclass(frozen=True)
class Note:
    """A sentence for the user that is not an error (who will see the result, a warning), with
    hints each front end words as it words an error's (`Progress.note`)."""

    message: str
    hints: tuple[Hint, ...] = ()


def with_hints(message: str, hints: Sequence[Hint], words: Callable[[Hint], str]) -> str:
    """MESSAGE followed by its hints in one front end's WORDS, as alternatives."""
    said = [w for w in dict.fromkeys(words(h) for h in hints) if w]
    if not said:
        return message
    if "\n" in message:  # a list of problems: the ways past them on their own line, not glued to the last
        return f"{message}\nto go on: {' or '.join(said)}"
    return f"{message}: {' or '.join(said)}"


def api_words(hint: Hint) -> str:
    """A hint in the Python API's words: `convert()`'s parameter to change."""
    v = hint.values
    s = hint.setting
    if s == "ignore":
        return "add " + ", ".join(repr(x) for x in v) + " to ignore=[…]" if v else "add the module to ignore=[…]"
    if s in ("skip_incompatible", "quantize_towers", "force", "overwrite", "create_pr"):
        return f"pass {s}=True"
    if s == "default_ignore":
        return "pass default_ignore=False"
    if s == "public":
        return "pass private=False"
    if s == "token":
        return "give a valid token with access (token= or HF_TOKEN)"
    if s == "max_memory":
        return f"pass max_memory={v[0]!r} or more" if v else "raise max_memory"
    if s in ("scheme", "device", "nonfinite", "dequant_dtype"):
        return f"use {s}=" + " or ".join(repr(x) for x in v) if v else f"choose another {s}="
    if s == "scheme_file":
        return "describe a custom scheme with scheme_file="
    if s == "target":
        return "choose another destination"
    if s == "revision":
        return "check the revision (branch, tag or commit)"
    if s == "source":
        return "check the source"
    return "try again in a moment"


# A Hub token, or the Authorization header that carries one, inside some library's error text
_SECRET = re.compile(r"\bBearer\s+\S+|\bhf_[A-Za-z0-9]{8,}")


def redact(text: str) -> str:
    """TEXT with anything that looks like a token (hf_…, or an Authorization header's value)
    replaced by <token>: for library error texts that end up in a message."""
    return _SECRET.sub("<token>", text)


class StreamerError(Exception):
    """Base class: front ends print the message with their wording of its hints (never a traceback)
    and exit non-zero. `str(error)` words the hints as the Python API's parameters."""

    exit_code = 2

    def __init__(self, message: str = "", *, hints: Sequence[Hint] = ()):
        super().__init__(message)
        self.message = message
        self.hints = tuple(hints)

    def __str__(self) -> str:
        return with_hints(self.message, self.hints, api_words)


class InputError(StreamerError):
    """The source checkpoint is malformed or incomplete."""


class PlanError(StreamerError):
    """The checkpoint cannot be converted with the requested scheme; raised before any tensor byte is read."""

    def __init__(self, problems: list[str], *, hints: Sequence[Hint] = ()):
        self.problems = list(problems)
        shown = self.problems[:20]
        more = len(self.problems) - len(shown)
        text = "the conversion cannot be planned:\n" + "\n".join(f"  - {p}" for p in shown)
        if more > 0:
            text += f"\n  … and {more} more"
        super().__init__(text, hints=hints)


class SchemeError(StreamerError):
    """Unknown or unsupported quantization scheme."""


class HubError(StreamerError):
    """A Hub call failed in a way the user can fix (auth, missing repo, gated repo …)."""


class TargetError(StreamerError):
    """The destination cannot be written (exists, not empty, escapes the folder …)."""


class Cancelled(StreamerError):
    """The run was stopped on request (Ctrl-C, the web app's Cancel, a mirroring job's stop).

    Not a fault of the input: front ends say that nothing was published, and exit 130."""

    exit_code = 130

    def __init__(self, message: str = "cancelled"):
        super().__init__(message)

"""Errors in the command line's words: each hint becomes the flag to pass."""

from __future__ import annotations

import shlex

from streamer.errors import Hint, StreamerError, with_hints

_SWITCHES = {
    "skip_incompatible": "pass --skip-incompatible to keep them unquantized",
    "default_ignore": "pass --no-default-ignore",
    "quantize_towers": "pass --quantize-towers",
    "force": "pass --force to do it anyway",
    "overwrite": "pass --overwrite to replace it",
    "create_pr": "pass --create-pr to open a pull request instead",
    "public": "pass --public to publish it",
    "token": "give a valid token with access (--token or HF_TOKEN)",
    "scheme_file": "use --scheme-file for a custom scheme",
    "target": "choose another destination",
    "revision": "check the branch, tag or commit after '@'",
    "source": "check the source repo id or folder",
    "retry": "try again in a moment",
}


def cli_words(hint: Hint) -> str:
    """HINT as the flag (and value) to pass on the command line."""
    v = hint.values
    s = hint.setting
    if s == "ignore":
        # quoted for the shell where needed: re:model\.layers\.\d+ pasted bare loses its backslashes
        return " ".join(f"--ignore {shlex.quote(x)}" for x in v) if v else "ignore the module with --ignore"
    if s == "max_memory":
        return f"pass --max-memory {v[0]} or more" if v else "raise --max-memory"
    if s in ("scheme", "device", "nonfinite", "dequant_dtype"):
        flag = "--" + s.replace("_", "-")
        return f"use {flag} " + " or ".join(v) if v else f"choose another {flag}"
    return _SWITCHES[s]


def to_target_words(hint: Hint) -> str:
    """HINT for a `--to DST SCHEME` target: its scheme (a preset or a file) is its SCHEME."""
    if hint.setting == "scheme_file":
        return "give a scheme file (.json/.yaml) as that --to's SCHEME for a custom scheme"
    if hint.setting == "scheme":
        return "give " + " or ".join(hint.values) + " as that --to's SCHEME" if hint.values else "choose another SCHEME for that --to"
    return cli_words(hint)


def describe(error: StreamerError, to_target: bool = False) -> str:
    """ERROR's message with its hints as flags: what `streamer` prints after "error: ". TO_TARGET:
    the error of a `--to DST SCHEME` target, whose scheme is not --scheme."""
    return with_hints(error.message, error.hints, to_target_words if to_target else cli_words)

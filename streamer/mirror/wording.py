"""Errors in a mirroring run's words: a hint becomes the jobs-file key to set, or the `mirror`
command's flag where the setting is one of the run's (`--token`, `--max-memory`)."""

from __future__ import annotations

from streamer.cli.wording import cli_words
from streamer.errors import Hint, StreamerError, with_hints

# The settings a [[job]] table holds, under the setting's own name.
_JOB_SWITCHES = ("skip_incompatible", "quantize_towers", "overwrite", "create_pr")
_JOB_CHOICES = ("scheme", "device", "dequant_dtype", "nonfinite")


def _toml_string(text: str) -> str:
    """TEXT as a TOML string to paste: a literal string ('…', backslashes as they are) for a
    pattern such as re:model\\.layers\\.\\d+, a basic one ("…") where it holds a quote."""
    return f"'{text}'" if "'" not in text and "\n" not in text else '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def job_words(hint: Hint) -> str:
    """HINT as the change to make to the failing job in the jobs file (or to the command line)."""
    v = hint.values
    s = hint.setting
    if s == "ignore":
        entries = ", ".join(_toml_string(x) for x in v)
        return f"add {entries} to ignore = [...] in this job" if v else "add the module to ignore = [...] in this job"
    if s in _JOB_SWITCHES:
        return f"set {s} = true in this job"
    if s == "default_ignore":
        return "set default_ignore = false in this job"
    if s == "public":
        return "set private = false in this job"
    if s == "target":
        return "choose another target for this job"
    if s in _JOB_CHOICES:
        return f"set {s} = " + " or ".join(f'"{x}"' for x in v) + " in this job" if v else f"choose another {s} for this job"
    return cli_words(hint)


def describe(error: StreamerError) -> str:
    """ERROR's message with its hints in a mirroring run's words (what a failed job reports)."""
    return with_hints(error.message, error.hints, job_words)

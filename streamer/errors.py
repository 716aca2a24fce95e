"""Errors a user can act on. Every message names the problem and what to do about it."""

from __future__ import annotations


class StreamerError(Exception):
    """Base class: the CLI prints the message (never a traceback) and exits non-zero."""

    exit_code = 2


class InputError(StreamerError):
    """The source checkpoint is malformed or incomplete."""


class PlanError(StreamerError):
    """The checkpoint cannot be converted with the requested scheme; raised before any tensor byte is read."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        shown = self.problems[:20]
        more = len(self.problems) - len(shown)
        text = "the conversion cannot be planned:\n" + "\n".join(f"  - {p}" for p in shown)
        if more > 0:
            text += f"\n  … and {more} more"
        super().__init__(text)


class SchemeError(StreamerError):
    """Unknown or unsupported quantization scheme."""


class HubError(StreamerError):
    """A Hub call failed in a way the user can fix (auth, missing repo, gated repo …)."""


class TargetError(StreamerError):
    """The destination cannot be written (exists, not empty, escapes the folder …)."""

"""Errors as the page shows them: one sentence, in the form's words, never a traceback.

The engine's errors carry hints (`streamer.errors.Hint`): `web_words` says each as the field of the
form to change, or, for what the form does not offer, what the Space does instead.
"""

from __future__ import annotations

import html
import logging
import re
import time

import gradio as gr
from huggingface_hub.errors import HfHubHTTPError

from streamer.errors import Hint, PlanError, StreamerError, with_hints
from streamer.formats import collapse_names
from streamer.io.hub_http import hub_endpoint
from streamer.web import settings

log = logging.getLogger("streamer.app")

SKIP_INCOMPATIBLE_LABEL = "Keep weights the scheme cannot serve unquantized"
CREATE_PR_LABEL = "Open as a pull request"


class UserError(Exception):
    """A sentence for the user, raised by the app itself (bad input, not signed in …)."""


def sign_in_words() -> str:
    """How this visitor gives the app a token: the sign-in button on a Space, else the machine's token."""
    if settings.ON_SPACES:
        return "sign in with Hugging Face"
    return "set HF_TOKEN or run `hf auth login` where the app runs"


# The settings the form has no field for: the Space decides them itself, so the hint says what the
# command-line streamer (which has them) would do, or what the Space does instead; never a flag.
_ELSEWHERE = {
    "default_ignore": "quantize them too with the command-line streamer",
    "quantize_towers": "quantize the vision/audio towers too with the command-line streamer",
    "scheme_file": "describe a custom scheme for the command-line streamer",
    "force": "pick another scheme",
    "public": "this Space keeps such a copy private",
}
# ... and those of them that take a value: (words with the value {v}, words without one)
_ELSEWHERE_VALUE = {
    "max_memory": ("convert it with the command-line streamer and a memory budget of {v} or more",
                   "convert it with the command-line streamer and a larger memory budget"),
    "device": ("convert it with the command-line streamer on {v}", "convert it with the command-line streamer on another device"),
    "nonfinite": ("quantize it anyway with the command-line streamer (non-finite policy {v})",
                  "quantize it anyway with the command-line streamer"),
    "dequant_dtype": ("dequantize to {v} with the command-line streamer", "dequantize to another dtype with the command-line streamer"),
}  # fmt: skip


def web_words(hint: Hint) -> str:
    """HINT in the form's words: the field to change and, where known, what to put in it.

    hint: one way past an error (its setting is one of `streamer.errors.SETTINGS`)."""
    v = hint.values
    s = hint.setting
    if s == "ignore":  # the field takes one entry a line: each is quoted, to be copied as it is
        if not v:
            return "add this module to the ignore list"
        entries = ", ".join(f"“{x}”" for x in v)
        return f"add {entries} to the ignore list" if len(v) == 1 else f"add these lines to the ignore list: {entries}"
    if s == "skip_incompatible":
        return f"tick “{SKIP_INCOMPATIBLE_LABEL}”"
    if s in ("create_pr", "overwrite"):  # the Space never replaces a repo: a pull request proposes it
        return f"open the conversion as a pull request (tick “{CREATE_PR_LABEL}”)"
    if s == "scheme":
        if not v:
            return "pick another scheme"
        return f"pick {v[0]} as the scheme" if len(v) == 1 else f"pick one of {', '.join(v)} as the scheme"
    if s == "target":
        return "choose another target repo name"
    if s == "token":
        return sign_in_words()
    if s == "revision":
        return "check the branch, tag or commit in “Revision”"
    if s == "source":
        return "check the repo id in “Source model”"
    if s == "retry":
        return "try again in a moment"
    if s in _ELSEWHERE_VALUE:
        with_value, without = _ELSEWHERE_VALUE[s]
        return with_value.format(v=" or ".join(v)) if v else without
    return _ELSEWHERE[s]


def for_web(message: str) -> str:
    """MESSAGE (an engine's note or warning, or an error's text) as the page shows it: links to the
    Hub this app talks to, and the one engine sentence that carries no hint in the form's words.

    message: the text to show."""
    swaps = [
        # streamer.io.hub_http.explain of a gated repo: the visitor's own token is the one used
        ("run again with that account's token", "try again"),
    ]
    for old, new in swaps:
        message = message.replace(old, new)
    if hub_endpoint() != "https://huggingface.co":
        message = message.replace("https://huggingface.co/", hub_endpoint() + "/")
    return message


def sentence(e: BaseException) -> str:
    """What to tell the user about an error. Unexpected errors get a generic sentence (logged here).

    e: the error a request ended with."""
    if isinstance(e, PlanError):
        # the hints go on a line of their own, after the list of problems they answer
        ways = with_hints("To convert it", e.hints, web_words) if e.hints else ""
        return for_web(plan_problems(e.problems) + (f"\n{ways}" if ways else ""))
    if isinstance(e, StreamerError):
        return for_web(with_hints(e.message, e.hints, web_words))
    if isinstance(e, UserError):
        return for_web(str(e))
    if isinstance(e, HfHubHTTPError):
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status in (401, 403):
            return "The Hub refused this with your sign-in (no access, or the token expired): sign in again."
        return f"The Hub could not answer ({status or type(e).__name__}); try again in a moment."
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    log.error("unexpected %s at %s", type(e).__name__, stamp, exc_info=(type(e), e, e.__traceback__))
    return (
        f"Something went wrong on our side ({type(e).__name__}); nothing was published. "
        f"Try again, and if it happens again report it with this time: {stamp}."
    )


def plan_problems(problems: list[str], limit: int = 8) -> str:
    """A PlanError's problems grouped by reason: one line per reason, with the tensors it hits.

    problems: "tensor: why" lines, as PlanError.problems holds them.
    limit: at most this many reasons are listed, then how many more there are."""
    groups: dict[str, list[str]] = {}
    for p in problems:
        name, sep, why = p.partition(": ")
        if not sep or " " in name:
            name, why = "", p
        why = re.sub(r"^weight of shape \[[\d, ]*\]: ", "", why)
        groups.setdefault(why, []).append(name)
    lines = []
    for why, names in list(groups.items())[:limit]:
        names = [n for n in names if n]
        if names:
            shown = collapse_names(names)
            where = ", ".join(shown[:6]) + (f", … ({len(shown) - 6} more)" if len(shown) > 6 else "")
            lines.append(f"- {where}: {why}")
        else:
            lines.append(f"- {why}")
    if len(groups) > limit:
        lines.append(f"- … and {len(groups) - limit} more problems")
    return "This model cannot be converted with these settings:\n" + "\n".join(lines)


def fail(e: BaseException) -> gr.Error:
    """The error an API endpoint raises for E, so that gradio_client callers get its sentence.

    e: the error the request ended with."""
    return gr.Error(sentence(e), duration=15, title="Cannot do that", print_exception=False)


_URL = re.compile(r"(https?://[^\s<>\"')]+[^\s<>\"').,;:])")


def error_box(message: str) -> str:
    """The one place an error is shown: a single alert in the status line (never gr.Error in the
    page, which stamps a badge on every output and repeats the sentence).

    message: the sentence (plain text; links become clickable)."""
    text = _URL.sub(r'<a href="\1" target="_blank" rel="noopener">\1</a>', html.escape(message))
    return f'<div class="streamer-error" role="alert">{"<br>".join(text.split(chr(10)))}</div>'

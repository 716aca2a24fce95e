"""Convert: a worker thread runs the engine; a generator turns its events into the page's updates.

The run publishes to the visitor's own namespace with the visitor's own token, holds the user's one
slot (streamer.web.slots) while it runs, and stops, committing nothing, when Cancel is clicked or
the page goes away.
"""

from __future__ import annotations

import html
import queue
import re
import threading
import time

import gradio as gr
from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError

from streamer.engine.budget import default_memory_budget
from streamer.engine.convert import convert
from streamer.engine.progress import Progress, ProgressEvent
from streamer.engine.suggest import parse_ignore, suggest_repo_name
from streamer.errors import Cancelled
from streamer.io.hub_http import hub_endpoint
from streamer.mirror.check import check_job
from streamer.mirror.jobs import MirrorJob
from streamer.web import settings, slots
from streamer.web.auth import Account, require_token, whoami
from streamer.web.forms import check_scheme, parse_source, source_spec, target_of
from streamer.web.progress import RUNNING, RateWindow, progress_html
from streamer.web.results import cancelled_html, proposed_html, published_html
from streamer.web.wording import UserError, error_box, fail, for_web, sentence


def _exists(target: str, token) -> bool | None:
    """Does TARGET exist (None: could not tell)."""
    try:
        HfApi(endpoint=hub_endpoint(), token=token).model_info(target)
        return True
    except HfHubHTTPError as e:
        return False if getattr(e.response, "status_code", None) in (401, 404) else None
    except Exception:
        return None


def _existing_pr(repo, rev, target, scheme, ignore_list, skip_incompatible, token) -> str | None:
    """The URL of a pull request on TARGET that already proposes this exact conversion (same
    source commit and settings, as its model card records them), or None. Mirroring uses the
    same check so that it never opens the same PR twice; neither does the form."""
    job = MirrorJob(name="space", source=repo, target=target, scheme=scheme, ignore=tuple(ignore_list),
                    source_revision=rev, create_pr=True, skip_incompatible=bool(skip_incompatible))  # fmt: skip
    try:
        check = check_job(job, token=token, endpoint=hub_endpoint())
    except Exception:  # cannot tell: converting again is the safe answer
        return None
    if check.up_to_date and (check.where or "").startswith("refs/pr/"):
        return f"{hub_endpoint()}/{target}/discussions/{check.where.rsplit('/', 1)[-1]}"
    return None


def _convert(source, revision, scheme, ignore, namespace, repo_name, private, create_pr, skip_incompatible,
             oauth_token):  # fmt: skip
    """Quantize the source and publish it; yields (status, progress, log, result) and returns the
    error sentence when it failed (None otherwise). Status is only written at the start and the
    end, so a "Cancelling…" written there by the Cancel button stays until the run has stopped."""
    log_lines: list[str] = []

    def log_text() -> str:
        return "\n".join(log_lines[-400:])

    def say(text: str) -> None:
        log_lines.append(f"{time.strftime('%H:%M:%S')}  {text}")

    t0 = time.monotonic()
    try:
        token = require_token(oauth_token)
        account = whoami(token)
        repo, rev = parse_source(source, revision)
        scheme = check_scheme(scheme)
        target = target_of(namespace, repo_name, account, suggest_repo_name(repo, scheme))
        if target == repo:
            raise UserError("The target repo is the source repo: choose another name.")
        ignore_list = parse_ignore(ignore)
        slot = slots.claim(account.name, target)
    except Exception as e:
        message = sentence(e)
        yield error_box(message), progress_html({}, 0, "Idle"), "", ""
        return message

    events: queue.Queue = queue.Queue()
    outcome: dict = {}
    existed: list[bool | None] = []

    def worker() -> None:
        try:
            existed.append(_exists(target, token))
            if create_pr and existed[0]:
                pr = _existing_pr(repo, rev, target, scheme, ignore_list, skip_incompatible, token)
                if pr:
                    outcome["duplicate_pr"] = pr
                    return
            outcome["result"] = convert(
                source_spec(repo, rev), f"hub://{target}", scheme=scheme, ignore=ignore_list, token=token,
                # unticked: as the source (a private or gated source makes a private target)
                private=True if private else None, create_pr=bool(create_pr), device="auto",
                skip_incompatible=bool(skip_incompatible),
                max_memory=max(default_memory_budget() // settings.MAX_CONVERSIONS, 1 << 30),
                progress=Progress(listeners=[events.put]), cancel=slot.cancel,
            )  # fmt: skip
        except Cancelled:
            outcome["cancelled"] = True
        except BaseException as e:  # noqa: BLE001 - every failure becomes a sentence
            if slot.cancel.is_set():
                outcome["cancelled"] = True  # a transfer cut short by the cancel, not a failure
            else:
                outcome["error"] = e
        finally:
            slots.release(account.name, slot)
            events.put(None)

    say(f"{account.name}: {repo}{'@' + rev if rev else ''} → {target} with {scheme}")
    say(f"ignore: {', '.join(ignore_list) or '(nothing)'}")
    thread = threading.Thread(target=worker, name=f"convert-{account.name}", daemon=True)
    stages: dict[str, ProgressEvent] = {}
    window = RateWindow()
    finished = False
    try:
        thread.start()
    except BaseException:
        slots.release(account.name, slot)
        raise
    try:
        yield "", progress_html(stages, 0, "Starting"), log_text(), ""
        last = 0.0
        while not finished:
            try:
                ev = events.get(timeout=0.25)
            except queue.Empty:
                ev = False
            while ev is not False:
                if ev is None:
                    finished = True
                elif ev.stage == "log":
                    say(for_web(ev.message))  # the engine's notes speak CLI too
                else:
                    stages[ev.stage] = ev
                try:
                    ev = events.get_nowait()
                except queue.Empty:
                    ev = False
            now = time.monotonic()
            if not finished and now - last >= 0.25:
                last = now
                state = "Cancelling" if slot.cancel.is_set() else "Converting"
                window.add(now, stages)
                yield gr.update(), progress_html(stages, now - t0, state, window.rates(now)), log_text(), gr.update()
        thread.join()
    finally:
        if not finished:  # the page went away mid-run: stop the conversion, commit nothing
            slot.cancel.set()

    elapsed = time.monotonic() - t0
    moving = None  # a finished run shows no rates
    if "duplicate_pr" in outcome:
        say(f"a pull request already proposes this conversion: {outcome['duplicate_pr']}")
        yield "", progress_html(stages, elapsed, "Done", moving), log_text(), proposed_html(outcome["duplicate_pr"], target)
        return None
    if "result" in outcome:
        result = outcome["result"]
        is_private = bool(private) or bool(getattr(_info(target, token), "private", False))
        yield "", progress_html(stages, elapsed, "Done", moving), log_text(), published_html(
            result, target, bool(create_pr), is_private, token
        )
        return None
    created = existed and existed[0] is False and _exists(target, token)
    if outcome.get("cancelled"):
        say("cancelled: nothing was committed")
        removed = bool(existed) and existed[0] is False and not created
        yield "", progress_html(stages, elapsed, "Cancelled", moving), log_text(), cancelled_html(target, removed)
        return None
    message = sentence(outcome.get("error") or RuntimeError("no result"))
    say("failed: nothing was committed")
    if created:
        # The run created the repo and the failure left it (empty: nothing was committed). Say so
        # plainly, and that a rerun resumes: the shards already uploaded are not sent again.
        message += (
            f"\n\n{target} was created for this run and is still there, empty (nothing was committed). "
            "Convert again with the same settings to resume (shards already uploaded are not sent again), "
            "or delete the repo from its settings page."
        )
    yield error_box(message), progress_html(stages, elapsed, "Failed", moving), log_text(), ""
    return message


def _info(target: str, token):
    try:
        return HfApi(endpoint=hub_endpoint(), token=token).model_info(target)
    except Exception:
        return None


def run_convert(
    source: str,
    revision: str,
    scheme: str,
    ignore: str,
    namespace: str,
    repo_name: str,
    private: bool,
    create_pr: bool,
    skip_incompatible: bool = False,
    oauth_token: gr.OAuthToken | None = None,
):
    """Quantize the source and publish it in one commit; streams progress and a log.
    (The /convert endpoint: a failure is also raised, so that gradio_client callers get an error.)

    source, revision, scheme, ignore, namespace, repo_name, private, create_pr, skip_incompatible:
        the form's fields.
    oauth_token: what gradio passes for the signed-in visitor (None when signed out)."""
    message = yield from _convert(source, revision, scheme, ignore, namespace, repo_name, private, create_pr,
                                  skip_incompatible, oauth_token)  # fmt: skip
    if message:
        raise gr.Error(message, duration=15, title="Conversion failed", print_exception=False)


def run_convert_ui(
    source: str,
    revision: str,
    scheme: str,
    ignore: str,
    namespace: str,
    repo_name: str,
    private: bool,
    create_pr: bool,
    skip_incompatible: bool = False,
    oauth_token: gr.OAuthToken | None = None,
):
    """The page's Convert button: the error is shown once (status line), never raised; Cancel is
    clickable only while this run is going.

    source, revision, scheme, ignore, namespace, repo_name, private, create_pr, skip_incompatible:
        the form's fields.
    oauth_token: what gradio passes for the signed-in visitor (None when signed out)."""
    for out in _convert(source, revision, scheme, ignore, namespace, repo_name, private, create_pr,
                        skip_incompatible, oauth_token):  # fmt: skip
        state = re.search(r'data-state="(\w+)"', out[1] if isinstance(out[1], str) else "")
        running = bool(state) and state.group(1) in (*RUNNING, "Cancelling")
        yield *out, gr.update(interactive=running)


def cancel(oauth_token: gr.OAuthToken | None = None) -> str:
    """The /cancel endpoint: stop this user's running conversion; the target is left as it was.

    oauth_token: what gradio passes for the signed-in caller (None when signed out)."""
    try:
        account = whoami(require_token(oauth_token))
    except Exception as e:
        raise fail(e) from None
    return _cancel(account)


def cancel_ui(oauth_token: gr.OAuthToken | None = None) -> str:
    """The page's Cancel button: as /cancel, with an error shown in the status line, not raised.

    oauth_token: what gradio passes for the signed-in visitor (None when signed out)."""
    try:
        account = whoami(require_token(oauth_token))
    except Exception as e:
        return error_box(sentence(e))
    return _cancel(account)


def _cancel(account: Account) -> str:
    slot = slots.cancel(account.name)
    if slot is None:
        return "No conversion of yours is running."
    return f"Cancelling the conversion to {html.escape(slot.target)}…"

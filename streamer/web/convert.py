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
from dataclasses import dataclass

import gradio as gr
from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError

from streamer.engine.budget import default_memory_budget
from streamer.engine.convert import Target, convert, convert_many
from streamer.engine.progress import Progress, ProgressEvent
from streamer.engine.suggest import parse_ignore, suggest_repo_name
from streamer.errors import Cancelled
from streamer.formats import HUB_PREFIX, hub_spec
from streamer.io.hub_http import hub_endpoint
from streamer.mirror.check import check_job
from streamer.mirror.jobs import MirrorJob
from streamer.web import settings, slots
from streamer.web.auth import Account, require_token, whoami
from streamer.web.forms import check_extra_schemes, check_scheme, parse_source, source_spec, target_of, targets_of
from streamer.web.progress import RUNNING, RateWindow, progress_html
from streamer.web.results import TargetOutcome, cancelled_html, fanout_html, proposed_html, published_html
from streamer.web.wording import UserError, error_box, fail, for_web, sentence, web_words


def _memory_share() -> int:
    """The memory budget of one conversion: this machine's, shared by the conversions it runs at
    once, and never below 1 GB."""
    return max(default_memory_budget() // settings.MAX_CONVERSIONS, 1 << 30)


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
             oauth_token, extra_schemes=None, extra_names=""):  # fmt: skip
    """Quantize the source and publish it; yields (status, progress, log, result) and returns the
    error sentence when it failed (None otherwise). Status is only written at the start and the
    end, so a "Cancelling…" written there by the Cancel button stays until the run has stopped.
    With extra schemes ("Also publish as") one read of the source feeds every target: _convert_many."""
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
        extra = check_extra_schemes(extra_schemes, scheme)
        if extra:
            targets = targets_of(namespace, repo_name, account, repo, scheme, extra, extra_names)
            repos = [t for t, _ in targets]
        else:
            repos = [target_of(namespace, repo_name, account, suggest_repo_name(repo, scheme))]
        target = ", ".join(repos)
        if repo.lower() in (r.lower() for r in repos):  # the Hub ignores case in repo ids
            raise UserError("The target repo is the source repo: choose another name.")
        ignore_list = parse_ignore(ignore)
        slot = slots.claim(account.name, target, repos)
    except Exception as e:
        message = sentence(e)
        yield error_box(message), progress_html({}, 0, "Idle"), "", ""
        return message
    if extra:
        run = _Run(account, token, repo, rev, ignore_list, bool(private), bool(create_pr), bool(skip_incompatible), slot)
        return (yield from _convert_many(run, targets, t0))

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
                source_spec(repo, rev), hub_spec(target), scheme=scheme, ignore=ignore_list, token=token,
                # unticked: as the source (a private or gated source makes a private target)
                private=True if private else None, create_pr=bool(create_pr), device="auto",
                skip_incompatible=bool(skip_incompatible),
                max_memory=_memory_share(),
                progress=Progress(listeners=[events.put], hint_words=web_words), cancel=slot.cancel,
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
    stages: dict[str, ProgressEvent] = {}
    yield from _follow(worker, account, slot, events, stages, t0, say, log_text)

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


def _follow(worker, account: Account, slot: slots.Slot, events: queue.Queue, stages: dict, t0: float, say, log_text):
    """Run WORKER in a thread and yield the page's updates from the EVENTS it sends (its Progress
    events, then None when it ends) until it has ended; STAGES keeps the last event of each stage.
    The page going away mid-run cancels the conversion: nothing is committed."""
    thread = threading.Thread(target=worker, name=f"convert-{account.name}", daemon=True)
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
                    # the engine's notes speak CLI too; a fan-out names each target's as hub://…
                    say(for_web(ev.message.removeprefix(HUB_PREFIX)))
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


@dataclass(frozen=True)
class _Run:
    """What every target of a fan-out shares: who runs it, the source and the form's settings."""

    account: Account
    token: object
    repo: str
    rev: str | None
    ignore: list[str]
    private: bool
    create_pr: bool
    skip_incompatible: bool
    slot: slots.Slot


def _convert_many(run: _Run, targets: list[tuple[str, str]], t0: float):
    """The fan-out: every (target, scheme) from one read of the source (convert_many), under one
    set of bars; the result panel has a line per target, so one failing target hides none of
    the others. Returns the error sentence when no target was published (None otherwise)."""
    log_lines: list[str] = []

    def log_text() -> str:
        return "\n".join(log_lines[-400:])

    def say(text: str) -> None:
        log_lines.append(f"{time.strftime('%H:%M:%S')}  {text}")

    events: queue.Queue = queue.Queue()
    outcome: dict = {}
    lines = {t: TargetOutcome(t, s) for t, s in targets}
    existed: dict[str, bool | None] = {}
    slot = run.slot

    def worker() -> None:
        try:
            todo = []
            for t, s in targets:
                existed[t] = _exists(t, run.token)
                if run.create_pr and existed[t]:
                    pr = _existing_pr(run.repo, run.rev, t, s, run.ignore, run.skip_incompatible, run.token)
                    if pr:
                        lines[t].proposed = pr
                        continue
                todo.append(Target(hub_spec(t), s))
            if todo:
                outcome["many"] = convert_many(
                    source_spec(run.repo, run.rev), todo, ignore=run.ignore, token=run.token,
                    private=True if run.private else None, create_pr=run.create_pr, device="auto",
                    skip_incompatible=run.skip_incompatible,
                    max_memory=_memory_share(),
                    progress=Progress(listeners=[events.put], hint_words=web_words), cancel=slot.cancel,
                )  # fmt: skip
        except Cancelled:
            outcome["cancelled"] = True
        except BaseException as e:  # noqa: BLE001 - every failure becomes a sentence
            if slot.cancel.is_set():
                outcome["cancelled"] = True
            else:
                outcome["error"] = e
        finally:
            slots.release(run.account.name, slot)
            events.put(None)

    say(f"{run.account.name}: {run.repo}{'@' + run.rev if run.rev else ''} → "
        + ", ".join(f"{t} with {s}" for t, s in targets) + " (one read of the source)")  # fmt: skip
    say(f"ignore: {', '.join(run.ignore) or '(nothing)'}")
    stages: dict[str, ProgressEvent] = {}
    yield from _follow(worker, run.account, slot, events, stages, t0, say, log_text)

    elapsed = time.monotonic() - t0
    if "error" in outcome:  # a problem every target shares (the source cannot be read …): said once
        message = sentence(outcome["error"])
        created = [t for t in existed if existed[t] is False and _exists(t, run.token)]
        if created:
            message += (f"\n\n{', '.join(created)} {'was' if len(created) == 1 else 'were'} created for this run and "
                        "still there, empty (nothing was committed). Convert again with the same settings to resume, "
                        "or delete them from their settings pages.")  # fmt: skip
        say("failed: nothing was committed")
        yield error_box(message), progress_html(stages, elapsed, "Failed"), log_text(), ""
        return message
    done = {tr.target.dst.removeprefix(HUB_PREFIX): tr for tr in getattr(outcome.get("many"), "targets", [])}
    for t, line in lines.items():
        tr = done.get(t)
        if line.proposed:
            say(f"{t}: a pull request already proposes this conversion: {line.proposed}")
        elif tr is not None and tr.ok:
            line.result = tr.result
            line.private = run.private or bool(getattr(_info(t, run.token), "private", False))
            done_words = "already holds this conversion" if tr.result.up_to_date else "published"
            say(f"{t}: {done_words} {tr.result.url or ''}".rstrip())
        elif outcome.get("cancelled") or isinstance(getattr(tr, "error", None), Cancelled) or slot.cancel.is_set():
            line.cancelled = True
            line.removed = existed.get(t) is False and not _exists(t, run.token)
            say(f"{t}: cancelled, nothing was committed")
        else:
            line.error = sentence(tr.error if tr is not None else RuntimeError("no result"))
            if existed.get(t) is False and _exists(t, run.token):
                line.error += (f" {t} was created for this run and is still there, empty (nothing was committed): "
                               "convert again with the same settings to resume, or delete it from its settings page.")  # fmt: skip
            say(f"{t}: failed, nothing was committed")
    ok = [o for o in lines.values() if o.status in ("published", "proposed")]
    state = "Done" if ok else ("Cancelled" if any(o.cancelled for o in lines.values()) else "Failed")
    panel = fanout_html(list(lines.values()), run.create_pr, run.token)
    yield "", progress_html(stages, elapsed, state, None), log_text(), panel
    if ok or state == "Cancelled":
        return None
    return "\n\n".join(f"{o.scheme} → {o.target}: {o.error}" for o in lines.values())


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
    extra_schemes: list[str] | str | None = None,
    extra_names: str | None = None,
    oauth_token: gr.OAuthToken | None = None,
):
    """Quantize the source and publish it in one commit; streams progress and a log.
    (The /convert endpoint: a failure is also raised, so that gradio_client callers get an error.)

    source, revision, scheme, ignore, namespace, repo_name, private, create_pr, skip_incompatible:
        the form's fields.
    extra_schemes, extra_names: "Also publish as" and the other schemes' repo names.
    oauth_token: what gradio passes for the signed-in visitor (None when signed out)."""
    message = yield from _convert(source, revision, scheme, ignore, namespace, repo_name, private, create_pr,
                                  skip_incompatible, oauth_token, extra_schemes, extra_names)  # fmt: skip
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
    extra_schemes: list[str] | str | None = None,
    extra_names: str | None = None,
    oauth_token: gr.OAuthToken | None = None,
):
    """The page's Convert button: the error is shown once (status line), never raised; Cancel is
    clickable only while this run is going.

    source, revision, scheme, ignore, namespace, repo_name, private, create_pr, skip_incompatible:
        the form's fields.
    extra_schemes, extra_names: "Also publish as" and the other schemes' repo names.
    oauth_token: what gradio passes for the signed-in visitor (None when signed out)."""
    for out in _convert(source, revision, scheme, ignore, namespace, repo_name, private, create_pr,
                        skip_incompatible, oauth_token, extra_schemes, extra_names):  # fmt: skip
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

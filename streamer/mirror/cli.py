"""`python -m streamer mirror jobs.toml`: keep quantized copies of Hub models up to date.

Runs the jobs of a jobs file (see `streamer.mirror.jobs` for its format). Every run is
idempotent: before a single tensor byte is read, each job compares the source's current commit and
its settings with the provenance streamer wrote into the target's model card
(`streamer.mirror.check`); a job whose target already holds that exact conversion is skipped,
otherwise it is converted and published as one new commit (or PR) (`streamer.mirror.runner`).
Jobs that need a conversion of the same source commit with the same shared settings are
converted in one read pass: the source is read once for all of them (`--dry-run` shows the
grouping; with `--ray` every job reads its source on its own).

Jobs are independent: one failing does not stop the others; the exit code is 1 if any failed.
Trigger modes: cron/CI (run the command), Hugging Face Jobs (`hf jobs scheduled run …`), and a
webhook listener (`--serve`, see streamer/mirror/webhook.py). See examples/ for each.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from streamer.cli.terminal import count_arg, setup_logging, size_arg
from streamer.cli.wording import describe
from streamer.errors import Cancelled, StreamerError
from streamer.formats import hub_token
from streamer.mirror.jobs import load_jobs, select_jobs
from streamer.mirror.report import render_table, summary
from streamer.mirror.runner import MirrorRunner

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    """The `mirror` command's argument parser."""
    p = argparse.ArgumentParser(
        prog="python -m streamer mirror",
        description="Keep quantized copies of Hub models up to date. Each job in JOBS_FILE is "
        "skipped when its target already holds a conversion of the source's current commit with "
        "the same settings (read from the target's model card); otherwise it is converted and "
        "published as one new commit (or PR). Jobs converting the same source commit with the same "
        "settings (all but target, scheme and ignore) share one read of the source. Exit code 1 when any job failed.",
    )
    p.add_argument("jobs_file", metavar="JOBS_FILE", help="TOML file with [defaults] and [[job]] tables")
    p.add_argument("--only", action="append", metavar="NAME", help="run only this job (repeatable, or comma-separated)")
    p.add_argument("--dry-run", action="store_true",
                   help="check every job and plan the ones that would run (headers only), with the jobs that "
                   "would share one read of their source; publish nothing")
    p.add_argument("--parallel", type=count_arg, default=1, metavar="N",
                   help="conversions at once; jobs sharing one read of their source count as one (default 1)")
    p.add_argument("--max-memory", type=size_arg, metavar="SIZE",
                   help="byte budget shared by all concurrent conversions (default: half the free RAM)")
    p.add_argument("--device", default="auto", help="default device for jobs: auto, cpu, cuda or cuda:N")
    p.add_argument("--workers", type=count_arg, default=4, help="pieces fetched concurrently per conversion (default 4)")
    p.add_argument(
        "--ray", nargs="?", const="auto", metavar="ADDRESS",
        help="spread every job's shards over a Ray cluster: auto (default: the cluster this machine "
        "belongs to, else a local one) or its address; needs pip install 'streamer-quant[ray]'",
    )  # fmt: skip
    p.add_argument("--token", help="Hugging Face token (default: HF_TOKEN, then the huggingface_hub login)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON instead of a table")
    p.add_argument("--quiet", "-q", action="store_true", help="only the summary")
    p.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    w = p.add_argument_group("triggers")
    w.add_argument("--serve", action="store_true",
                   help="run a webhook listener: a POST from a Hub webhook on a source repo starts its job(s)")
    w.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    w.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000; 0 picks a free one)")
    w.add_argument("--secret", help="webhook secret the Hub sends as X-Webhook-Secret (prefer --secret-env)")
    w.add_argument("--secret-env", metavar="VAR",
                   help="environment variable holding the webhook secret (default: WEBHOOK_SECRET)")
    w.add_argument("--catch-up", action="store_true",
                   help="with --serve: run every job once at startup (up-to-date jobs are skipped cheaply)")
    w.add_argument("--webhook-payload", action="store_true",
                   help="run only the jobs that the webhook payload in $WEBHOOK_PAYLOAD triggers, then exit "
                   "(the Hub sets it in a Job started by a webhook)")
    w.add_argument("--payload-file", metavar="FILE",
                   help="like --webhook-payload, with the payload read from FILE ('-' for stdin)")
    return p


def _executor(args):
    """The RayExecutor --ray asks for; None converts on this machine."""
    if args.ray is None:
        return None
    from streamer.engine.cluster import RayExecutor

    return RayExecutor(args.ray)


def _secret(args) -> str | None:
    if args.secret:
        return args.secret
    var = args.secret_env or "WEBHOOK_SECRET"
    value = os.environ.get(var)
    if args.secret_env and not value:
        raise StreamerError(f"--secret-env {var}: that environment variable is not set or empty")
    return value or None


def _load_payload(spec: str | None) -> dict:
    if spec is None:
        text = os.environ.get("WEBHOOK_PAYLOAD")
        if not text:
            raise StreamerError("--webhook-payload: the environment variable WEBHOOK_PAYLOAD is not set")
    else:
        try:
            text = sys.stdin.read() if spec == "-" else Path(spec).read_text()
        except OSError as e:
            raise StreamerError(f"--payload-file {spec}: {e.strerror or e}") from None
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as e:
        raise StreamerError(f"--webhook-payload: not JSON ({e})") from None
    if not isinstance(payload, dict):
        raise StreamerError("--webhook-payload: expected a JSON object")
    return payload


def main(argv: list[str] | None = None) -> int:
    """Run the `mirror` command; returns its exit code (0, 1 when a job failed, 2 for a bad
    command or jobs file, 130 when interrupted).

    :param argv: the arguments after `mirror` (default: the process's)."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    setup_logging(args.quiet, args.verbose, json=args.json)  # --quiet: the summary and errors only
    if not args.verbose:  # per-job lines come from streamer.mirror; the engine's chatter stays quiet
        logging.getLogger("streamer").setLevel(logging.WARNING if not (args.quiet or args.json) else logging.ERROR)
        logging.getLogger("streamer.mirror").setLevel(logging.WARNING if (args.quiet or args.json) else logging.INFO)
        for noisy in ("httpx", "httpx2", "httpcore"):  # one INFO line per HTTP request otherwise
            logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        jobs = select_jobs(load_jobs(args.jobs_file), args.only)
        runner = MirrorRunner(
            token=hub_token(args.token), dry_run=args.dry_run, parallel=args.parallel,
            max_memory=args.max_memory, device=args.device, workers=args.workers, executor=_executor(args),
        )  # fmt: skip
        if args.serve:
            if args.webhook_payload or args.payload_file:
                raise StreamerError("--serve does not take --webhook-payload / --payload-file")
            secret = _secret(args)
            if not secret:
                raise StreamerError(
                    "--serve needs a webhook secret: --secret-env VAR (or set WEBHOOK_SECRET), "
                    "the same value as in the Hub webhook's settings"
                )
            from streamer.mirror.webhook import WebhookListener

            listener = WebhookListener(jobs, runner, secret=secret, host=args.host, port=args.port,
                                       json_lines=args.json)
            return listener.serve_forever(catch_up=args.catch_up)
        if args.webhook_payload or args.payload_file:
            from streamer.mirror.webhook import match_payload

            jobs, why = match_payload(jobs, _load_payload(args.payload_file))
            log.info("webhook payload: %s%s", why, f" -> {', '.join(j.name for j in jobs)}" if jobs else "")
        results = runner.run(jobs)
    except (Cancelled, KeyboardInterrupt):
        print("interrupted: running conversions were cancelled, nothing half-done was published", file=sys.stderr)
        return 130
    except StreamerError as e:
        print(f"error: {describe(e)}", file=sys.stderr)
        return e.exit_code
    if args.json:
        print(json.dumps(summary(results, runner.read_passes, runner.grouping_note), indent=2))
    else:
        print(render_table(results, runner.read_passes, runner.grouping_note, dry_run=args.dry_run))
    if runner.cancel.is_set():
        return 130
    return 0 if all(r.ok for r in results) else 1

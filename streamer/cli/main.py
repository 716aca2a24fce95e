"""Command line: `python -m streamer SRC DST --scheme NAME`, plus the `mirror` and `demo` commands."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading

from streamer import __version__
from streamer.cli.terminal import count_arg, setup_logging, size_arg
from streamer.cli.wording import cli_words, describe
from streamer.errors import Cancelled, StreamerError, redact
from streamer.formats import hub_token

SUBCOMMANDS = ("mirror", "demo")


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors also answer on stdout as JSON when JSON_ERRORS (the
    command line holds --json): a script reading stdout never gets an empty answer."""

    json_errors = False

    def error(self, message: str):
        if self.json_errors:
            _json_failure(f"{self.prog}: error: {message}", 2)
        super().error(message)


def convert_parser(json_errors: bool = False) -> argparse.ArgumentParser:
    """The argument parser of the conversion command (`python -m streamer SRC DST …`);
    JSON_ERRORS: its usage errors are also printed as --json's failure object."""
    p = _Parser(
        prog="python -m streamer",
        description="Quantize a Hugging Face checkpoint (local folder or Hub repo) into a "
        "compressed-tensors checkpoint that vLLM loads, streaming only the bytes each job needs. "
        "Other commands: `mirror JOBS.toml`, `demo`.",
    )
    p.add_argument("src", help="source: a local folder, or a Hub repo id org/name[@revision]")
    p.add_argument(
        "dst", nargs="?",
        help="destination: a local folder, or a Hub repo id org/name[@branch] (left out with --dry-run, "
        "or when --to names every target)",
    )
    p.add_argument("--scheme", help="compressed-tensors preset, e.g. FP8_DYNAMIC, FP8_BLOCK, NVFP4A16, W4A16")
    p.add_argument(
        "--to", nargs=2, action="append", default=[], metavar=("DST", "SCHEME"),
        help="one more target, converted in the same run from one read of the source (repeatable): "
        "a destination and its scheme (a preset name, or a scheme file .json/.yaml)",
    )  # fmt: skip
    p.add_argument("--scheme-file", help="a compressed-tensors scheme or quantization config as JSON/YAML")
    p.add_argument(
        "--ignore", action="append", default=[], metavar="NAME|re:PATTERN",
        help="module to leave unquantized (repeatable): an exact module name, or re:PATTERN (re.match)",
    )  # fmt: skip
    p.add_argument(
        "--no-default-ignore", dest="default_ignore", action="store_false",
        help="quantize everything the scheme targets, as llm-compressor does; by default embeddings, "
        "lm_head, MoE routers and vision/audio towers stay unquantized",
    )  # fmt: skip
    p.add_argument("--quantize-towers", action="store_true", help="quantize vision/audio towers and multimodal projectors too")
    p.add_argument(
        "--skip-incompatible", action="store_true",
        help="keep weights whose shape the scheme cannot serve unquantized, instead of stopping",
    )  # fmt: skip
    p.add_argument("--device", default="auto", help="auto (GPU when there is one), cpu, cuda or cuda:N")
    p.add_argument("--dry-run", action="store_true", help="print the plan and stop; only headers are read, nothing is written")
    p.add_argument("--max-memory", type=size_arg, help="byte budget for buffered data (default: half the free RAM)")
    p.add_argument(
        "--nonfinite", choices=["refuse", "passthrough"], default="refuse",
        help="a weight holding NaN/Inf: refuse (default) or quantize it anyway, with a warning",
    )  # fmt: skip
    p.add_argument("--workers", type=count_arg, default=4, help="pieces fetched concurrently (default 4)")
    p.add_argument(
        "--ray", nargs="?", const="auto", metavar="ADDRESS",
        help="convert the shards on a Ray cluster, each node uploading its own (target: a Hub repo): "
        "auto (default: the cluster this machine belongs to, else a local one) or host:6379, "
        "ray://host:10001; needs pip install 'streamer-quant[ray]'",
    )  # fmt: skip
    p.add_argument("--token", help="Hugging Face token (default: HF_TOKEN, then the huggingface_hub login)")
    p.add_argument(
        "--overwrite", action="store_true",
        help="replace a non-empty destination that streamer did not write (one it wrote is refreshed without it); "
        "convert again even when the Hub target already holds this conversion",
    )  # fmt: skip
    vis = p.add_mutually_exclusive_group()
    vis.add_argument("--private", action="store_true",
                     help="create the target repo as private (the default when the source is private or gated)")
    vis.add_argument("--public", action="store_true",
                     help="create the target repo as public even when the source is private or gated")
    p.add_argument("--create-pr", action="store_true", help="open a pull request on the target instead of committing")
    p.add_argument("--revision", help="target branch on the Hub (default main)")
    p.add_argument("--dequant-dtype", choices=["bfloat16", "float16", "float32"], help="dtype a quantized source is expanded to")
    p.add_argument("--force", action="store_true", help="convert even if the source already has the requested scheme")
    p.add_argument(
        "--no-quality", dest="quality", action="store_false",
        help="do not measure each quantized weight's error (the quality report: card, --json, one line)",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="print only a JSON summary on stdout (warnings and errors on stderr)")
    talk = p.add_mutually_exclusive_group()
    talk.add_argument("--quiet", "-q", action="store_true", help="print nothing but errors")
    talk.add_argument("--verbose", "-v", action="store_true", help="debug logging, tracebacks on errors")
    p.add_argument("--version", action="version", version=f"streamer {__version__}")
    p.json_errors = json_errors
    return p


def main(argv: list[str] | None = None) -> int:
    """Run `python -m streamer` (a conversion, or the `mirror` / `demo` command); returns the
    exit code: 0, 1 for an unexpected failure, 2 for an error the user can fix, 130 when
    interrupted.

    :param argv: the arguments (default: the process's); when None in the main thread, Ctrl-C
        during the engine's imports exits at once with one sentence."""
    if argv is None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _exit_while_starting)  # a real process: until the engine is up
    try:
        return _main(argv)
    except Exception as e:
        if not _caused_by_interrupt(e):
            raise
    except KeyboardInterrupt:
        pass
    # Ctrl-C before a run is under way (the engine's imports alone take seconds): nothing has
    # been written yet, so a sentence, not a traceback from deep inside torch.
    print("interrupted: nothing was published", file=sys.stderr)
    return 130


def _exit_while_starting(signum, frame) -> None:
    # Ctrl-C while the engine imports (seconds on a small machine): nothing is written yet, and a
    # KeyboardInterrupt raised inside torch's or numpy's own imports escapes as tracebacks and
    # "cannot load module more than once" errors, so leave at once.
    sys.stderr.write("interrupted: nothing was published\n")
    sys.stderr.flush()
    os._exit(130)


def _engine_started() -> None:
    """From here on Ctrl-C raises KeyboardInterrupt, which a run turns into a clean abort."""
    if threading.current_thread() is threading.main_thread() and \
            signal.getsignal(signal.SIGINT) is _exit_while_starting:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _caused_by_interrupt(e: BaseException) -> bool:
    """transformers' lazy imports turn a Ctrl-C into ModuleNotFoundError; look down the chain."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        _engine_started()  # mirror and demo handle Ctrl-C themselves
        cmd, rest = argv[0], argv[1:]
        if cmd == "mirror":
            from streamer.mirror.cli import main as mirror_main

            return mirror_main(rest)
        if cmd == "demo":
            from streamer.cli.demo import main as demo_main

            return demo_main(rest)
    args = convert_parser(json_errors="--json" in (sys.argv[1:] if argv is None else argv)).parse_args(argv)
    try:
        # (HF_TOKEN itself is checked where the Hub is used: a local run needs no token)
        args.token = hub_token(args.token) if args.token is not None else None
    except StreamerError as e:
        return _failed(e, None, args.verbose, args.json)
    usage = usage_error(args)
    if usage is not None:  # said before the engine's imports: at once
        print(f"error: {usage}", file=sys.stderr)
        if args.json:
            _json_failure(usage, 2)
        return 2
    reader = _start_reader(args)
    try:
        setup_logging(args.quiet, args.verbose, json=args.json)
        return run_convert(args)
    finally:
        if reader is not None:
            reader.close()


def _start_reader(args):
    """Fast start: a reader process that fetches a Hub source's bytes while the engine imports
    (streamer.io.prefetch), holding at most half the run's memory budget, or in a fan-out half the
    first target's share (the run reserves what it holds in that budget until it has taken the
    bytes over). None for a dry run, a local source,
    or where it cannot help."""
    from streamer.io.locations import is_hub_spec

    if args.dry_run or (args.dst is None and not args.to) or args.ray is not None or not is_hub_spec(args.src):
        return None  # with --ray the nodes read the source, not this machine
    from streamer.engine.budget import default_memory_budget
    from streamer.engine.fanout import split_budget
    from streamer.formats import split_revision
    from streamer.io.prefetch import start

    repo_id, revision = split_revision(args.src)
    budget = args.max_memory or default_memory_budget()
    # reserved in the (first) target's budget: in a fan-out, its share of the whole
    share = split_budget(budget, (args.dst is not None) + len(args.to))[1]
    return start(repo_id, revision, token=args.token, limit=share // 2)


def _progress_bars(args, progress):
    """Three bars (read, quantized, uploaded or written) on a terminal's stderr; none when stderr
    is a file or a pipe, on a dumb terminal, or with --quiet, --json or --dry-run."""
    from streamer.cli.terminal import TqdmListener
    from streamer.io.locations import is_hub_spec

    if args.quiet or args.json or args.dry_run or not sys.stderr.isatty() or os.environ.get("TERM") == "dumb":
        return None
    to_hub = any(is_hub_spec(d) for d in [args.dst, *(d for d, _ in args.to)] if d)
    bars = TqdmListener(progress, upload_label="uploaded" if to_hub else "written")
    progress.listeners.append(bars)
    return bars


def _close(bars) -> None:
    if bars is not None:
        bars.close()


def _executor(args):
    """Where --ray says the shards are made: a RayExecutor, or None for this machine."""
    if args.ray is None:
        return None
    from streamer.engine.cluster import RayExecutor

    return RayExecutor(args.ray)


def failure_text(e: BaseException, to_target: bool = False) -> str:
    """What the command line says of the error E that stopped a run (after "error: "); TO_TARGET:
    of a `--to DST SCHEME` target, whose scheme is changed on its own --to."""
    if isinstance(e, (Cancelled, KeyboardInterrupt)):
        return "interrupted: nothing was published"
    if isinstance(e, StreamerError):
        return describe(e, to_target=to_target)
    # a bug or an unexpected environment problem; still no traceback by default
    return f"{type(e).__name__}: {redact(str(e))} (run with --verbose for details)"


def usage_error(args) -> str | None:
    """What is missing from, or contradicts itself in, the command line ARGS (from
    `convert_parser`), as one sentence; None when the command makes sense."""
    if args.to and args.ray is not None:
        return "--ray converts one target at a time; run each target as its own command"
    if args.dst is None and not args.to and not args.dry_run:
        return "give a destination (folder or repo id), or --dry-run"
    if args.dst is None and args.to and (args.scheme or args.scheme_file):
        return "--scheme names the scheme of DST; with only --to targets, each --to gives its own scheme"
    if args.scheme and args.scheme_file:
        return "give either --scheme or --scheme-file, not both"
    if not (args.scheme or args.scheme_file) and (args.dst is not None or not args.to):
        what = "for DST " if args.to else ""
        return f"give a scheme {what}with --scheme (e.g. FP8_DYNAMIC, NVFP4A16, W4A16) or --scheme-file FILE"
    if args.private or args.public:  # said, not ignored: the user expects a repo of that visibility
        from streamer.io.locations import is_hub_spec

        folders = [d for d in (args.dst, *(t[0] for t in args.to)) if d and not is_hub_spec(d)]
        if folders:
            flag = "--private" if args.private else "--public"
            return f"{flag} applies only to a Hub repo destination; {folders[0]} is a local folder"
    return None


def _failed(e: BaseException, bars, verbose: bool, as_json: bool = False) -> int:
    """Print what stopped the run (the bars closed first, so they end above the line); its exit
    code. With VERBOSE an unexpected error is raised again, with its traceback. AS_JSON (--json):
    stdout gets the failure as JSON too, so a script reading it never gets an empty answer."""
    _close(bars)
    interrupted = isinstance(e, (Cancelled, KeyboardInterrupt))
    if verbose and not interrupted and not isinstance(e, StreamerError):
        raise e
    text = failure_text(e)
    print(text if interrupted else f"error: {text}", file=sys.stderr)
    code = 130 if interrupted else (e.exit_code if isinstance(e, StreamerError) else 1)
    if as_json:
        _json_failure(text, code)
    return code


def _json_failure(text: str, code: int) -> None:
    """The --json answer of a run that failed (a fan-out's failed targets have their own lines)."""
    print(json.dumps({"status": "failed", "exit": code, "error": text}, indent=2))


def run_convert(args) -> int:
    """Run the conversion ARGS (from `convert_parser`) asks for, printing what the user should
    see; returns the exit code.

    :param args: the parsed arguments."""
    from streamer.engine.convert import convert
    from streamer.formats import nonfinite_policy
    from streamer.engine.plan import render
    from streamer.engine.progress import Progress

    _engine_started()

    if args.to:
        return run_fanout(args)
    progress = Progress(hint_words=cli_words)
    bars = _progress_bars(args, progress)
    policy = nonfinite_policy(args.nonfinite)
    policy.__enter__()  # what a NaN/Inf weight does, for this command only (undone in `finally`)
    try:
        result = convert(
            args.src, args.dst,
            scheme=args.scheme, scheme_file=args.scheme_file, ignore=args.ignore,
            device=args.device, dry_run=args.dry_run, max_memory=args.max_memory,
            workers=args.workers, token=args.token, overwrite=args.overwrite,
            private=True if args.private else (False if args.public else None), create_pr=args.create_pr, revision=args.revision,
            dequant_dtype=args.dequant_dtype, force=args.force, progress=progress,
            default_ignore=args.default_ignore, quantize_towers=args.quantize_towers,
            skip_incompatible=args.skip_incompatible, executor=_executor(args), quality=args.quality,
        )  # fmt: skip
        if result.quality is not None and not args.json:
            from streamer.engine.quality import summary_line

            # a log line (stderr, above the bars like the run's other lines; not with --quiet)
            progress.message(summary_line(result.quality))
    except (Exception, KeyboardInterrupt) as e:  # Ctrl-C arrives as KeyboardInterrupt, a stop as Cancelled
        return _failed(e, bars, args.verbose, args.json)
    finally:
        policy.__exit__(None, None, None)
        _close(bars)
    if args.dry_run and not args.json:  # --json: stdout holds the JSON alone
        print(render(result.plan))
    if args.json:
        print(json.dumps(result.summary(), indent=2))
    elif not args.dry_run and not args.quiet:
        print(result.url)
    return 0


SCHEME_FILE_SUFFIXES = (".json", ".yaml", ".yml")


def fanout_targets(args) -> list:
    """The targets of a fan-out run: DST with --scheme/--scheme-file when given, then each --to
    DST SCHEME (SCHEME a preset name, or a scheme file)."""
    from streamer.engine.convert import Target

    targets = []
    if args.dst is not None:
        targets.append(Target(args.dst, scheme=args.scheme, scheme_file=args.scheme_file))
    for dst, scheme in args.to:
        if scheme.lower().endswith(SCHEME_FILE_SUFFIXES) or os.path.isfile(scheme):
            targets.append(Target(dst, scheme_file=scheme))
        else:
            targets.append(Target(dst, scheme=scheme))
    return targets


def run_fanout(args) -> int:
    """Run a fan-out (`SRC [DST --scheme S] --to DST SCHEME …`): every target from one read of the
    source. Prints one line per target; the exit code is the first failed target's, else 0."""
    from streamer.engine.convert import convert_many
    from streamer.formats import nonfinite_policy
    from streamer.engine.plan import render
    from streamer.engine.progress import Progress

    progress = Progress(hint_words=cli_words)
    bars = _progress_bars(args, progress)
    try:
        with nonfinite_policy(args.nonfinite):
            result = convert_many(
                args.src, fanout_targets(args), ignore=args.ignore,
                device=args.device, dry_run=args.dry_run, max_memory=args.max_memory,
                workers=args.workers, token=args.token, overwrite=args.overwrite,
                private=True if args.private else (False if args.public else None), create_pr=args.create_pr,
                revision=args.revision, dequant_dtype=args.dequant_dtype, force=args.force, progress=progress,
                default_ignore=args.default_ignore, quantize_towers=args.quantize_towers,
                skip_incompatible=args.skip_incompatible, quality=args.quality,
            )  # fmt: skip
    except (Exception, KeyboardInterrupt) as e:
        return _failed(e, bars, args.verbose, args.json)
    finally:
        _close(bars)
    first_to = args.dst is not None  # the targets from here on came from --to
    if args.json:
        summary = result.summary(describe)
        for t, line in list(zip(result.targets, summary["targets"]))[first_to:]:
            if isinstance(t.error, StreamerError):
                line["error"] = describe(t.error, to_target=True)
        print(json.dumps(summary, indent=2))
        return result.exit_code
    from streamer.engine.quality import summary_line

    for i, t in enumerate(result.targets):
        name = f"{t.target.dst} ({t.target.scheme_name})"
        if not t.ok:
            print(f"error: {name}: {failure_text(t.error, to_target=i >= first_to)}", file=sys.stderr)
        elif args.dry_run:
            print(f"== {name}\n{render(t.result.plan)}")
        elif not args.quiet:
            if t.result.quality is not None:
                progress.message(f"{t.target.dst}: {summary_line(t.result.quality)}")
            print(t.result.url)
    return result.exit_code


if __name__ == "__main__":
    os._exit(main())

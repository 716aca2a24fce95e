"""Command line: `python -m streamer.localhub --root DIR --port N`.

Examples:
    python -m streamer.localhub --root /tmp/hub --port 8765 --user alice:hf_alice:my-org \\
        --seed my-org/tiny=./tiny-model --throttle-down 50 --fault-every 5 --fault-kinds drop,429
"""

from __future__ import annotations

import argparse
import errno
import logging
import signal
import socket
import sys
import threading
from pathlib import Path

from .faults import KINDS
from .hub import LocalHub

MB = 1_000_000


def _user(value: str) -> tuple[str, str, list[str]]:
    parts = value.split(":")
    if len(parts) not in (2, 3) or not all(parts[:2]):
        raise argparse.ArgumentTypeError("expected NAME:TOKEN or NAME:TOKEN:ORG1,ORG2")
    orgs = [o for o in parts[2].split(",") if o] if len(parts) == 3 else []
    return parts[0], parts[1], orgs


def _seed(value: str) -> tuple[str, Path]:
    repo_id, sep, folder = value.partition("=")
    if not sep or not repo_id or not Path(folder).is_dir():
        raise argparse.ArgumentTypeError("expected REPO_ID=EXISTING_FOLDER")
    return repo_id, Path(folder)


def _raise_keyboard_interrupt(*_) -> None:
    raise KeyboardInterrupt


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m streamer.localhub", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, required=True, help="folder holding repos, blobs and users")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port (printed at start)")
    p.add_argument("--user", type=_user, action="append", default=[], metavar="NAME:TOKEN[:ORGS]",
                   help="register a write token (repeatable); ORGS is a comma-separated list")
    p.add_argument("--seed", type=_seed, action="append", default=[], metavar="REPO_ID=FOLDER",
                   help="commit a local folder into a repo before serving (repeatable)")
    p.add_argument("--private", action="store_true", help="repos created by --seed are private")
    p.add_argument("--gated", action="store_true", help="repos created by --seed are gated")
    p.add_argument("--throttle-down", type=float, metavar="MBPS", help="download limit, MB/s (10^6 bytes/s)")
    p.add_argument("--throttle-up", type=float, metavar="MBPS", help="upload limit, MB/s (10^6 bytes/s)")
    p.add_argument("--throttle-per-client", action="store_true",
                   help="apply the limits to each client link separately (with --host 0.0.0.0, clients "
                   "dialling 127.0.0.2, 127.0.0.3 … each get their own link, like the machines of a cluster)")
    p.add_argument("--fault-every", type=int, metavar="N", help="every Nth matching request gets a fault")
    p.add_argument("--fault-kinds", default="drop", help=f"comma-separated, cycled: {','.join(KINDS)}")
    p.add_argument("--fault-paths", default="resolve", help="regex on the URL path selecting requests ('' = all)")
    p.add_argument("--fault-methods", default="", help="comma-separated methods to affect ('' = all)")
    p.add_argument("--retry-after", type=int, default=1, help="Retry-After seconds sent with 429")
    p.add_argument("--slow-seconds", type=float, default=0.5, help="delay of the 'slow' fault")
    p.add_argument("--multipart-chunk-size", type=int, default=None, metavar="BYTES",
                   help="LFS objects above this size are uploaded in parts of this size")
    p.add_argument("--redirect-lfs", action="store_true",
                   help="answer LFS downloads with a 302 to a signed URL on another host name, as the Hub does")
    p.add_argument("-v", "--verbose", action="store_true", help="log every request")
    return p


def build_hub(args: argparse.Namespace) -> LocalHub:
    """A configured, not yet started hub (separate from main() so tests can drive it in-process)."""
    hub = LocalHub(args.root, port=args.port, host=args.host, redirect_lfs=args.redirect_lfs)
    if args.multipart_chunk_size:
        hub.multipart_chunk_size = args.multipart_chunk_size
    for name, token, orgs in args.user:
        hub.add_user(name, token, orgs)
    for repo_id, folder in args.seed:
        sha = hub.seed_repo(repo_id, folder, message=f"seed from {folder}", private=args.private, gated=args.gated)
        print(f"seeded {repo_id} from {folder} at {sha}", flush=True)
    hub.set_throttle(
        args.throttle_down * MB if args.throttle_down else None,
        args.throttle_up * MB if args.throttle_up else None,
        per_client=args.throttle_per_client,
    )
    if args.fault_every:
        hub.set_faults(
            args.fault_every,
            [k.strip() for k in args.fault_kinds.split(",") if k.strip()],
            retry_after=args.retry_after,
            slow_seconds=args.slow_seconds,
            only_paths=args.fault_paths or None,
            methods=[m.strip() for m in args.fault_methods.split(",") if m.strip()] or None,
        )
    return hub


def _probe_port(host: str, port: int) -> None:
    """Raise the OSError that listening on HOST:PORT would (a port in use, one not allowed)."""
    if not port:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds
        s.bind((host, port))


def _listen_error(exc: OSError, host: str, port: int) -> str:
    if exc.errno == errno.EADDRINUSE:
        return (f"port {port} on {host} is already in use (another localhub?): pick another with --port N, "
                "or --port 0 for a free one (the URL is printed at start)")
    if exc.errno == errno.EACCES:
        return f"not allowed to listen on port {port}: use a port above 1023, or --port 0 for a free one"
    return f"cannot listen on {host}:{port} ({exc.strerror or exc}): check --host and --port, or use --port 0"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:  # a port in use is said before anything is seeded into --root
        _probe_port(args.host, args.port)
    except OSError as exc:
        print(f"error: {_listen_error(exc, args.host, args.port)}", file=sys.stderr)
        return 2
    hub = build_hub(args)
    try:
        hub.start()
    except OSError as exc:
        print(f"error: {_listen_error(exc, args.host, args.port)}", file=sys.stderr)
        return 2
    # SIGTERM should stop as cleanly as Ctrl-C does.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    print(f"localhub serving {args.root} on {hub.url}", flush=True)
    try:
        hub.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        hub.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

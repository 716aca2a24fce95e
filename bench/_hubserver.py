"""A localhub server for benchmarks: its own process, seeded, throttled, stopped cleanly.

    server = HubServer(WORK / "hub", seed={"bench/llama-bf16": folder}, down=200, up=100)
    env = server.env(WORK / "hf_home")          # HF_ENDPOINT, HF_TOKEN, … for a client process
    server.create_repo("bench/empty")           # an empty repo, as the bench user
    server.files("bench/out")                   # path -> (LFS sha256 or blob id, size)
    server.stop()                               # or: with HubServer(...) as server:

Throttles are MB/s (10^6 bytes/s) per direction. per_client=True gives each client address its
own link and listens on 0.0.0.0: a client that dials 127.0.0.K (`url(k)`, `env(home, client=k)`)
is a machine of its own, as the nodes of bench_cluster.py are. log_requests=True logs every
request with the time its answer started (`request_times`).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from _common import PY, REPO, rm

TOKEN = "hf_bench_token_0123456789"
ORG = "bench"

# `python -m streamer.localhub`, with each request logged at the time its answer starts
# (`<unix time> <client> - "GET /… HTTP/1.1" 206 -`): a range request answers 206.
_LOGGED_MAIN = (
    "import logging, sys; logging.basicConfig(level=logging.DEBUG, format='%(created).6f %(message)s'); "
    "from streamer.localhub.__main__ import main; sys.exit(main(sys.argv[1:]))"
)


@dataclass(frozen=True)
class User:
    """A user of the server: NAME, its write TOKEN, and the ORGS it may write to."""

    name: str = ORG
    token: str = TOKEN
    orgs: tuple[str, ...] = field(default=(ORG,))

    def flag(self) -> str:
        return f"{self.name}:{self.token}:{','.join(self.orgs)}"


class HubServer:
    """`python -m streamer.localhub` in its own process (see the module's docstring)."""

    def __init__(
        self, root: Path, *, seed: dict[str, Path] | None = None, users: tuple[User, ...] = (User(),),
        down: float | None = None, up: float | None = None, per_client: bool = False, log_requests: bool = False,
    ):  # fmt: skip
        rm(root)
        root.mkdir(parents=True)
        self.root, self.users, self.per_client = root, users, per_client
        cmd = [PY, "-c", _LOGGED_MAIN] if log_requests else [PY, "-m", "streamer.localhub"]
        cmd += ["--root", str(root), "--host", "0.0.0.0" if per_client else "127.0.0.1"]
        cmd += [a for u in users for a in ("--user", u.flag())]
        cmd += [a for repo, folder in (seed or {}).items() for a in ("--seed", f"{repo}={folder}")]
        if down:
            cmd += ["--throttle-down", str(down)]
        if up:
            cmd += ["--throttle-up", str(up)]
        if per_client:
            cmd.append("--throttle-per-client")
        self.log = open(root.parent / f"{root.name}.log", "w+")
        t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, text=True, cwd=REPO)
        self.port: int | None = None
        for line in self.proc.stdout:
            if line.startswith("localhub serving"):
                self.port = int(line.strip().rsplit(":", 1)[-1])
                break
        if self.port is None:
            self.stop(keep_log=True)
            raise RuntimeError(f"localhub did not start:\n{Path(self.log.name).read_text()[-3000:]}")
        self.seed_seconds = time.monotonic() - t0  # start-up, seeding included

    def __enter__(self) -> "HubServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """The server as a client on 127.0.0.1 reaches it."""
        return self.client_url(1)

    def client_url(self, k: int = 1) -> str:
        """The server as the machine 127.0.0.K reaches it (its own link when per_client)."""
        return f"http://127.0.0.{k}:{self.port}"

    def env(self, home: Path, *, client: int = 1, user: User | None = None) -> dict:
        """The environment of a client process: this process's, less any HF_ setting, with the
        server as HF_ENDPOINT (dialled from 127.0.0.CLIENT), USER's token (the first user's by
        default), HF_HOME=HOME, and LFS uploads."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
        # LFS on purpose: localhub takes Xet too, but would then reassemble every upload in Python
        # on the cores the conversion is timed on.
        env.update(HF_ENDPOINT=self.client_url(client), HF_HUB_DISABLE_XET="1", HF_TOKEN=(user or self.users[0]).token,
                   HF_HOME=str(home), HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1",
                   PYTHONDONTWRITEBYTECODE="1")  # fmt: skip
        return env

    def _api(self, user: User | None = None):
        from huggingface_hub import HfApi

        return HfApi(endpoint=self.url, token=(user or self.users[0]).token)

    def create_repo(self, repo_id: str, *, private: bool = False, user: User | None = None) -> None:
        """An empty model repo REPO_ID, created by USER (the first user by default)."""
        self._api(user).create_repo(repo_id, private=private, exist_ok=True)

    def files(self, repo: str) -> dict[str, tuple[str, int]]:
        """path -> (LFS sha256 or git blob id, size) of REPO's main branch."""
        info = self._api().model_info(repo, files_metadata=True)
        return {s.rfilename: (s.lfs.sha256 if s.lfs else s.blob_id, s.size) for s in info.siblings}

    def shas(self, repo: str) -> dict[str, str]:
        """path -> LFS sha256 or git blob id of REPO's main branch."""
        return {k: sha for k, (sha, _) in self.files(repo).items()}

    def request_times(self, pattern: str) -> list[float]:
        """The unix times at which the server started answering the requests whose log line
        matches the regex PATTERN, in order (needs log_requests; a range request: '" 206 ')."""
        self.log.flush()
        times = []
        for line in Path(self.log.name).read_text(errors="replace").splitlines():
            stamp, _, rest = line.partition(" ")
            if re.search(pattern, rest):
                try:
                    times.append(float(stamp))
                except ValueError:
                    pass
        return times

    def cpu(self) -> float:
        """CPU seconds the server process has used so far."""
        import psutil

        t = psutil.Process(self.proc.pid).cpu_times()
        return t.user + t.system

    def stop(self, *, keep_log: bool = False) -> None:
        """Stop the server and remove its root (and its log, unless KEEP_LOG)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()
        self.log.close()
        rm(self.root)
        if not keep_log:
            Path(self.log.name).unlink(missing_ok=True)


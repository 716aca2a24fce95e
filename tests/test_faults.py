"""Faults on every kind of Hub request, lost answers, crashes and interrupts (issue 14).

Each case runs the real huggingface_hub client against localhub with its fault injection: a run
either finishes byte-identical to a fault-free run, or stops with one sentence, promptly, with
nothing committed. The corpus grows; it never shrinks.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from streamer.io import hub_http
from streamer.io.hub_sink import HubSink
from streamer.io.upload_journal import UploadJournal
from test_hub import ALICE, SOURCE, _streamer_commits, hub, run_cli  # noqa: F401  (hub: fixture)

REPO_ROOT = Path(__file__).resolve().parent.parent


def _same_output(hub, a: str, b: str, revision: str = "main") -> None:
    fa, fb = hub.files(a, revision), hub.files(b, revision)
    assert fa.keys() == fb.keys()
    for f in fa:
        if f.endswith((".safetensors", ".json")):  # the card names the target repo
            assert hub.read_file(a, f, revision) == hub.read_file(b, f, revision), f


@pytest.fixture
def quick_retries(monkeypatch):
    """Retries as many, waits much shorter: a persistent fault costs a second, not half a minute."""
    monkeypatch.setattr(hub_http, "BACKOFF_FIRST", 0.02)
    monkeypatch.setattr(hub_http, "BACKOFF_CAP", 0.1)


# --------------------------------------------------------------------------------------------
# transient faults are retried; the output is byte-identical
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kinds", [("drop",), ("500", "429"), ("502", "drop", "503", "429", "504")])
def test_faults_on_every_kind_of_request(hub, capsys, kinds):
    """`--fault-every 10 --fault-paths ''`: every 10th request of any kind (API, LFS, commit,
    downloads) is dropped or refused; the run still finishes with the fault-free bytes."""
    assert run_cli(SOURCE, "alice/clean", "--scheme", "FP8_DYNAMIC") == 0
    hub.clear_log()
    hub.set_faults(every=10, kinds=kinds, only_paths=None, retry_after=1)
    try:
        code = run_cli(SOURCE, "alice/faulty", "--scheme", "FP8_DYNAMIC")
    finally:
        hub.set_faults(None)
    err = capsys.readouterr().err
    assert code == 0, err
    faulted = [r for r in hub.request_log if r.fault]
    assert len(faulted) >= 3, faulted
    assert any("/resolve/" not in r.path for r in faulted), "no API request was faulted"
    _same_output(hub, "alice/clean", "alice/faulty")
    assert len(_streamer_commits(hub, "alice/faulty")) == 1
    assert ALICE not in err


# One fault on the first request of each kind the client sends. A "drop" answers after the
# server acted (a created repo, an applied commit) and cuts the answer: the ambiguous case.
CALLS = {
    "whoami": r"^/api/whoami-v2$",
    "source model_info": r"^/api/models/acme/tiny-llama(/revision/.*)?$",
    "target model_info": r"^/api/models/alice/t(/revision/.*)?$",
    "create_repo": r"^/api/repos/create$",
    "preupload": r"/preupload/",
    "lfs batch": r"/info/lfs/objects/batch$",
    "lfs upload": r"^/api/localhub/lfs/",
    "lfs verify": r"/info/lfs/objects/verify$",
    "validate-yaml": r"^/api/validate-yaml$",
    "commit": r"/commit/main$",
    "range read": r"/resolve/",
}


@pytest.mark.parametrize("kind", ["drop", "503"])
@pytest.mark.parametrize("call", list(CALLS))
def test_one_fault_on_each_hub_call(hub, capsys, call, kind):
    # the faulty run first: content already on the server would not be uploaded (nor faulted)
    hub.set_faults(every=1, kinds=(kind,), only_paths=CALLS[call], max_faults=1)
    try:
        code = run_cli(SOURCE, "alice/t", "--scheme", "W8A16")
    finally:
        hub.set_faults(None)
    err = capsys.readouterr().err
    assert code == 0, err
    assert [r.fault for r in hub.request_log if r.fault] == [kind], f"{call}: the fault was not injected"
    assert run_cli(SOURCE, "alice/clean", "--scheme", "W8A16") == 0
    _same_output(hub, "alice/clean", "alice/t")
    assert len(_streamer_commits(hub, "alice/t")) == 1  # never committed twice


@pytest.mark.parametrize("kind", ["drop", "503", "429"])
def test_small_reads_are_retried(hub, capsys, kind):
    """The small GETs outside HfApi: a mirror job's card read (mirror.read_card), the target's
    card read before replacing a conversion (HubSink.read_text), the Space's config read."""
    from streamer.mirror.check import read_card

    assert run_cli(SOURCE, "alice/card", "--scheme", "W8A16") == 0

    def one_fault_on(pattern: str) -> None:
        hub.clear_log()
        hub.set_faults(every=1, kinds=(kind,), only_paths=pattern, max_faults=1)

    def faulted() -> list:
        hub.set_faults(None)
        return [r.path for r in hub.request_log if r.fault]

    one_fault_on(r"^/alice/card/resolve/main/README\.md$")
    assert "streamer" in read_card("alice/card", "main", token=ALICE, endpoint=hub.url)
    assert faulted() == ["/alice/card/resolve/main/README.md"]

    one_fault_on(r"^/alice/card/resolve/main/README\.md$")
    assert run_cli(SOURCE, "alice/card", "--scheme", "FP8_DYNAMIC") == 0, capsys.readouterr().err
    assert faulted() == ["/alice/card/resolve/main/README.md"]
    assert "FP8_DYNAMIC" in hub.read_file("alice/card", "README.md").decode()

    pytest.importorskip("gradio")
    from streamer.web.suggestions import fetch_config

    one_fault_on(r"^/acme/tiny-llama/resolve/main/config\.json$")
    assert fetch_config(SOURCE, None, ALICE)["architectures"] == ["LlamaForCausalLM"]
    assert faulted() == ["/acme/tiny-llama/resolve/main/config.json"]


@pytest.mark.parametrize("kind", ["drop", "500"])
def test_fault_on_create_branch(hub, capsys, kind):
    hub.create_repo("alice/b", owner_token=ALICE)
    hub.set_faults(every=1, kinds=(kind,), only_paths=r"/branch/", max_faults=1)
    try:
        code = run_cli(SOURCE, "alice/b", "--scheme", "FP8_DYNAMIC", "--revision", "fp8")
    finally:
        hub.set_faults(None)
    assert code == 0, capsys.readouterr().err
    assert any(r.fault for r in hub.request_log)
    assert len(_streamer_commits(hub, "alice/b")) == 0
    assert len([c for c in hub.commits("alice/b", "fp8") if "streamer" in c.message]) == 1


# --------------------------------------------------------------------------------------------
# the commit: a lost answer is not a failure, and nothing is committed twice
# --------------------------------------------------------------------------------------------


def test_every_commit_answer_lost(hub, capsys):
    """Each commit request is applied by the server and its answer cut: the first one landed,
    the run finds it on the branch, reports success and sends no second commit."""
    hub.set_faults(every=1, kinds=("drop",), only_paths=r"/commit/main$")
    try:
        code = run_cli(SOURCE, "alice/lost", "--scheme", "FP8_DYNAMIC", "--json")
    finally:
        hub.set_faults(None)
    out, err = capsys.readouterr()
    assert code == 0, err
    commits = hub.request_log
    assert len([r for r in commits if r.path.endswith("/commit/main")]) == 1
    (ours,) = _streamer_commits(hub, "alice/lost")
    assert json.loads(out)["url"].endswith(f"/alice/lost/commit/{ours.sha}")


def test_commit_answer_lost_on_a_pull_request(hub, capsys):
    hub.create_repo("alice/pr", owner_token=ALICE)
    hub.set_faults(every=1, kinds=("drop",), only_paths=r"/commit/main$")
    try:
        code = run_cli(SOURCE, "alice/pr", "--scheme", "FP8_DYNAMIC", "--create-pr", "--json")
    finally:
        hub.set_faults(None)
    out, err = capsys.readouterr()
    assert code == 0, err
    prs = hub.refs("alice/pr")["prs"]
    assert list(prs) == ["1"], prs  # one pull request, not one per try
    assert json.loads(out)["url"].endswith("/alice/pr/discussions/1")


def _url(capsys) -> str:
    return json.loads(capsys.readouterr().out)["url"]


def test_rerun_on_identical_target_makes_no_commit(hub, capsys, monkeypatch):
    assert run_cli(SOURCE, "alice/same", "--scheme", "W8A16", "--json") == 0
    first = _url(capsys)
    (commit,) = _streamer_commits(hub, "alice/same")
    assert first.endswith(commit.sha)
    # the same command again: nothing would change, so nothing is committed
    hub.clear_log()
    assert run_cli(SOURCE, "alice/same", "--scheme", "W8A16", "--json") == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["url"] == first and summary["up_to_date"] is True
    assert [c.sha for c in _streamer_commits(hub, "alice/same")] == [commit.sha]
    # found from the headers and the target's card: no tensor byte read, nothing uploaded
    assert not [r for r in hub.request_log if r.method == "GET" and r.range and r.range[0] > 8]
    assert not [r for r in hub.request_log if r.method in ("PUT", "POST") and r.bytes_in > 10_000]

    # a run that uploaded every shard but failed to commit leaves a resume record (--overwrite:
    # converting again although the target holds this conversion); resuming it there must not
    # add an empty commit
    def crash(*args, **kwargs):
        raise PermissionError("crashed before committing, for this test")

    records = Path(os.environ["HF_HOME"]) / "streamer" / "uploads"
    with monkeypatch.context() as m:
        m.setattr(HubSink, "commit", crash)
        assert run_cli(SOURCE, "alice/same", "--scheme", "W8A16", "--overwrite") != 0
    assert list(records.glob("*.json")), "the failed run left no resume record"
    capsys.readouterr()
    assert run_cli(SOURCE, "alice/same", "--scheme", "W8A16", "--json", "--overwrite") == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["url"] == first and len(summary["resumed_shards"]) == 6  # resumed, and no commit
    assert summary["up_to_date"] is False
    assert [c.sha for c in hub.commits("alice/same")][0] == commit.sha

    # the same crash, then the plain command: the target holds this conversion, so there is
    # nothing to resume, and the record of the crashed run goes
    with monkeypatch.context() as m:
        m.setattr(HubSink, "commit", crash)
        assert run_cli(SOURCE, "alice/same", "--scheme", "W8A16", "--overwrite") != 0
    assert list(records.glob("*.json"))
    capsys.readouterr()
    assert run_cli(SOURCE, "alice/same", "--scheme", "W8A16", "--json") == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["url"] == first and summary["up_to_date"] is True and summary["bytes_read"] == 0
    assert [c.sha for c in hub.commits("alice/same")][0] == commit.sha
    assert not list(records.glob("*.json")), "the stale resume record stayed"


# --------------------------------------------------------------------------------------------
# a Hub that stays unreachable: one sentence, soon
# --------------------------------------------------------------------------------------------


def test_unreachable_hub_is_one_sentence(hub, capsys, monkeypatch, quick_retries):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens there once closed
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", dead)
    code = run_cli(SOURCE, "alice/x", "--scheme", "FP8_DYNAMIC")
    err = capsys.readouterr().err
    assert code != 0
    assert f"could not reach the Hub at {dead}: reading acme/tiny-llama's file list failed" in err
    assert "check your network and retry" in err
    assert "Traceback" not in err and err.count("error:") == 1


def test_whoami_dropped_every_time_is_not_a_token_problem(hub, capsys, llama_ckpt, quick_retries):
    hub.set_faults(every=1, kinds=("drop",), only_paths=r"^/api/whoami-v2$")
    try:
        code = run_cli(str(llama_ckpt), "alice/x", "--scheme", "FP8_DYNAMIC")
    finally:
        hub.set_faults(None)
    err = capsys.readouterr().err
    assert code != 0
    assert "needs a token" not in err
    assert f"could not reach the Hub at {hub.url}: checking the token (whoami) failed {hub_http.ATTEMPTS} times" in err
    assert not hub.repo_exists("alice/x")


def test_persistent_server_errors_name_the_status(hub, capsys, quick_retries):
    hub.set_faults(every=1, kinds=("503",), only_paths=r"^/api/models/acme/tiny-llama")
    try:
        code = run_cli(SOURCE, "alice/x", "--scheme", "FP8_DYNAMIC")
    finally:
        hub.set_faults(None)
    err = capsys.readouterr().err
    assert code != 0
    assert "answered HTTP 503 to reading acme/tiny-llama's file list" in err and "retry" in err
    n = len([r for r in hub.request_log if r.fault])
    assert n == hub_http.ATTEMPTS  # bounded: no endless retrying


def test_retry_after_is_honoured(monkeypatch):
    """A 429's Retry-After sets the wait (up to a cap); other waits grow exponentially, capped."""
    sleeps: list[float] = []
    monkeypatch.setattr(hub_http.time, "sleep", sleeps.append)

    class Response:
        status_code = 429
        headers = {"retry-after": "7"}
        request = None

    from huggingface_hub.errors import HfHubHTTPError

    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise HfHubHTTPError("429 Too Many Requests", response=Response())
        return "ok"

    assert hub_http.hub_call("testing", flaky) == "ok"
    assert sleeps == [7.0, 7.0]
    delays = [hub_http.backoff_delay(n) for n in range(1, 12)]
    assert all(d <= hub_http.BACKOFF_CAP for d in delays) and delays[-1] >= hub_http.BACKOFF_CAP / 2
    assert hub_http.backoff_delay(1, retry_after=1e6) == 1e6  # the caller caps Retry-After
    assert hub_http.parse_retry_after("100000") == hub_http.RETRY_AFTER_CAP


# --------------------------------------------------------------------------------------------
# file names that need quoting in URLs
# --------------------------------------------------------------------------------------------


def test_hub_file_names_are_quoted_in_range_reads(hub, llama_ckpt, tmp_path):
    folder = tmp_path / "odd-names"
    shutil.copytree(llama_ckpt, folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    renames = dict(zip(shards, ["x#1.safetensors", "q?x.safetensors", "p%41.safetensors", "a b.safetensors"]))
    for old, new in renames.items():
        (folder / old).rename(folder / new)
    index["weight_map"] = {k: renames.get(v, v) for k, v in index["weight_map"].items()}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    hub.seed_repo("acme/odd-names", folder)

    assert run_cli(str(folder), str(tmp_path / "local"), "--scheme", "FP8_DYNAMIC") == 0
    assert run_cli("acme/odd-names", str(tmp_path / "from-hub"), "--scheme", "FP8_DYNAMIC") == 0
    for name in renames.values():
        assert (tmp_path / "from-hub" / name).read_bytes() == (tmp_path / "local" / name).read_bytes(), name


# --------------------------------------------------------------------------------------------
# two identical runs at once share the resume record
# --------------------------------------------------------------------------------------------


def test_resume_record_survives_concurrent_writers(tmp_path, monkeypatch):
    from huggingface_hub import CommitOperationAdd
    from huggingface_hub import constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HOME", str(tmp_path))
    # one journal per run, as each run's HubSink keeps its own
    journals = [UploadJournal.for_plan("http://127.0.0.1:9", "alice/race", "main", "fingerprint") for _ in range(3)]
    assert len({j.path for j in journals}) == 1
    op = CommitOperationAdd(path_in_repo="a.safetensors", path_or_fileobj=b"abc")
    errors: list[BaseException] = []

    def write(journal: UploadJournal, n: int) -> None:
        try:
            for i in range(150):
                journal.add(f"shard-{n}-{i % 5}.safetensors", op.upload_info)
        except BaseException as e:  # noqa: BLE001 - collected for the assert
            errors.append(e)

    threads = [threading.Thread(target=write, args=(j, n)) for n, j in enumerate(journals) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    record = json.loads(journals[0].path.read_text())
    assert record and all(v["sha256"] == op.upload_info.sha256.hex() for v in record.values())
    assert not list(journals[0].path.parent.glob("*.tmp")), "temp files left behind"


# --------------------------------------------------------------------------------------------
# a failed upload and Ctrl-C stop the other uploads at once (subprocesses: the real exit)
# --------------------------------------------------------------------------------------------

UPLOAD_RATE = 50_000  # bytes/s: the W8A16 uploads of the tiny model (~1.7 MB) take ~35 s


def _env(hub) -> dict:
    # huggingface_hub's own transfer bars stay off even if the run's stderr handling changes
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1", "HF_TOKEN": ALICE,
            "PYTHONUNBUFFERED": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "PYTHONPATH": path}  # this checkout's streamer, whatever is installed  # fmt: skip


def _upload_seconds(hub, llama_ckpt) -> float:
    # W8A16 output: about half the bf16 source
    return sum(f.stat().st_size for f in llama_ckpt.glob("*.safetensors")) / 2 / UPLOAD_RATE


def _first_upload_started(hub, proc, timeout: float = 120) -> float:
    """When the first shard's bytes reached the server (process start-up is not timed)."""
    deadline = time.monotonic() + timeout
    while not any(r.method == "PUT" and r.bytes_in > 0 for r in hub.request_log):
        assert time.monotonic() < deadline and proc.poll() is None, "no upload started"
        time.sleep(0.05)
    return time.monotonic()


def test_failed_upload_stops_the_others_and_exits_promptly(hub, llama_ckpt, tmp_path):
    # One shard's upload fails for good (a non-retryable error) while the others are in flight.
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        from huggingface_hub import HfApi
        real = HfApi.preupload_lfs_files
        def preupload(self, repo_id, additions, **kw):
            if any(a.path_in_repo.endswith("00003-of-00006.safetensors") for a in additions):
                time.sleep(0.5)
                raise PermissionError("storage refused the object (injected)")
            return real(self, repo_id, additions, **kw)
        HfApi.preupload_lfs_files = preupload
        from streamer.cli.main import main
        sys.exit(main([{SOURCE!r}, "alice/fails", "--scheme", "W8A16", "--device", "cpu", "-q"]))
    """))
    assert _upload_seconds(hub, llama_ckpt) > 25
    hub.set_throttle(up_bytes_per_s=UPLOAD_RATE)
    hub.clear_log()
    try:
        proc = subprocess.Popen([sys.executable, str(script)], env=_env(hub), cwd=REPO_ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        t0 = _first_upload_started(hub, proc)
        out, err = proc.communicate(timeout=120)
        elapsed = time.monotonic() - t0
    finally:
        hub.set_throttle(None, None)
    assert proc.returncode != 0
    assert "Traceback" not in err and "CancelledError" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: uploading model-00003-of-00006.safetensors"), err
    assert "storage refused the object" in err and ALICE not in err
    assert elapsed < 10, f"took {elapsed:.1f} s to stop"  # the uploads alone need > 25 s
    assert _streamer_commits(hub, "alice/fails") == []


def test_ctrl_c_cancels_uploads_in_flight(hub, llama_ckpt):
    # not --quiet (errors only): what a Ctrl-C stops is said as a warning
    cmd = [sys.executable, "-m", "streamer", SOURCE, "alice/interrupted", "--scheme", "W8A16", "--device", "cpu"]
    assert _upload_seconds(hub, llama_ckpt) > 25
    hub.set_throttle(up_bytes_per_s=UPLOAD_RATE)
    hub.clear_log()
    try:
        proc = subprocess.Popen(cmd, env=_env(hub), cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _first_upload_started(hub, proc)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        elapsed = time.monotonic() - t0
    finally:
        hub.set_throttle(None, None)
    assert proc.returncode == 130, err
    assert "stopping" in err and "upload(s) in flight" in err, err
    assert "interrupted: nothing was published" in err
    assert "Traceback" not in err
    assert elapsed < 8, f"took {elapsed:.1f} s to stop"  # the uploads in flight need > 25 s
    assert _streamer_commits(hub, "alice/interrupted") == []


@pytest.mark.parametrize("kind", ["drop", "503", "429"])
def test_mirror_check_is_retried(hub, kind):
    """A mirroring tick reads the source's commit and the target's pull requests: one fault on
    either is retried, and the check still says the target is up to date."""
    from streamer.mirror.check import check_job
    from streamer.mirror.jobs import parse_jobs

    assert run_cli(SOURCE, "alice/mirrored", "--scheme", "FP8_DYNAMIC", "--create-pr") == 0
    (job,) = parse_jobs({"job": [{"name": "j", "source": SOURCE, "target": "alice/mirrored",
                                  "scheme": "FP8_DYNAMIC", "create_pr": True}]})
    for pattern in (r"^/api/models/acme/tiny-llama", r"^/api/models/alice/mirrored/refs"):
        hub.clear_log()
        hub.set_faults(every=1, kinds=(kind,), only_paths=pattern, max_faults=1)
        try:
            check = check_job(job, token=ALICE, endpoint=hub.url)
        finally:
            hub.set_faults(None)
        assert [r.path for r in hub.request_log if r.fault], f"no fault on {pattern}"
        assert check.up_to_date, check.reason

"""Mirroring jobs (`python -m streamer mirror`) against localhub and the real huggingface_hub client."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from huggingface_hub import constants

from fixtures import BF16_NAN, set_element
from streamer.io.provenance import read_provenance
from streamer.localhub import LocalHub
from streamer.mirror.cli import main
from streamer.mirror.jobs import JobsFileError, MirrorJob, load_jobs, parse_jobs
from streamer.mirror.report import render_table
from streamer.mirror.runner import JobResult
from streamer.mirror.webhook import match_payload

ALICE = "hf_alice_token"
REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def hub(tmp_path, monkeypatch, llama_ckpt):
    """A localhub with two source repos (org/llama-a, org/llama-b) and the client pointed at it."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf_home" / "token"))
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_PROGRESS_BARS", True)
    with LocalHub(tmp_path / "hub") as hub:
        hub.add_user("alice", ALICE, orgs=["acme", "org"])
        hub.seed_repo("org/llama-a", llama_ckpt)
        hub.seed_repo("org/llama-b", llama_ckpt)
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setattr(constants, "ENDPOINT", hub.url)
        monkeypatch.setenv("HF_TOKEN", ALICE)
        yield hub


def write_jobs(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


JOBS = """
[defaults]
scheme = "FP8_DYNAMIC"
ignore = ["lm_head"]
device = "cpu"

[[job]]
name = "a-fp8"
source = "org/llama-a@main"
target = "acme/llama-a-FP8"

[[job]]
name = "b-w8"
source = "org/llama-b"
target = "acme/llama-b-W8A16"
scheme = "W8A16"
ignore = ["lm_head", "re:.*embed_tokens$"]
"""


def run(capsys, *args) -> tuple[int, dict]:
    capsys.readouterr()
    rc = main([*map(str, args), "--json"])
    out = capsys.readouterr().out
    return rc, json.loads(out)


def statuses(report: dict) -> dict[str, str]:
    return {j["name"]: j["status"] for j in report["jobs"]}


def tensor_reads(hub: LocalHub) -> list:
    return [r for r in hub.request_log if r.file and r.file.endswith(".safetensors") and r.method == "GET"]


def new_source_commit(hub: LocalHub, repo_id: str, ckpt: Path, tmp_path: Path) -> str:
    """A commit to the source that changes one small file (the weights stay the same)."""
    folder = tmp_path / f"changed-{repo_id.replace('/', '-')}"
    shutil.copytree(ckpt, folder)
    gen = json.loads((folder / "generation_config.json").read_text())
    gen["temperature"] = 0.42
    (folder / "generation_config.json").write_text(json.dumps(gen))
    return hub.seed_repo(repo_id, folder, message="tweak generation config")


# --------------------------------------------------------------------------------------------


def test_converts_then_skips_without_reading_tensors_then_converts_what_changed(hub, tmp_path, capsys, llama_ckpt):
    jobs = write_jobs(tmp_path / "jobs.toml", JOBS)

    # 1. everything is new: both jobs convert (two at once, one shared memory budget)
    rc, report = run(capsys, jobs, "--parallel", "2", "--max-memory", "256MB")
    assert rc == 0, report
    assert statuses(report) == {"a-fp8": "converted", "b-w8": "converted"}
    for job in report["jobs"]:
        assert job["url"] and "/commit/" in job["url"]
        assert job["bytes_read"] > 0 and job["bytes_written"] > 0
    card = hub.read_file("acme/llama-a-FP8", "README.md").decode()
    prov = read_provenance(card)
    assert prov["source"] == "org/llama-a"
    assert prov["source_commit"] == hub.refs("org/llama-a")["heads"]["main"]
    assert prov["scheme"] == "FP8_DYNAMIC" and prov["ignore"] == ["lm_head"]
    config = json.loads(hub.read_file("acme/llama-b-W8A16", "config.json"))
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    commits = {t: len(hub.commits(t)) for t in ("acme/llama-a-FP8", "acme/llama-b-W8A16")}

    # 2. nothing changed: both skipped, not one tensor byte (not even a header) read
    hub.clear_log()
    rc, report = run(capsys, jobs)
    assert rc == 0
    assert statuses(report) == {"a-fp8": "skipped", "b-w8": "skipped"}
    assert tensor_reads(hub) == []
    assert not [r for r in hub.request_log if r.method == "POST" and "/commit/" in r.path]
    assert {t: len(hub.commits(t)) for t in commits} == commits

    # 3. a new commit on one source: only its job converts, as one new commit on the target
    sha = new_source_commit(hub, "org/llama-a", llama_ckpt, tmp_path)
    hub.clear_log()
    rc, report = run(capsys, jobs)
    assert rc == 0
    assert statuses(report) == {"a-fp8": "converted", "b-w8": "skipped"}
    assert "new source commit" in report["jobs"][0]["reason"]
    assert len(hub.commits("acme/llama-a-FP8")) == commits["acme/llama-a-FP8"] + 1
    assert len(hub.commits("acme/llama-b-W8A16")) == commits["acme/llama-b-W8A16"]
    assert read_provenance(hub.read_file("acme/llama-a-FP8", "README.md").decode())["source_commit"] == sha
    touched = {r.repo_id for r in tensor_reads(hub)}
    assert touched == {"org/llama-a"}
    assert json.loads(hub.read_file("acme/llama-a-FP8", "generation_config.json"))["temperature"] == 0.42

    # 4. changed settings trigger a conversion too (and --only runs just that job)
    write_jobs(jobs, JOBS.replace('"re:.*embed_tokens$"', '"re:.*embed_tokens$", "re:.*down_proj$"'))
    rc, report = run(capsys, jobs, "--only", "b-w8")
    assert rc == 0
    assert statuses(report) == {"b-w8": "converted"}
    assert "settings changed" in report["jobs"][0]["reason"]
    rc, report = run(capsys, jobs)
    assert statuses(report) == {"a-fp8": "skipped", "b-w8": "skipped"}


def test_a_failing_job_does_not_stop_the_others(hub, tmp_path, capsys):
    jobs = write_jobs(tmp_path / "jobs.toml", JOBS.replace("org/llama-b", "org/does-not-exist"))
    rc, report = run(capsys, jobs)
    assert rc == 1
    assert report["ok"] is False
    assert statuses(report) == {"a-fp8": "converted", "b-w8": "failed"}
    failed = report["jobs"][1]
    assert "org/does-not-exist" in failed["error"] and "not found" in failed["error"]
    assert report["counts"] == {"converted": 1, "skipped": 0, "failed": 1, "planned": 0}
    assert not hub.repo_exists("acme/llama-b-W8A16")

    # the table (default output) says the same, and the exit code stays non-zero
    capsys.readouterr()
    assert main([str(jobs)]) == 1
    table = capsys.readouterr().out
    lines = table.splitlines()
    assert lines[0].split()[:2] == ["job", "status"]
    assert any(line.startswith("a-fp8") and " skipped " in line for line in lines)
    assert any(line.startswith("b-w8") and " failed " in line and "error:" in line for line in lines)
    assert lines[-1] == "2 job(s): 0 converted, 1 skipped, 1 failed"


def test_dry_run_publishes_nothing(hub, tmp_path, capsys):
    jobs = write_jobs(tmp_path / "jobs.toml", JOBS)
    rc, report = run(capsys, jobs, "--dry-run", "--only", "a-fp8")
    assert rc == 0
    (job,) = report["jobs"]
    assert job["status"] == "planned"
    assert "would write" in job["reason"]
    assert not hub.repo_exists("acme/llama-a-FP8")


def test_pull_request_mode_is_idempotent(hub, tmp_path, capsys):
    jobs = write_jobs(tmp_path / "jobs.toml", JOBS + "create_pr = true\n")  # applies to b-w8
    rc, report = run(capsys, jobs, "--only", "b-w8")
    assert rc == 0 and statuses(report) == {"b-w8": "converted"}
    assert "/discussions/" in report["jobs"][0]["url"]
    assert list(hub.refs("acme/llama-b-W8A16")["prs"]) == ["1"]
    rc, report = run(capsys, jobs, "--only", "b-w8")
    assert statuses(report) == {"b-w8": "skipped"}
    assert "PR #1" in report["jobs"][0]["reason"]
    assert list(hub.refs("acme/llama-b-W8A16")["prs"]) == ["1"]
    # the same conversion proposed to another branch is no proposal to the job's: a PR of its own
    branched = write_jobs(tmp_path / "dev.toml", JOBS.replace('target = "acme/llama-b-W8A16"', 'target = "acme/llama-b-W8A16@dev"') + "create_pr = true\n")
    rc, report = run(capsys, branched, "--only", "b-w8")
    assert rc == 0 and statuses(report) == {"b-w8": "converted"}, report
    assert sorted(hub.refs("acme/llama-b-W8A16")["prs"]) == ["1", "2"]
    rc, report = run(capsys, branched, "--only", "b-w8")
    assert statuses(report) == {"b-w8": "skipped"} and "PR #2" in report["jobs"][0]["reason"], report


def test_a_pull_request_someone_else_opened_does_not_count_as_done(hub, tmp_path, capsys):
    """Anyone may open a PR on a public repo, with a card that claims the very conversion a job
    would propose: it does not make the job "up to date"; the job's own PR does."""
    from huggingface_hub import CommitOperationAdd, HfApi

    hub.add_user("mallory", "hf_mallory_token")
    jobs = write_jobs(tmp_path / "jobs.toml", JOBS + "create_pr = true\n")  # applies to b-w8
    # a card exactly like the one the job proposes (made by the same job on a scratch target)
    scratch = write_jobs(tmp_path / "scratch.toml", JOBS.replace("acme/llama-b-W8A16", "acme/scratch") + "create_pr = true\n")
    rc, report = run(capsys, scratch, "--only", "b-w8")
    assert rc == 0 and statuses(report) == {"b-w8": "converted"}
    card = hub.read_file("acme/scratch", "README.md", revision="refs/pr/1")
    alice = HfApi(endpoint=hub.url, token=ALICE)
    alice.create_repo("acme/llama-b-W8A16")
    HfApi(endpoint=hub.url, token="hf_mallory_token").create_commit(
        "acme/llama-b-W8A16", [CommitOperationAdd("README.md", card)], commit_message="totally streamer", create_pr=True
    )

    rc, report = run(capsys, jobs, "--only", "b-w8")
    assert rc == 0 and statuses(report) == {"b-w8": "converted"}, report
    assert sorted(hub.refs("acme/llama-b-W8A16")["prs"]) == ["1", "2"]  # mallory's, then the job's own
    rc, report = run(capsys, jobs, "--only", "b-w8")
    assert statuses(report) == {"b-w8": "skipped"} and "PR #2" in report["jobs"][0]["reason"], report


def test_a_folder_named_like_the_target_is_not_written_to(hub, tmp_path, capsys, monkeypatch):
    """A job's source and target are Hub repos even where the mirror runs next to folders of the
    same names (a clone of the target repo, say): the folder is left alone, the Hub gets the model."""
    jobs = write_jobs(tmp_path / "jobs.toml", JOBS)
    monkeypatch.chdir(tmp_path)
    clone = tmp_path / "acme" / "llama-a-FP8"
    clone.mkdir(parents=True)
    (clone / "notes.txt").write_text("mine")
    (tmp_path / "org" / "llama-a").mkdir(parents=True)  # an empty folder named like the source
    rc, report = run(capsys, jobs, "--only", "a-fp8")
    assert rc == 0 and statuses(report) == {"a-fp8": "converted"}, report
    assert [p.name for p in clone.iterdir()] == ["notes.txt"] and (clone / "notes.txt").read_text() == "mine"
    assert "model.safetensors.index.json" in hub.files("acme/llama-a-FP8")


# --------------------------------------------------------------------------------------------
# the jobs file
# --------------------------------------------------------------------------------------------


def test_jobs_file_validation_lists_every_problem(tmp_path):
    bad = write_jobs(tmp_path / "bad.toml", """
[defaults]
sheme = "FP8_DYNAMIC"

[[job]]
name = "one"
source = "org/a"
target = "acme/a"
scheme = "FP8_DYNAMIC"
privat = true

[[job]]
name = "one"
source = "org/b"
target = "acme/b"
scheme = "FP9"

[[job]]
name = "three"
target = "acme/c"
scheme = "W4A16"

[[job]]
name = "four"
source = "not a repo"
target = "org/a"
scheme = "FP8_DYNAMIC"
ignore = "lm_head"
""")
    with pytest.raises(JobsFileError) as err:
        load_jobs(bad)
    text = str(err.value)
    assert "unknown key 'sheme' (did you mean 'scheme'?)" in text
    assert "[[job]] #1 (one): unknown key 'privat' (did you mean 'private'?)" in text
    assert "duplicate name 'one'" in text
    assert "unknown scheme 'FP9'" in text and "FP8_DYNAMIC" in text
    assert "[[job]] #3 (three): missing source" in text
    assert "'not a repo' is not a Hub repo id" in text
    assert "ignore must be a list" in text

    assert main([str(bad)]) == 2
    with pytest.raises(JobsFileError, match="not valid TOML"):
        load_jobs(write_jobs(tmp_path / "broken.toml", "[[job]\nname = 1"))
    with pytest.raises(JobsFileError, match="no jobs"):
        parse_jobs({"defaults": {"scheme": "FP8_DYNAMIC"}})
    with pytest.raises(JobsFileError, match="same repo"):
        parse_jobs({"job": [{"name": "x", "source": "org/a", "target": "org/a", "scheme": "W4A16"}]})
    with pytest.raises(JobsFileError, match="also written by job 'x'"):
        parse_jobs({"job": [
            {"name": "x", "source": "org/a", "target": "acme/t", "scheme": "W4A16"},
            {"name": "y", "source": "org/b", "target": "acme/t", "scheme": "W4A16"},
        ]})
    with pytest.raises(JobsFileError, match="calibration"):
        parse_jobs({"job": [{"name": "x", "source": "org/a", "target": "acme/t", "scheme": "FP8"}]})


def test_jobs_file_format(tmp_path):
    jobs = load_jobs(write_jobs(tmp_path / "jobs.toml", JOBS))
    a, b = jobs
    assert a == MirrorJob(name="a-fp8", source="org/llama-a", target="acme/llama-a-FP8", scheme="FP8_DYNAMIC",
                    ignore=("lm_head",), source_revision="main", device="cpu")
    assert b.scheme == "W8A16" and b.ignore == ("lm_head", "re:.*embed_tokens$") and not b.create_pr
    example = REPO_ROOT / "examples" / "jobs.toml"
    assert [j.name for j in load_jobs(example)]  # the documented example stays valid
    assert main([str(tmp_path / "jobs.toml"), "--only", "nope"]) == 2


def test_summary_table_shape():
    rows = [
        JobResult("a", "converted", "org/a", "acme/a", "FP8_DYNAMIC", source_commit="0123456789",
                  url="http://hub/acme/a/commit/abc", bytes_read=2_000_000, bytes_written=1_000_000, seconds=1.25),
        JobResult("bb", "skipped", "org/b", "acme/b", "W4A16", reason="up to date", source_commit="abcdef0123"),
        JobResult("c", "failed", "org/c", "acme/c", "W4A16", error="source repo org/c not found\nmore"),
    ]
    table = render_table(rows).splitlines()
    assert table[1].split() == ["a", "converted", "0123456", "2.00", "MB", "1.00", "MB", "1.2s",
                                "http://hub/acme/a/commit/abc"]
    assert table[2].split()[:3] == ["bb", "skipped", "abcdef0"]
    assert table[3].endswith("error: source repo org/c not found more")
    assert table[-1] == "3 job(s): 1 converted, 1 skipped, 1 failed"


# --------------------------------------------------------------------------------------------
# webhooks
# --------------------------------------------------------------------------------------------


def payload(repo: str, *, scope="repo.content", action="update", refs=("refs/heads/main",), head="f" * 40, rtype="model"):
    """A webhook payload as the Hub sends it (version 3)."""
    body = {
        "event": {"action": action, "scope": scope},
        "repo": {
            "type": rtype, "name": repo, "id": "6512345", "private": False, "headSha": head,
            "owner": {"id": "64ab"}, "url": {"web": f"https://huggingface.co/{repo}", "api": f"/api/models/{repo}"},
        },
        "webhook": {"id": "65aa", "version": 3},
    }
    if refs is not None:
        body["updatedRefs"] = [{"ref": r, "oldSha": "e" * 40, "newSha": head} for r in refs]
    return body


def test_payload_matching(tmp_path):
    jobs = parse_jobs({"job": [
        {"name": "main", "source": "org/m", "target": "acme/m1", "scheme": "W4A16"},
        {"name": "dev", "source": "org/m@dev", "target": "acme/m2", "scheme": "W4A16"},
        {"name": "pinned", "source": f"org/m@{'a' * 40}", "target": "acme/m3", "scheme": "W4A16"},
        {"name": "other", "source": "org/o", "target": "acme/o", "scheme": "W4A16"},
    ]})

    def names(p):
        return [j.name for j in match_payload(jobs, p)[0]]

    assert names(payload("org/m")) == ["main"]
    assert names(payload("ORG/M", refs=["refs/heads/dev"])) == ["dev"]
    assert names(payload("org/m", refs=None)) == ["main", "dev"]
    assert names(payload("org/m", refs=["refs/heads/main", "refs/heads/dev"])) == ["main", "dev"]
    assert names(payload("org/m", refs=["refs/heads/feature"])) == []
    assert names(payload("org/m", scope="discussion")) == []
    assert names(payload("org/m", scope="repo.config")) == []
    assert names(payload("org/m", scope="repo", action="delete")) == []
    assert names(payload("org/m", rtype="dataset")) == []
    assert names(payload("org/unknown")) == []
    assert names({"hello": "world"}) == []


def _request(url: str, method: str, path: str, body: dict | None = None, secret: str | None = None):
    host, port = url.split("//")[1].split("/")[0].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    headers = {"Content-Type": "application/json"}
    if secret is not None:
        headers["X-Webhook-Secret"] = secret
    data = json.dumps(body).encode() if body is not None else None
    conn.request(method, path, body=data, headers=headers)
    r = conn.getresponse()
    out = r.status, json.loads(r.read() or b"null")
    conn.close()
    return out


def test_webhook_listener_end_to_end(hub, tmp_path, llama_ckpt):
    """`mirror --serve` in its own process: secrets are checked, the right job runs, the target gets a commit."""
    jobs = write_jobs(tmp_path / "jobs.toml", JOBS)
    env = {**os.environ, "MIRROR_SECRET": "s3cret", "PYTHONPATH": str(REPO_ROOT)}
    env.pop("HF_TOKEN")  # the token comes from the command line here
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamer", "mirror", str(jobs), "--serve", "--port", "0",
         "--secret-env", "MIRROR_SECRET", "--token", ALICE],
        env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=tmp_path,
    )
    lines: list[str] = []
    started = threading.Event()

    def drain():  # keep reading stderr so the child never blocks on a full pipe
        for line in proc.stderr:
            lines.append(line)
            if "listening on " in line:
                started.set()
        started.set()

    threading.Thread(target=drain, daemon=True).start()
    try:
        started.wait(90)
        url = next((ln.split("listening on ")[1].split()[0] for ln in lines if "listening on " in ln), None)
        assert url, f"the listener did not start: rc={proc.poll()}\n{''.join(lines)}"
        assert url.endswith("/webhook")

        assert _request(url, "GET", "/health") == (200, {"ok": True})
        good = payload("org/llama-a", head=hub.refs("org/llama-a")["heads"]["main"])
        assert _request(url, "POST", "/webhook", good)[0] == 401
        assert _request(url, "POST", "/webhook", good, secret="wrong")[0] == 403
        assert _request(url, "GET", "/jobs", secret="wrong")[0] == 403
        status, body = _request(url, "POST", "/webhook", payload("org/unrelated"), secret="s3cret")
        assert status == 200 and body["queued"] == [] and "no job" in body["ignored"]
        assert not hub.repo_exists("acme/llama-a-FP8")

        status, body = _request(url, "POST", "/webhook", good, secret="s3cret")
        assert (status, body["queued"]) == (202, ["a-fp8"])

        def last(name):
            _, st = _request(url, "GET", "/jobs", secret="s3cret")
            job = st["jobs"][name]
            return job["last"] if job["state"] == "idle" else None

        deadline = time.monotonic() + 60
        while (result := last("a-fp8")) is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert result and result["status"] == "converted", result
        before = len(hub.commits("acme/llama-a-FP8"))
        assert before >= 2  # the repo's creation, then the conversion
        assert not hub.repo_exists("acme/llama-b-W8A16")  # the other job did not run

        # a push to the source: the next delivery converts again, into a new commit
        sha = new_source_commit(hub, "org/llama-a", llama_ckpt, tmp_path)
        status, body = _request(url, "POST", "/", payload("org/llama-a", head=sha), secret="s3cret")
        assert (status, body["queued"]) == (202, ["a-fp8"])
        deadline = time.monotonic() + 60
        while len(hub.commits("acme/llama-a-FP8")) == before and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(hub.commits("acme/llama-a-FP8")) == before + 1
        card = read_provenance(hub.read_file("acme/llama-a-FP8", "README.md").decode())
        assert card["source_commit"] == sha
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, "".join(lines)


def test_webhook_payload_mode(hub, tmp_path, capsys, monkeypatch):
    """A Hub webhook can start a Hugging Face Job directly; it gets the payload in $WEBHOOK_PAYLOAD."""
    jobs = write_jobs(tmp_path / "jobs.toml", JOBS)
    monkeypatch.setenv("WEBHOOK_PAYLOAD", json.dumps(payload("org/llama-b")))
    rc, report = run(capsys, jobs, "--webhook-payload")
    assert rc == 0
    assert statuses(report) == {"b-w8": "converted"}
    monkeypatch.setenv("WEBHOOK_PAYLOAD", json.dumps(payload("org/llama-b", scope="discussion")))
    rc, report = run(capsys, jobs, "--webhook-payload")
    assert rc == 0 and report["jobs"] == []
    (tmp_path / "payload.json").write_text(json.dumps(payload("org/llama-b")))
    rc, report = run(capsys, jobs, "--payload-file", tmp_path / "payload.json")
    assert rc == 0 and statuses(report) == {"b-w8": "skipped"}


def test_serve_requires_a_secret(tmp_path, monkeypatch, capsys):
    jobs = write_jobs(tmp_path / "jobs.toml", JOBS)
    monkeypatch.delenv("WEBHOOK_SECRET", raising=False)
    assert main([str(jobs), "--serve", "--port", "0"]) == 2
    assert "needs a webhook secret" in capsys.readouterr().err
    assert main([str(jobs), "--serve", "--secret-env", "NOT_SET_ANYWHERE"]) == 2


def test_listener_workers_keep_the_callers_nonfinite_policy():
    """`with nonfinite_policy("passthrough")` around a listener applies to the jobs its worker
    threads run, as it does around MirrorRunner.run."""
    from streamer.formats import allows_nonfinite, nonfinite_policy
    from streamer.mirror.webhook import WebhookListener

    seen: list[bool] = []

    class FakeRunner:
        parallel = 1
        cancel = threading.Event()

        def run_one(self, job):
            seen.append(allows_nonfinite())
            return JobResult(job.name, "skipped", job.source, job.target, job.scheme, reason="up to date")

    jobs = parse_jobs({"job": [{"name": "x", "source": "org/x", "target": "acme/x", "scheme": "W4A16"}]})
    with nonfinite_policy("passthrough"):
        listener = WebhookListener(jobs, FakeRunner(), secret="s", port=0).start()
    try:
        listener.submit(["x"])
        assert listener.wait_idle(10)
    finally:
        listener.stop()
    assert seen == [True] and not allows_nonfinite()


def test_listener_queue_coalesces_triggers():
    """Triggers for a queued job are merged; a trigger while it runs makes it run once more."""
    from streamer.mirror.webhook import WebhookListener

    gate = threading.Event()
    calls: list[str] = []

    class FakeRunner:
        parallel = 1
        cancel = threading.Event()

        def run_one(self, job):
            calls.append(job.name)
            gate.wait(10)
            return JobResult(job.name, "skipped", job.source, job.target, job.scheme, reason="up to date")

    jobs = parse_jobs({"job": [
        {"name": "x", "source": "org/x", "target": "acme/x", "scheme": "W4A16"},
        {"name": "y", "source": "org/y", "target": "acme/y", "scheme": "W4A16"},
    ]})
    listener = WebhookListener(jobs, FakeRunner(), secret="s", port=0).start()
    try:
        listener.submit(["x"])
        deadline = time.monotonic() + 10
        while not calls and time.monotonic() < deadline:
            time.sleep(0.01)
        listener.submit(["x"])  # x is running: one more run afterwards
        listener.submit(["x", "y"])  # x is already due again; y is queued once
        listener.submit(["y"])
        assert listener.status()["jobs"]["x"]["state"] == "running+queued"
        gate.set()
        assert listener.wait_idle(10)
        assert sorted(calls) == ["x", "x", "y"]
        assert listener.results["y"].status == "skipped"
    finally:
        gate.set()
        listener.stop()


def test_foreign_target_is_not_overwritten(hub, tmp_path, capsys):
    folder = tmp_path / "foreign"
    folder.mkdir()
    (folder / "README.md").write_text("# somebody else's model\n")
    (folder / "model.safetensors").write_bytes(b"not ours")
    hub.seed_repo("acme/llama-a-FP8", folder)
    jobs = write_jobs(tmp_path / "jobs.toml", JOBS)
    rc, report = run(capsys, jobs, "--only", "a-fp8")
    assert rc == 1
    assert "did not write" in report["jobs"][0]["error"] and "overwrite = true" in report["jobs"][0]["error"]
    assert hub.files("acme/llama-a-FP8").keys() == {"README.md", "model.safetensors"}


# --------------------------------------------------------------------------------------------
# jobs sharing a source: one read pass
# --------------------------------------------------------------------------------------------

GROUPED = """
[defaults]
ignore = ["lm_head"]
device = "cpu"

[[job]]
name = "a-fp8"
source = "org/llama-a"
target = "acme/llama-a-FP8"
scheme = "FP8_DYNAMIC"

[[job]]
name = "a-w8"
source = "org/llama-a@main"   # another way to name the same commit
target = "acme/llama-a-W8A16"
scheme = "W8A16"

[[job]]
name = "b-fp8"
source = "org/llama-b"
target = "acme/llama-b-FP8"
scheme = "FP8_DYNAMIC"
"""


def source_bytes(hub: LocalHub, repo_id: str) -> int:
    """Bytes of safetensors files GET from REPO_ID since the log was cleared."""
    return sum(r.bytes_out for r in tensor_reads(hub) if r.repo_id == repo_id)


def streamer_commits(hub: LocalHub, repo_id: str) -> list:
    return [c for c in hub.commits(repo_id) if "streamer" in c.message]


def same_files(hub: LocalHub, repo: str, alone: str) -> None:
    """REPO holds exactly what ALONE (the same job run on its own) holds; the card differs only
    in the repo it names."""
    files = hub.files(repo)
    assert set(files) == set(hub.files(alone))
    for f in files:
        ours, theirs = hub.read_file(repo, f), hub.read_file(alone, f)
        if f == "README.md":
            ours = ours.replace(repo.encode(), b"REPO").replace(repo.split("/")[1].encode(), b"NAME")
            theirs = theirs.replace(alone.encode(), b"REPO").replace(alone.split("/")[1].encode(), b"NAME")
        assert ours == theirs, (repo, f)


def test_jobs_sharing_a_source_are_converted_in_one_read(hub, tmp_path, capsys):
    jobs = write_jobs(tmp_path / "jobs.toml", GROUPED)
    sha = hub.refs("org/llama-a")["heads"]["main"]

    # the dry run says which jobs share a read, in words and in JSON, and writes nothing
    rc, report = run(capsys, jobs, "--dry-run")
    assert rc == 0 and set(statuses(report).values()) == {"planned"}
    assert [(p["source"], p["jobs"]) for p in report["read_passes"]] == [(f"org/llama-a@{sha}", ["a-fp8", "a-w8"])]
    passes = {j["name"]: j["read_pass"] for j in report["jobs"]}
    assert passes == {"a-fp8": ["a-fp8", "a-w8"], "a-w8": ["a-fp8", "a-w8"], "b-fp8": []}  # other source: alone
    assert "grouping_off" not in report
    capsys.readouterr()
    assert main([str(jobs), "--dry-run"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert f"one read pass: org/llama-a@{sha[:7]} would be read once for 2 jobs (a-fp8, a-w8)" in table
    assert not hub.repo_exists("acme/llama-a-FP8") and not hub.repo_exists("acme/llama-a-W8A16")

    # each job alone, into other repos, to compare with (one job at a time: no read pass)
    alone = write_jobs(tmp_path / "alone.toml", GROUPED.replace("acme/llama-a-", "acme/alone-"))
    hub.clear_log()
    rc, report = run(capsys, alone, "--only", "a-fp8")
    assert rc == 0 and report["read_passes"] == [] and report["jobs"][0]["read_pass"] == []
    one_read = source_bytes(hub, "org/llama-a")
    assert one_read > 0
    rc, report = run(capsys, alone, "--only", "a-w8")
    assert rc == 0 and statuses(report) == {"a-w8": "converted"}

    # all three, two at a time: the llama-a jobs read their source once, beside b-fp8's own run
    hub.clear_log()
    rc, report = run(capsys, jobs, "--parallel", "2", "--max-memory", "256MB")
    assert rc == 0, report
    assert statuses(report) == {"a-fp8": "converted", "a-w8": "converted", "b-fp8": "converted"}
    (rp,) = report["read_passes"]
    assert rp["jobs"] == ["a-fp8", "a-w8"] and rp["source"] == f"org/llama-a@{sha}"
    read = source_bytes(hub, "org/llama-a")
    with capsys.disabled():
        print(f"\norg/llama-a safetensors bytes GET: one job alone {one_read}, two jobs in one read pass {read}")
    assert read <= 1.01 * one_read, (read, one_read)  # not twice
    assert 0 < rp["bytes_read"] <= read
    assert source_bytes(hub, "org/llama-b") > 0
    for job in report["jobs"]:
        assert "/commit/" in job["url"] and job["bytes_written"] > 0
    for repo in ("acme/llama-a-FP8", "acme/llama-a-W8A16"):
        assert len(streamer_commits(hub, repo)) == 1
    same_files(hub, "acme/llama-a-FP8", "acme/alone-FP8")
    same_files(hub, "acme/llama-a-W8A16", "acme/alone-W8A16")

    # the table says it too; the next run finds all three up to date
    capsys.readouterr()
    assert main([str(jobs)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "3 job(s): 0 converted, 3 skipped, 0 failed"


def test_a_failing_job_of_a_read_pass_does_not_stop_the_others(hub, tmp_path, capsys):
    jobs = write_jobs(tmp_path / "jobs.toml", GROUPED + """
[[job]]
name = "a-w4"
source = "org/llama-a"
target = "nobody/llama-a-W4A16"   # alice cannot write there
scheme = "W4A16"
""")
    # a-fp8 is up to date before the run: it is skipped, the rest of its read pass runs
    rc, report = run(capsys, jobs, "--only", "a-fp8")
    assert rc == 0 and statuses(report) == {"a-fp8": "converted"}
    hub.clear_log()
    rc, report = run(capsys, jobs, "--only", "a-fp8,a-w8,a-w4")
    assert rc == 1 and report["ok"] is False
    assert statuses(report) == {"a-fp8": "skipped", "a-w8": "converted", "a-w4": "failed"}
    assert [p["jobs"] for p in report["read_passes"]] == [["a-w8", "a-w4"]]
    by_name = {j["name"]: j for j in report["jobs"]}
    assert by_name["a-fp8"]["read_pass"] == [] and by_name["a-w4"]["read_pass"] == ["a-w8", "a-w4"]
    assert "no write access to 'nobody'" in by_name["a-w4"]["error"]
    assert by_name["a-w8"]["error"] is None and "/commit/" in by_name["a-w8"]["url"]
    assert len(streamer_commits(hub, "acme/llama-a-W8A16")) == 1
    assert not hub.repo_exists("nobody/llama-a-W4A16")
    assert report["counts"] == {"converted": 1, "skipped": 1, "failed": 1, "planned": 0}


def test_ray_runs_every_job_on_its_own_and_the_dry_run_says_so(hub, tmp_path, capsys):
    jobs = write_jobs(tmp_path / "jobs.toml", GROUPED)
    rc, report = run(capsys, jobs, "--dry-run", "--ray")
    assert rc == 0 and set(statuses(report).values()) == {"planned"}
    assert report["read_passes"] == [] and all(j["read_pass"] == [] for j in report["jobs"])
    assert "--ray" in report["grouping_off"] and "on its own" in report["grouping_off"]
    capsys.readouterr()
    assert main([str(jobs), "--dry-run", "--ray"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("--ray: each job reads its source on its own") for line in lines)


def test_grouping_keys():
    """Jobs share a read pass only with the same source commit and every shared setting equal;
    two jobs writing one repo (on different branches) never share a pass."""
    from streamer.mirror.runner import group_jobs, group_key

    base = {"source": "org/m", "scheme": "W4A16"}
    jobs = parse_jobs({"job": [
        {**base, "name": "a", "target": "acme/a"},
        {**base, "name": "b", "target": "acme/b", "scheme": "FP8_DYNAMIC"},  # scheme: per target
        {**base, "name": "c", "target": "acme/c", "ignore": ["lm_head"]},  # ignore: per target
        {**base, "name": "d", "target": "acme/d", "dequant_dtype": "float32"},
        {**base, "name": "e", "target": "acme/e", "skip_incompatible": True},
        {**base, "name": "f", "target": "acme/f", "private": True},
        {**base, "name": "g", "target": "acme/g", "device": "cpu"},
        {**base, "name": "h", "target": "acme/a@other-branch"},
        {**base, "name": "i", "target": "acme/i", "source": "org/m@v2"},  # another commit
        {**base, "name": "j", "target": "acme/j", "source": "org/n"},
        {**base, "name": "k", "target": "acme/k", "scheme": "NVFP4A16"},
        {**base, "name": "l", "target": "acme/l", "nonfinite": "passthrough"},
    ]})
    commits = {"i": "2" * 40}
    keys = [group_key(j, commits.get(j.name, "1" * 40), "cpu") for j in jobs]
    groups = [[jobs[i].name for i in g] for g in group_jobs(keys, [j.target for j in jobs])]
    # g names the run's device (cpu) itself: the same setting as a, b, k
    # c's ignore list is its own target's: it shares the pass too
    assert groups == [["a", "b", "c", "g", "k"], ["d"], ["e"], ["f"], ["h"], ["i"], ["j"], ["l"]]


def test_a_read_pass_too_big_for_the_budget_runs_its_jobs_one_by_one(hub, tmp_path, capsys, monkeypatch):
    """A budget that each job fits alone but not all of them at once: they run as without grouping."""
    from streamer.engine import convert as engine
    from streamer.errors import Hint, StreamerError

    calls = []

    def too_small(src, targets, **common):
        calls.append([t.dst for t in targets])
        raise StreamerError("the memory budget is too small for 2 targets at once", hints=(Hint("max_memory", "1GB"),))

    monkeypatch.setattr(engine, "convert_many", too_small)
    jobs = write_jobs(tmp_path / "jobs.toml", GROUPED)
    rc, report = run(capsys, jobs, "--only", "a-fp8,a-w8")
    assert calls == [["hub://acme/llama-a-FP8", "hub://acme/llama-a-W8A16"]]  # Hub repos, whatever is on disk
    assert rc == 0 and statuses(report) == {"a-fp8": "converted", "a-w8": "converted"}
    assert report["read_passes"] == [] and all(j["read_pass"] == [] for j in report["jobs"])
    for repo in ("acme/llama-a-FP8", "acme/llama-a-W8A16"):
        assert len(streamer_commits(hub, repo)) == 1


def test_nan_weights_follow_the_jobs_or_the_callers_nonfinite_policy(hub, tmp_path, llama_ckpt):
    """A weight holding NaN stops its job, with a hint in the jobs file's words; the job's own
    `nonfinite = "passthrough"` lets it through, and so does the caller's
    `with nonfinite_policy("passthrough")` around MirrorRunner.run, on the worker threads that
    convert the jobs as on the caller's own."""
    from streamer.formats import nonfinite_policy
    from streamer.mirror.runner import MirrorRunner

    src = tmp_path / "nan-src"
    shutil.copytree(llama_ckpt, src)
    set_element(src, "model.layers.0.self_attn.q_proj.weight", 77, BF16_NAN)
    hub.seed_repo("org/llama-nan", src)
    spec = {"name": "nan", "source": "org/llama-nan", "target": "acme/llama-nan-FP8", "scheme": "FP8_DYNAMIC",
            "device": "cpu"}  # fmt: skip

    hub.set_throttle(up_bytes_per_s=5_000)  # no shard is up before the NaN is found
    try:
        (refused,) = MirrorRunner(token=ALICE, parallel=2).run(parse_jobs({"job": [spec]}))
    finally:
        hub.set_throttle(None, None)
    assert refused.status == "failed" and "1 NaN" in refused.error, refused
    assert 'set nonfinite = "passthrough" in this job' in refused.error
    assert "--nonfinite" not in refused.error
    assert not hub.repo_exists("acme/llama-nan-FP8")  # nothing committed, and the repo it created is gone

    with nonfinite_policy("passthrough"):
        (passed,) = MirrorRunner(token=ALICE, parallel=2).run(parse_jobs({"job": [spec]}))
    assert passed.status == "converted", passed
    assert "model.safetensors.index.json" in hub.files("acme/llama-nan-FP8")

    other = {**spec, "target": "acme/llama-nan-FP8-b", "nonfinite": "passthrough"}
    (own,) = MirrorRunner(token=ALICE, parallel=2).run(parse_jobs({"job": [other]}))
    assert own.status == "converted", own
    # that output (its card names the NaN weight) is up to date for the job that allows it, not
    # for one that refuses such weights: that one converts again, and stops as a fresh run would
    (again,) = MirrorRunner(token=ALICE, parallel=2).run(parse_jobs({"job": [other]}))
    assert again.status == "skipped", again
    strict = {**other, "nonfinite": "refuse"}
    (refused_now,) = MirrorRunner(token=ALICE, parallel=2).run(parse_jobs({"job": [strict]}))
    assert refused_now.status == "failed" and "1 NaN" in refused_now.error, refused_now

    with pytest.raises(JobsFileError, match="nonfinite 'allow': use one of refuse, passthrough"):
        parse_jobs({"job": [{**spec, "nonfinite": "allow"}]})

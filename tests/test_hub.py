"""Hub to Hub through localhub: range reads only, one commit, faults, resume, clear errors."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import huggingface_hub
import pytest

from fixtures import BF16_NAN, load_logits, set_element
from streamer.cli import main as cli
from streamer.localhub import LocalHub

ALICE = "hf_alice_token_0123456789"
BOB = "hf_bob_token_0123456789"
SOURCE = "acme/tiny-llama"


@pytest.fixture
def hub(tmp_path, monkeypatch, llama_ckpt):
    with LocalHub(tmp_path / "hub") as h:
        h.add_user("alice", ALICE, orgs=["acme"])
        h.add_user("bob", BOB)
        h.seed_repo(SOURCE, llama_ckpt)
        monkeypatch.setenv("HF_ENDPOINT", h.url)
        # LFS rather than the client's default, Xet: tests/test_faults.py shares this fixture and
        # aims faults at LFS requests by URL. localhub takes both (see tests/test_localhub.py).
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
        # read by huggingface_hub at import: in-process runs keep their resume records here too
        monkeypatch.setattr(huggingface_hub.constants, "HF_HOME", str(tmp_path / "hf_home"))
        monkeypatch.setenv("HF_TOKEN", ALICE)
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", h.url)
        monkeypatch.setattr(
            huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE", h.url + "/{repo_id}/resolve/{revision}/{filename}"
        )
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True, raising=False)
        yield h


def run_cli(*args: str) -> int:
    return cli.main([*args, "--device", "cpu", "-q"])


def _streamer_commits(hub, repo):
    return [c for c in hub.commits(repo) if "streamer" in c.message]


def _safetensors_gets(log):
    return [r for r in log if r.method == "GET" and (r.file or "").endswith(".safetensors")]


def test_hub_to_hub_equals_local_to_local(hub, llama_ckpt, tmp_path):
    local = tmp_path / "local"
    assert run_cli(str(llama_ckpt), str(local), "--scheme", "NVFP4A16") == 0
    hub.clear_log()
    assert run_cli(SOURCE, "alice/tiny-llama-nvfp4", "--scheme", "NVFP4A16") == 0

    files = hub.files("alice/tiny-llama-nvfp4")
    for f in local.iterdir():
        if f.name == "README.md":
            continue  # the card names the source repo and its commit instead of a path
        assert hub.read_file("alice/tiny-llama-nvfp4", f.name) == f.read_bytes(), f.name
    assert set(files) - {".gitattributes"} == {f.name for f in local.iterdir()}

    log = hub.request_log
    gets = _safetensors_gets(log)
    assert gets and all(r.range is not None and r.status == 206 for r in gets), "a full-file GET happened"
    from streamer.engine.convert import prepare

    _, plan = prepare(str(llama_ckpt), scheme="NVFP4A16")
    needed = plan.catalog.header_bytes + plan.bytes_in
    fetched = sum(r.bytes_out for r in gets)
    assert fetched <= 1.01 * needed, (fetched, needed)
    assert len(_streamer_commits(hub, "alice/tiny-llama-nvfp4")) == 1

    card = hub.read_file("alice/tiny-llama-nvfp4", "README.md").decode()
    source_sha = hub.commits(SOURCE)[0].sha
    assert "base_model: acme/tiny-llama" in card and "base_model_relation: quantized" in card
    assert source_sha in card and "vllm serve alice/tiny-llama-nvfp4" in card


def test_target_loads_in_transformers(hub, llama_ckpt, tmp_path):
    assert run_cli(SOURCE, "alice/tiny-llama-fp8", "--scheme", "FP8_DYNAMIC") == 0
    folder = huggingface_hub.snapshot_download("alice/tiny-llama-fp8", cache_dir=tmp_path / "snap", endpoint=hub.url)
    import torch

    ref = load_logits(llama_ckpt)
    got = load_logits(Path(folder))
    cos = torch.nn.functional.cosine_similarity(ref.flatten().float(), got.flatten().float(), dim=0)
    assert cos > 0.99


def test_faults_are_retried_and_output_is_identical(hub, tmp_path):
    assert run_cli(SOURCE, "alice/clean", "--scheme", "FP8_DYNAMIC") == 0
    hub.set_faults(every=7, kinds=("drop", "500", "429", "slow"), retry_after=1, slow_seconds=0.2)
    assert run_cli(SOURCE, "alice/faulty", "--scheme", "FP8_DYNAMIC") == 0
    hub.set_faults(None)
    assert any(r.fault for r in hub.request_log), "no fault was injected"
    clean, faulty = hub.files("alice/clean"), hub.files("alice/faulty")
    assert clean.keys() == faulty.keys()
    for f in clean:
        if f.endswith((".safetensors", ".json")):
            assert hub.read_file("alice/clean", f) == hub.read_file("alice/faulty", f), f


def test_sigkill_then_rerun_resumes(hub, tmp_path):
    env = {
        **os.environ,
        "HF_ENDPOINT": hub.url,
        "HF_HUB_DISABLE_XET": "1",  # below, uploads are counted as LFS PUTs
        "HF_TOKEN": ALICE,
        "PYTHONUNBUFFERED": "1",
    }
    cmd = [sys.executable, "-m", "streamer", SOURCE, "alice/resumed", "--scheme", "W8A16", "--device", "cpu", "-q"]
    hub.set_throttle(up_bytes_per_s=150_000)
    hub.clear_log()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # Kill once the first shard is uploaded and recorded (the resume record lives in HF_HOME).
    records = Path(os.environ["HF_HOME"]) / "streamer" / "uploads"
    deadline = time.time() + 120
    puts, finished = [], set()
    while time.time() < deadline and not finished:
        puts = [r for r in hub.request_log if r.method == "PUT" and r.status == 200]
        for f in records.glob("*.json") if records.exists() else []:
            try:
                finished = set(json.loads(f.read_text()))
            except ValueError:
                pass
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    hub.set_throttle(None, None)
    first = hub.request_log
    assert puts, "no shard was uploaded before the kill"
    assert _streamer_commits(hub, "alice/resumed") == []  # the branch never held a partial model

    uploaded_before = sum(r.bytes_in for r in first if r.method == "PUT" and r.status == 200)
    hub.clear_log()
    assert subprocess.run(cmd, env=env, capture_output=True, timeout=300).returncode == 0
    rerun_log = hub.request_log
    rerun_bytes = sum(r.bytes_in for r in rerun_log if r.method == "PUT")
    shards = {f: s for f, s in hub.files("alice/resumed").items() if f.endswith(".safetensors")}
    assert rerun_bytes <= sum(shards.values()) - uploaded_before + max(shards.values())
    # shards the first run finished are not read (so not quantized) again: W8A16 has no fused
    # sets, so output shard N is made from source shard N alone
    tensor_reads = [r for r in rerun_log if r.method == "GET" and r.range and r.range[0] > 8]  # past the header
    reread = {r.file for r in tensor_reads if r.file in finished}
    assert finished and not reread, (finished, reread)
    assert len(_streamer_commits(hub, "alice/resumed")) == 1

    assert run_cli(SOURCE, "alice/clean", "--scheme", "W8A16") == 0
    for f in shards:
        assert hub.read_file("alice/clean", f) == hub.read_file("alice/resumed", f)


def test_create_pr_and_branch(hub):
    hub.create_repo("alice/target")
    assert run_cli(SOURCE, "alice/target", "--scheme", "FP8_DYNAMIC", "--create-pr") == 0
    assert "prs" in hub.refs("alice/target") and hub.refs("alice/target")["prs"]
    assert _streamer_commits(hub, "alice/target") == []  # main untouched
    # the same command again finds its pull request and opens no second one; another scheme does
    prs = hub.refs("alice/target")["prs"]
    assert run_cli(SOURCE, "alice/target", "--scheme", "FP8_DYNAMIC", "--create-pr", "--json") == 0
    assert hub.refs("alice/target")["prs"] == prs
    assert run_cli(SOURCE, "alice/target", "--scheme", "W8A16", "--create-pr") == 0
    assert len(hub.refs("alice/target")["prs"]) == len(prs) + 1
    # the same conversion proposed to another branch is another pull request (the branch is a
    # copy of main here: the same base commit, another target), and is found in its turn
    assert run_cli(SOURCE, "alice/target@dev", "--scheme", "W8A16", "--create-pr") == 0
    assert len(hub.refs("alice/target")["prs"]) == len(prs) + 2
    assert run_cli(SOURCE, "alice/target@dev", "--scheme", "W8A16", "--create-pr") == 0
    assert len(hub.refs("alice/target")["prs"]) == len(prs) + 2
    details = huggingface_hub.HfApi(endpoint=hub.url, token=ALICE).get_discussion_details("alice/target", 3)
    assert details.target_branch == "refs/heads/dev" and details.author == "alice" and details.is_pull_request
    assert run_cli(SOURCE, "alice/target", "--scheme", "FP8_DYNAMIC", "--revision", "fp8") == 0
    assert "config.json" in hub.files("alice/target", revision="fp8")
    assert "config.json" not in hub.files("alice/target")


def test_a_new_branch_holds_this_conversion_alone(hub):
    # A new branch starts as a copy of main; main's files (here not even streamer's) must not
    # stay on the branch next to the conversion's, and main keeps them.
    hub.seed_repo("alice/model", Path(__file__).parent / "refscripts")
    on_main = hub.files("alice/model")
    assert run_cli(SOURCE, "alice/model", "--scheme", "W4A16", "--revision", "w4a16") == 0
    assert run_cli(SOURCE, "alice/fresh", "--scheme", "W4A16") == 0
    produced = set(hub.files("alice/fresh")) - {".gitattributes"}  # a new repo's first commit has one
    assert set(hub.files("alice/model", revision="w4a16")) - {".gitattributes"} == produced
    assert hub.files("alice/model") == on_main
    on_branch = hub.commits("alice/model", revision="w4a16")
    assert "streamer" in on_branch[0].message and on_branch[1:] == hub.commits("alice/model")  # one commit on main's
    # A branch with no commit of its own yet (an interrupted first run left it, or it was made by
    # hand): its files are main's, not another conversion's; the run goes on without --overwrite.
    huggingface_hub.HfApi(endpoint=hub.url, token=ALICE).create_branch("alice/model", branch="fp8")
    assert run_cli(SOURCE, "alice/model", "--scheme", "FP8_DYNAMIC", "--revision", "fp8") == 0
    assert run_cli(SOURCE, "alice/fresh-fp8", "--scheme", "FP8_DYNAMIC") == 0
    assert set(hub.files("alice/model", revision="fp8")) - {".gitattributes"} == set(hub.files("alice/fresh-fp8")) - {".gitattributes"}
    # one that has diverged from main still needs --overwrite when streamer did not write it
    api = huggingface_hub.HfApi(endpoint=hub.url, token=ALICE)
    api.create_branch("alice/model", branch="other")
    api.upload_file(path_or_fileobj=b"mine", path_in_repo="notes.txt", repo_id="alice/model", revision="other")
    assert run_cli(SOURCE, "alice/model", "--scheme", "FP8_DYNAMIC", "--revision", "other") == 2


def test_a_cancel_removes_only_what_this_run_created(hub):
    # Two runs (two users of a Space) aim at the same new repo: both find it missing, the other
    # creates it first. This run's cancel must not delete the repo (or branch) the other one is
    # converting into; a repo this run did create is removed.
    from streamer.io.hub_sink import HubSink

    sink = HubSink("acme/shared", token=ALICE, endpoint=hub.url)
    sink.check()
    hub.create_repo("acme/shared")  # the other run, between this one's check and begin
    sink.begin()
    sink.abort(resumable=False)
    sink.settle()
    sink.close()
    assert hub.repo_exists("acme/shared")

    sink = HubSink("acme/shared", token=ALICE, endpoint=hub.url, revision="w4")
    sink.check()
    huggingface_hub.HfApi(endpoint=hub.url, token=ALICE).create_branch("acme/shared", branch="w4")
    sink.begin()
    sink.abort(resumable=False)
    sink.settle()
    sink.close()
    assert "w4" in hub.refs("acme/shared")["heads"]

    sink = HubSink("acme/mine", token=ALICE, endpoint=hub.url)
    sink.check()
    sink.begin()
    sink.abort(resumable=False)
    sink.settle()
    sink.close()
    assert not hub.repo_exists("acme/mine")

    # Created by this run, but written to since (another target of a fan-out into branches of
    # one new repo committed there): deleting it would take that work with it, so it stays.
    api = huggingface_hub.HfApi(endpoint=hub.url, token=ALICE)
    sink = HubSink("acme/used", token=ALICE, endpoint=hub.url)
    sink.check()
    sink.begin()
    api.create_branch("acme/used", branch="w4")
    api.upload_file(path_or_fileobj=b"theirs", path_in_repo="notes.txt", repo_id="acme/used", revision="w4")
    sink.abort(resumable=False)
    sink.settle()
    sink.close()
    assert hub.repo_exists("acme/used") and "notes.txt" in hub.files("acme/used", revision="w4")

    sink = HubSink("acme/used", token=ALICE, endpoint=hub.url, revision="fp8")
    sink.check()
    sink.begin()
    api.upload_file(path_or_fileobj=b"theirs", path_in_repo="notes.txt", repo_id="acme/used", revision="fp8")
    sink.abort(resumable=False)
    sink.settle()
    sink.close()
    assert "fp8" in hub.refs("acme/used")["heads"]

    sink = HubSink("acme/used", token=ALICE, endpoint=hub.url, revision="nvfp4")
    sink.check()
    sink.begin()
    sink.abort(resumable=False)  # untouched since: removed
    sink.settle()
    sink.close()
    assert "nvfp4" not in hub.refs("acme/used")["heads"]


def test_source_revision_is_pinned(hub, llama_ckpt, tmp_path):
    first = hub.commits(SOURCE)[0].sha
    assert run_cli(f"{SOURCE}@{first}", "alice/pinned", "--scheme", "FP8_DYNAMIC") == 0
    assert first in hub.read_file("alice/pinned", "README.md").decode()


def test_existing_target_rules(hub, capsys):
    hub.seed_repo("alice/notmine", Path(__file__).parent / "refscripts")
    assert run_cli(SOURCE, "alice/notmine", "--scheme", "FP8_DYNAMIC") == 2
    assert "did not write" in capsys.readouterr().err
    assert run_cli(SOURCE, "alice/notmine", "--scheme", "FP8_DYNAMIC", "--overwrite") == 0
    # a target streamer wrote can be refreshed without --overwrite, in one new commit
    assert run_cli(SOURCE, "alice/notmine", "--scheme", "W8A16") == 0
    files = hub.files("alice/notmine")
    assert not any(f.endswith(".py") for f in files)  # stale files of the old content are gone
    assert run_cli(SOURCE, SOURCE, "--scheme", "FP8_DYNAMIC") == 2
    assert "source repo" in capsys.readouterr().err


@pytest.mark.parametrize(
    "case,args,token,expect",
    [
        ("missing repo", ["acme/nope"], ALICE, "not found"),
        ("missing revision", [f"{SOURCE}@no-such-branch"], ALICE, "revision not found"),
        ("private without token", ["acme/secret"], None, "not found, or it is private"),
        ("gated not accepted", ["acme/gated"], BOB, "gated"),
        ("invalid token", [SOURCE], "hf_invalid", "token was rejected"),
        ("no write access", [SOURCE, "acme/bobs-copy"], BOB, "no write access"),
    ],
)
def test_errors_are_sentences_and_write_nothing(hub, llama_ckpt, monkeypatch, capsys, case, args, token, expect):
    hub.seed_repo("acme/secret", llama_ckpt, private=True)
    hub.seed_repo("acme/gated", llama_ckpt, gated=True)
    if token is None:
        monkeypatch.delenv("HF_TOKEN")
        monkeypatch.setenv("HF_TOKEN_PATH", "/nonexistent/token")
    else:
        monkeypatch.setenv("HF_TOKEN", token)
    target = args[1] if len(args) > 1 else "alice/should-not-exist"
    code = run_cli(args[0], target, "--scheme", "FP8_DYNAMIC")
    err = capsys.readouterr().err
    assert code != 0
    assert expect in err, err
    assert "Traceback" not in err
    assert ALICE not in err and BOB not in err and "hf_invalid" not in err
    if hub.repo_exists(target):
        assert _streamer_commits(hub, target) == []


def test_range_answered_with_200_is_refused(hub, monkeypatch):
    from streamer.io.hub_source import HubSource, RangeError

    src = HubSource(SOURCE, token=ALICE, endpoint=hub.url)

    class FakeResponse:
        status_code = 200
        headers = {"content-length": "10"}

    with pytest.raises(RangeError, match="refusing to download whole files"):
        from streamer.io.source import Span

        src._check_range(FakeResponse(), "model.safetensors", Span(0, 10))


def _is_private(hub, repo_id: str) -> bool:
    return hub.storage.get_repo("model", repo_id).private


def test_private_source_makes_private_target(hub, llama_ckpt, caplog):
    """A private or gated source is not republished publicly unless the user says --public; the
    log (and the dry run) says which visibility the new repo gets and why."""
    hub.seed_repo("acme/secret", llama_ckpt, private=True)
    hub.seed_repo("acme/gated", llama_ckpt, gated=True)
    caplog.set_level("INFO", logger="streamer")
    assert cli.main(["acme/secret", "alice/plan-only", "--scheme", "FP8_DYNAMIC", "--dry-run"]) == 0
    err = caplog.text
    assert "alice/plan-only will be created as a private repo because the source is private or gated" in err
    assert "--public" in err and not hub.repo_exists("alice/plan-only")

    assert run_cli("acme/secret", "alice/from-secret", "--scheme", "FP8_DYNAMIC") == 0
    assert run_cli("acme/gated", "alice/from-gated", "--scheme", "FP8_DYNAMIC") == 0
    assert run_cli("acme/secret", "alice/published", "--scheme", "FP8_DYNAMIC", "--public") == 0
    assert run_cli(SOURCE, "alice/from-public", "--scheme", "FP8_DYNAMIC") == 0
    assert run_cli(SOURCE, "alice/asked-private", "--scheme", "FP8_DYNAMIC", "--private") == 0
    assert _is_private(hub, "alice/from-secret") and _is_private(hub, "alice/from-gated")
    assert not _is_private(hub, "alice/published") and not _is_private(hub, "alice/from-public")
    assert _is_private(hub, "alice/asked-private")
    with pytest.raises(SystemExit):  # one or the other
        cli.main([SOURCE, "alice/x", "--scheme", "FP8_DYNAMIC", "--private", "--public"])

    # an existing public target of a private source: said loudly, not silently
    hub.create_repo("alice/open", owner_token=ALICE)
    caplog.clear()
    assert cli.main(["acme/secret", "alice/open", "--scheme", "FP8_DYNAMIC", "--dry-run"]) == 0
    assert "alice/open exists and is public, and the source is private or gated" in caplog.text


def test_uploaded_operation_matches_huggingface_hub():
    """hub_sink.uploaded_operation, the one use of huggingface_hub's private fields, still does
    what a resumed commit needs on the installed huggingface_hub (1.x and 2.x are supported): the
    operation is neither uploaded again nor asked about, and is committed as a pointer to its
    LFS/Xet content."""
    import dataclasses

    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub._commit_api import _prepare_commit_payload
    from huggingface_hub.lfs import UploadInfo

    from streamer.io.hub_sink import uploaded_operation

    fields = {f.name for f in dataclasses.fields(CommitOperationAdd)}
    assert {"_upload_mode", "_is_uploaded", "upload_info"} <= fields, huggingface_hub.__version__
    info = UploadInfo.from_bytes(b"shard content")
    op = uploaded_operation("model-00001-of-00002.safetensors", info)
    assert op._upload_mode == "lfs" and op._is_uploaded is True and op.upload_info is info
    # Nothing to upload: a Hub that is not there is never called (it would raise).
    HfApi(endpoint="http://127.0.0.1:9", token="x").preupload_lfs_files("alice/x", [op])
    payload = list(_prepare_commit_payload([op], files_to_copy={}, commit_message="m"))
    lfs = [p["value"] for p in payload if p["key"] == "lfsFile"]
    assert lfs == [{"path": op.path_in_repo, "algo": "sha256", "oid": info.sha256.hex(), "size": info.size}]


def test_a_token_with_a_line_end_works_and_a_broken_one_is_refused_without_echoing_it(hub, tmp_path, capsys, monkeypatch):
    """A token copied with its line end (a Windows file's \\r\\n) is the token; one with a space or
    a control character inside is refused before any request, and never printed (an HTTP
    library's error would quote the whole Authorization header)."""
    monkeypatch.delenv("HF_TOKEN")
    assert run_cli(SOURCE, "acme/crlf", "--scheme", "FP8_DYNAMIC", "--token", ALICE + "\r\n") == 0
    assert len(_streamer_commits(hub, "acme/crlf")) == 1

    hub.clear_log()
    broken = ALICE[:6] + "\r" + ALICE[6:]
    capsys.readouterr()
    assert run_cli(SOURCE, "acme/broken", "--scheme", "FP8_DYNAMIC", "--token", broken) == 2
    err = capsys.readouterr().err
    assert "the Hugging Face token holds spaces, control or non-ASCII characters" in err and "--token" in err
    assert ALICE[6:] not in err and not hub.request_log and not hub.repo_exists("acme/broken")


def test_a_worker_count_below_one_is_refused_before_anything_is_created(hub, capsys):
    from streamer.engine.convert import convert
    from streamer.errors import StreamerError

    with pytest.raises(SystemExit) as e:
        run_cli(SOURCE, "acme/w0", "--scheme", "FP8_DYNAMIC", "--workers", "0")
    assert e.value.code == 2 and "--workers: 0: give at least 1" in capsys.readouterr().err
    with pytest.raises(StreamerError, match="workers must be a whole number of at least 1"):
        convert(SOURCE, "acme/w0", scheme="FP8_DYNAMIC", device="cpu", workers=0)
    assert not hub.repo_exists("acme/w0")


def test_a_refused_input_leaves_no_empty_repo_or_branch(hub, llama_ckpt, tmp_path, capsys, monkeypatch, caplog):
    """A NaN weight is found while converting, after the target was created: with no shard
    delivered yet, a rerun has nothing to reuse, so the repo (or branch) this run created goes
    with it. Once shards are up it stays for the rerun the refusal suggests (--nonfinite
    passthrough resumes from them), and says so; a repo the run did not create stays always."""
    from streamer.io.hub_sink import HubSink

    src = tmp_path / "nan-src"
    shutil.copytree(llama_ckpt, src)
    name = "model.layers.1.mlp.down_proj.weight"
    set_element(src, name, 5, BF16_NAN)
    hub.seed_repo("acme/nan-llama", src)

    hub.set_throttle(up_bytes_per_s=5_000)  # no shard is up before the NaN is found
    try:
        assert run_cli("acme/nan-llama", "alice/nan-fp8", "--scheme", "FP8_DYNAMIC") == 2
        assert "1 NaN" in capsys.readouterr().err
        assert not hub.repo_exists("alice/nan-fp8")

        hub.create_repo("alice/kept")
        before = hub.commits("alice/kept")
        assert run_cli("acme/nan-llama", "alice/kept", "--scheme", "FP8_DYNAMIC", "--revision", "fp8") == 2
        assert hub.repo_exists("alice/kept") and "fp8" not in hub.refs("alice/kept")["heads"]
        assert hub.commits("alice/kept") == before

        # the same refusal after a shard was delivered: the repo stays, and the log says why
        with monkeypatch.context() as m:
            m.setattr(HubSink, "delivered", lambda self: 1)
            assert run_cli("acme/nan-llama", "alice/nan-later", "--scheme", "FP8_DYNAMIC") == 2
        assert hub.repo_exists("alice/nan-later")
        assert "was created for this run and stays" in caplog.text and "reuses its" in caplog.text

        # someone commits to another branch of the new repo meanwhile: the repo is theirs too now
        with monkeypatch.context() as m:
            begin = HubSink.begin

            def begin_then_someone_commits(self):
                begin(self)
                api = huggingface_hub.HfApi(endpoint=hub.url, token=ALICE)
                api.create_branch(self.repo_id, branch="theirs")
                api.upload_file(path_or_fileobj=b"mine", path_in_repo="notes.txt", repo_id=self.repo_id, revision="theirs")

            m.setattr(HubSink, "begin", begin_then_someone_commits)
            assert run_cli("acme/nan-llama", "alice/nan-shared@ours", "--scheme", "FP8_DYNAMIC") == 2
        assert "notes.txt" in hub.files("alice/nan-shared", revision="theirs")
        assert "ours" not in hub.refs("alice/nan-shared")["heads"]

        # a fan-out into two branches of one new repo, both refused: whichever target lets go
        # first finds the other's branch beside its own; the repo still goes once both have
        caplog.clear()
        assert run_cli("acme/nan-llama", "alice/nan-fan@a", "--scheme", "FP8_DYNAMIC", "--to", "alice/nan-fan@b", "INT8") == 2
        assert not hub.repo_exists("alice/nan-fan")
        assert "written to since" not in caplog.text
    finally:
        hub.set_throttle(None, None)

    # the suggested ways past it publish into the same names
    assert run_cli("acme/nan-llama", "alice/nan-fp8", "--scheme", "FP8_DYNAMIC", "--ignore", name[: -len(".weight")]) == 0
    assert "model.safetensors.index.json" in hub.files("alice/nan-fp8")
    assert run_cli("acme/nan-llama", "alice/nan-later", "--scheme", "FP8_DYNAMIC", "--nonfinite", "passthrough") == 0


@pytest.mark.parametrize("keep", [False, True])
def test_a_cancel_ends_the_run_for_good_unless_asked_to_keep_it(hub, monkeypatch, caplog, keep):
    """A user's cancel drops the repo this run created and its resume record; a caller that is
    only stopping for now (a mirroring listener shutting down: keep_on_cancel) keeps both, and
    the rerun resumes from the shard uploaded before the cancel."""
    import logging
    import threading

    from streamer.engine.convert import convert
    from streamer.errors import Cancelled
    from streamer.io.upload_journal import UploadJournal

    cancel = threading.Event()
    add = UploadJournal.add

    def add_then_cancel(self, *args, **kwargs):  # the first shard is up and recorded
        add(self, *args, **kwargs)
        cancel.set()

    monkeypatch.setattr(UploadJournal, "add", add_then_cancel)
    with pytest.raises(Cancelled):
        convert(SOURCE, "alice/stopped", scheme="FP8_DYNAMIC", device="cpu", cancel=cancel, keep_on_cancel=keep)
    monkeypatch.setattr(UploadJournal, "add", add)
    records = list((Path(os.environ["HF_HOME"]) / "streamer" / "uploads").glob("*.json"))
    assert hub.repo_exists("alice/stopped") is keep and bool(records) is keep
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="streamer"):
        convert(SOURCE, "alice/stopped", scheme="FP8_DYNAMIC", device="cpu")
    assert ("shard(s) already on the Hub are not converted again" in caplog.text) is keep
    assert len(_streamer_commits(hub, "alice/stopped")) == 1


def test_a_refused_fan_out_target_leaves_a_new_repo_to_the_target_still_writing_there(hub, llama_ckpt, tmp_path, monkeypatch):
    """A fan-out into main and a branch of one new repo: the branch target creates the repo and
    is refused (a NaN its ignore list keeps; nothing of it uploaded yet) while the main target
    is still converting. The repo must not go under the main target: it publishes, and only
    the refused target's branch is removed once every target is done."""
    from streamer.engine.convert import convert_many
    from streamer.io.hub_sink import HubSink

    src = tmp_path / "nan-src"
    shutil.copytree(llama_ckpt, src)
    module = "model.layers.1.mlp.down_proj"
    set_element(src, f"{module}.weight", 5, BF16_NAN)
    hub.seed_repo("acme/nan-mixed", src)
    begin, delivered = HubSink.begin, HubSink.delivered

    def main_begins_last(self):  # the branch target creates the repo
        if self.revision == "main":
            time.sleep(1.0)
        begin(self)

    monkeypatch.setattr(HubSink, "begin", main_begins_last)
    monkeypatch.setattr(HubSink, "delivered", lambda self: 0 if self.revision == "refused" else delivered(self))
    result = convert_many("acme/nan-mixed", [
        ("alice/mixed@refused", "FP8_DYNAMIC"),
        {"dst": "alice/mixed", "scheme": "FP8_DYNAMIC", "ignore": (module,)},
    ], device="cpu")  # fmt: skip
    refused, published = result.targets
    assert "1 NaN" in str(refused.error) and published.ok, published.error
    assert hub.repo_exists("alice/mixed") and len(_streamer_commits(hub, "alice/mixed")) == 1
    assert "refused" not in hub.refs("alice/mixed")["heads"]


def test_a_refused_run_leaves_a_new_repo_to_another_run_of_this_process_writing_there(hub, llama_ckpt, tmp_path, monkeypatch):
    """Two conversions of one process (a mirror's parallel jobs, two users of a Space) into one
    new repo: the one that created it is refused while the other is still uploading to main.
    The repo stays for the other, which publishes; only the refused run's branch goes."""
    import threading

    from streamer.engine.convert import convert
    from streamer.errors import InputError
    from streamer.io.hub_sink import HubSink

    src = tmp_path / "nan-src"
    shutil.copytree(llama_ckpt, src)
    module = "model.layers.1.mlp.down_proj"
    set_element(src, f"{module}.weight", 5, BF16_NAN)
    hub.seed_repo("acme/nan-par", src)
    check, begin, delivered, commit = HubSink.check, HubSink.begin, HubSink.delivered, HubSink.commit
    main_checked, refused_begun, refused_done = threading.Event(), threading.Event(), threading.Event()

    def checked(self):  # both runs find the repo missing before either creates it
        check(self)
        if self.revision == "main":
            main_checked.set()

    def main_begins_last(self):  # the refused run creates the repo
        if self.revision == "main":
            refused_begun.wait(60)
            begin(self)
        else:
            main_checked.wait(60)
            begin(self)
            refused_begun.set()

    def main_commits_after_the_refusal(self, *args, **kwargs):
        refused_done.wait(60)
        return commit(self, *args, **kwargs)

    monkeypatch.setattr(HubSink, "check", checked)
    monkeypatch.setattr(HubSink, "begin", main_begins_last)
    monkeypatch.setattr(HubSink, "commit", main_commits_after_the_refusal)
    monkeypatch.setattr(HubSink, "delivered", lambda self: 0 if self.revision == "refused" else delivered(self))
    outcome: dict = {}

    def publish_main():
        outcome["url"] = convert("acme/nan-par", "alice/par", scheme="FP8_DYNAMIC", ignore=[module], device="cpu").url

    other = threading.Thread(target=publish_main)
    other.start()
    try:
        with pytest.raises(InputError, match="1 NaN"):
            convert("acme/nan-par", "alice/par@refused", scheme="FP8_DYNAMIC", device="cpu")
    finally:
        for event in (main_checked, refused_begun, refused_done):  # nobody is left waiting
            event.set()
        other.join(120)
    assert "/commit/" in outcome.get("url", ""), outcome
    assert hub.repo_exists("alice/par") and len(_streamer_commits(hub, "alice/par")) == 1
    assert "refused" not in hub.refs("alice/par")["heads"]


def test_a_path_into_a_local_folder_read_as_a_repo_says_so(hub, tmp_path, monkeypatch, capsys):
    """`tiny/q` beside a folder `tiny` reads as the Hub repo tiny/q (the README's rule): when the
    Hub has no such repo, the error says the path was not a folder here, so a mistyped path is
    not mistaken for a missing repo."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny").mkdir()
    assert run_cli("tiny/q", "out", "--scheme", "FP8_DYNAMIC") == 2
    err = capsys.readouterr().err
    assert "tiny/q is not a folder here (tiny is), so it was read as a Hub repo id" in err
    assert "not found" in err and not (tmp_path / "out").exists()
    assert run_cli("nosuchdir/q", "out", "--scheme", "FP8_DYNAMIC") == 2
    assert "not a folder here" not in capsys.readouterr().err


def test_a_rerun_from_a_local_folder_converts_again(hub, llama_ckpt, capsys):
    """Only a source pinned to a commit can be found already converted: a folder may have
    changed under the same file names, so the same command converts it again."""
    assert run_cli(str(llama_ckpt), "alice/from-folder", "--scheme", "FP8_DYNAMIC") == 0
    capsys.readouterr()
    assert run_cli(str(llama_ckpt), "alice/from-folder", "--scheme", "FP8_DYNAMIC", "--json") == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["up_to_date"] is False and summary["bytes_read"] > 0
    # from the Hub, the same rerun is found done, and a changed setting is converted
    assert run_cli(SOURCE, "alice/from-hub", "--scheme", "FP8_DYNAMIC") == 0
    capsys.readouterr()
    assert run_cli(SOURCE, "alice/from-hub", "--scheme", "FP8_DYNAMIC", "--json") == 0
    assert json.loads(capsys.readouterr().out)["up_to_date"] is True
    assert run_cli(SOURCE, "alice/from-hub", "--scheme", "FP8_DYNAMIC", "--ignore", "model.layers.0.mlp.down_proj", "--json") == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["up_to_date"] is False and summary["bytes_read"] > 0
    assert len(_streamer_commits(hub, "alice/from-hub")) == 2


def test_a_custom_scheme_of_the_same_name_but_other_settings_is_converted_again(hub, tmp_path, capsys):
    """A scheme file is recorded by its name; two files of one name that quantize the weights
    alike but differ elsewhere (dynamic input activations: the same shards, another
    quantization_config) must not count as the same conversion."""
    import yaml

    weights = {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True}
    acts = {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True, "symmetric": True}
    first, second = tmp_path / "a" / "myscheme.yaml", tmp_path / "b" / "myscheme.yaml"
    for path, group in ((first, {"weights": weights}), (second, {"weights": weights, "input_activations": acts})):
        path.parent.mkdir()
        path.write_text(yaml.safe_dump({"config_groups": {"g": {"targets": ["Linear"], **group}}}))
    assert run_cli(SOURCE, "alice/custom", "--scheme-file", str(first)) == 0
    capsys.readouterr()
    assert run_cli(SOURCE, "alice/custom", "--scheme-file", str(first), "--json") == 0
    assert json.loads(capsys.readouterr().out)["up_to_date"] is True
    assert run_cli(SOURCE, "alice/custom", "--scheme-file", str(second), "--json") == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["up_to_date"] is False
    qc = json.loads(hub.read_file("alice/custom", "config.json"))["quantization_config"]
    assert qc["config_groups"]["g"]["input_activations"]["dynamic"] is True


def test_a_rerun_asking_for_more_than_the_target_has_converts_again(hub, llama_ckpt, tmp_path, capsys):
    """Settings that leave the shards alone still decide whether a target is up to date: an
    output made with --no-quality lacks the report a plain rerun would write, so that rerun
    converts again (the reverse is up to date: the report is extra); an output whose NaN weight
    was quantized as it was (--nonfinite passthrough, named on its card and in its reproduce
    command) is no output of a rerun that refuses such weights, which stops as a fresh run would."""
    from streamer.io.provenance import read_provenance

    assert run_cli(SOURCE, "alice/noq", "--scheme", "FP8_DYNAMIC", "--no-quality") == 0
    block = read_provenance(hub.read_file("alice/noq", "README.md").decode())
    assert block["quality"] is False and "nonfinite" not in block
    capsys.readouterr()
    assert run_cli(SOURCE, "alice/noq", "--scheme", "FP8_DYNAMIC", "--no-quality", "--json") == 0
    assert json.loads(capsys.readouterr().out)["up_to_date"] is True
    assert run_cli(SOURCE, "alice/noq", "--scheme", "FP8_DYNAMIC", "--json") == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["up_to_date"] is False and len(summary["quality"]["tensors"]) > 0
    card = hub.read_file("alice/noq", "README.md").decode()
    assert "quality" not in read_provenance(card) and "## Quantization error" in card
    assert f"[{SOURCE}]({hub.url}/{SOURCE})" in card  # linked on the Hub it was read from
    assert run_cli(SOURCE, "alice/noq", "--scheme", "FP8_DYNAMIC", "--no-quality", "--json") == 0
    assert json.loads(capsys.readouterr().out)["up_to_date"] is True

    src = tmp_path / "nan-src"
    shutil.copytree(llama_ckpt, src)
    name = "model.layers.0.self_attn.o_proj.weight"
    set_element(src, name, 3, BF16_NAN)
    hub.seed_repo("acme/nan-once", src)
    assert run_cli("acme/nan-once", "alice/nan-as-is", "--scheme", "FP8_DYNAMIC", "--nonfinite", "passthrough") == 0
    card = hub.read_file("alice/nan-as-is", "README.md").decode()
    assert read_provenance(card)["nonfinite"] == [name]
    assert f"`{name}`" in card and "--scheme FP8_DYNAMIC --nonfinite passthrough" in card
    capsys.readouterr()
    commits = len(hub.commits("alice/nan-as-is"))
    assert run_cli("acme/nan-once", "alice/nan-as-is", "--scheme", "FP8_DYNAMIC", "--nonfinite", "passthrough", "--json") == 0
    assert json.loads(capsys.readouterr().out)["up_to_date"] is True
    assert run_cli("acme/nan-once", "alice/nan-as-is", "--scheme", "FP8_DYNAMIC") == 2
    assert "1 NaN" in capsys.readouterr().err
    assert len(hub.commits("alice/nan-as-is")) == commits


def test_a_resumed_shard_keeps_its_nan_weights_named(hub, llama_ckpt, tmp_path, monkeypatch, capsys):
    """The weights an earlier run quantized with their NaN (--nonfinite passthrough) are kept in
    its resume record: a rerun that refuses such weights stops rather than publish them from the
    shards already up, and one that allows them names them on the card as a fresh run would."""
    from streamer.io.hub_sink import HubSink
    from streamer.io.provenance import read_provenance

    src = tmp_path / "nan-src"
    shutil.copytree(llama_ckpt, src)
    name = "model.layers.0.mlp.gate_proj.weight"
    set_element(src, name, 1, BF16_NAN)
    hub.seed_repo("acme/nan-resume", src)
    with monkeypatch.context() as m:  # every shard is uploaded, then the commit fails
        m.setattr(HubSink, "commit", lambda self, *a, **k: (_ for _ in ()).throw(OSError("connection reset")))
        assert run_cli("acme/nan-resume", "alice/nan-resume", "--scheme", "W8A16", "--nonfinite", "passthrough") != 0
    capsys.readouterr()
    assert run_cli("acme/nan-resume", "alice/nan-resume", "--scheme", "W8A16") == 2
    err = capsys.readouterr().err
    assert f"tensor {name} holds NaN or Inf values: an earlier run quantized it as it was" in err
    assert "--nonfinite passthrough" in err and _streamer_commits(hub, "alice/nan-resume") == []
    assert run_cli("acme/nan-resume", "alice/nan-resume", "--scheme", "W8A16", "--nonfinite", "passthrough", "--json") == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["resumed_shards"] and summary["nonfinite"] == [name]
    assert read_provenance(hub.read_file("alice/nan-resume", "README.md").decode())["nonfinite"] == [name]


def test_a_target_edited_since_is_converted_again(hub, capsys):
    """The up-to-date check looks at every file, not only at the card: a copied file edited on
    the Hub to the same length, or a file added beside the conversion, makes the rerun convert
    and commit again, which puts the source's bytes back and takes the stray file away."""
    assert run_cli(SOURCE, "alice/edited", "--scheme", "FP8_DYNAMIC") == 0
    api = huggingface_hub.HfApi(endpoint=hub.url, token=ALICE)
    original = hub.read_file("alice/edited", "generation_config.json")
    edited = original.replace(b"1", b"2", 1)
    assert edited != original and len(edited) == len(original)
    api.upload_file(path_or_fileobj=edited, path_in_repo="generation_config.json", repo_id="alice/edited")
    capsys.readouterr()
    assert run_cli(SOURCE, "alice/edited", "--scheme", "FP8_DYNAMIC", "--json") == 0
    assert json.loads(capsys.readouterr().out)["up_to_date"] is False
    assert hub.read_file("alice/edited", "generation_config.json") == original

    api.upload_file(path_or_fileobj=b"mine", path_in_repo="notes.txt", repo_id="alice/edited")
    assert run_cli(SOURCE, "alice/edited", "--scheme", "FP8_DYNAMIC", "--json") == 0
    assert json.loads(capsys.readouterr().out)["up_to_date"] is False
    assert "notes.txt" not in hub.files("alice/edited")
    assert run_cli(SOURCE, "alice/edited", "--scheme", "FP8_DYNAMIC", "--json") == 0
    assert json.loads(capsys.readouterr().out)["up_to_date"] is True


def test_a_url_or_a_mistyped_destination_path_is_explained(hub, tmp_path, monkeypatch, capsys):
    """`hf://org/name` is neither a folder nor a repo id: refused, naming the repo id to write,
    and no folder `hf:` is made. A destination `tiny/q` beside a folder `tiny` reads as a Hub
    repo (the README's rule); the refusal says so."""
    monkeypatch.chdir(tmp_path)
    assert run_cli("hf://acme/tiny-llama", "out", "--scheme", "FP8_DYNAMIC") == 2
    err = capsys.readouterr().err
    assert "source is a URL: name the Hub repo as acme/tiny-llama (or hub://acme/tiny-llama)" in err
    assert run_cli(SOURCE, "https://huggingface.co/alice/x/tree/dev", "--scheme", "FP8_DYNAMIC") == 2
    assert "destination is a URL: name the Hub repo as alice/x@dev" in capsys.readouterr().err
    assert run_cli("file:///models/llama", "out", "--scheme", "FP8_DYNAMIC") == 2
    assert "source is a URL (file://): give the folder's path" in capsys.readouterr().err
    from streamer.compat import model_free_ptq
    from streamer.errors import StreamerError

    with pytest.raises(StreamerError, match="save_directory is a URL: name the Hub repo as alice/y"):
        model_free_ptq(SOURCE, "hf://alice/y", scheme="FP8_DYNAMIC")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(("hf:", "https:"))], "a folder was made for a URL"
    (tmp_path / "tiny").mkdir()
    assert run_cli(SOURCE, "tiny/q", "--scheme", "FP8_DYNAMIC") == 2
    err = capsys.readouterr().err
    assert "tiny/q is not a folder here (tiny is), so it was read as a Hub repo id: no write access to 'tiny'" in err
    assert run_cli(SOURCE, "./tiny/q", "--scheme", "FP8_DYNAMIC") == 0  # the path, written as one
    assert (tmp_path / "tiny" / "q" / "config.json").exists()


def test_a_target_branch_given_twice_or_refused_by_the_hub_leaves_nothing(hub, monkeypatch, capsys):
    """`dst@a` with --revision b: which branch was meant? Refused before anything is written, for
    one target as for a fan-out (whose duplicate check must see the branch the sink would use).
    A branch name the Hub refuses, into a new repo: the repo created for it goes too."""
    assert run_cli(SOURCE, "alice/twice@a", "--scheme", "FP8_DYNAMIC", "--revision", "b") == 2
    assert "names the branch 'a', and a target revision 'b' is given too" in capsys.readouterr().err
    assert run_cli(SOURCE, "alice/fan@a", "--scheme", "FP8_DYNAMIC", "--to", "alice/fan@b", "INT8", "--revision", "c") == 2
    assert "names the branch 'a', and a target revision 'c' is given too" in capsys.readouterr().err
    assert not hub.repo_exists("alice/twice") and not hub.repo_exists("alice/fan")
    assert run_cli(SOURCE, "alice/same@b", "--scheme", "FP8_DYNAMIC", "--revision", "b") == 0
    assert "b" in hub.refs("alice/same")["heads"]

    assert run_cli(SOURCE, "alice/badrev", "--scheme", "FP8_DYNAMIC", "--revision", "foo..bar") == 2
    assert "'foo..bar' cannot name a branch" in capsys.readouterr().err
    assert not hub.repo_exists("alice/badrev")
    # a name only the Hub refuses (a pull request's ref that does not exist): begin() has made
    # the repo by then, and takes it away again
    assert run_cli(SOURCE, "alice/badrev@refs/pr/1", "--scheme", "FP8_DYNAMIC") != 0
    assert "refs/pr/1" in capsys.readouterr().err
    assert not hub.repo_exists("alice/badrev")

    # repo ids the Hub would not take: streamer's sentence, not huggingface_hub's exception
    for dst in ("hub://alice/x/y", "hub://alice/x--y"):
        assert run_cli(SOURCE, dst, "--scheme", "FP8_DYNAMIC") == 2
        assert f"destination {dst}: " in capsys.readouterr().err
    # an HF_TOKEN that cannot travel in a header is said so, without repeating it
    monkeypatch.setenv("HF_TOKEN", "hf_s\u00e9cret_value")
    assert run_cli(SOURCE, "alice/tok", "--scheme", "FP8_DYNAMIC") == 2
    err = capsys.readouterr().err
    assert "the HF_TOKEN environment variable holds spaces, control or non-ASCII characters" in err
    assert "cret_value" not in err and "Traceback" not in err


@pytest.mark.parametrize(
    "url,repo",
    [
        ("hf://Org/X", "Org/X"),
        ("hf:///org/x", "org/x"),
        ("https://huggingface.co/api/models/org/x", "org/x"),
        ("https://huggingface.co/models/org/x", "org/x"),
        ("https://huggingface.co/org/x/tree/refs%2Fpr%2F1", "org/x@refs/pr/1"),
        ("https://hf.co/org/x/blob/main/config.json", "org/x@main"),
        ("https://example.com/org/x", None),
    ],
)
def test_a_url_names_the_repo_id_it_means(url, repo):
    from streamer.errors import StreamerError
    from streamer.io.locations import check_not_url

    with pytest.raises(StreamerError) as e:
        check_not_url(url, "source")
    if repo is None:  # not the Hub: no repo id is made up from it
        assert "streamer reads Hub repos and local folders" in e.value.message
    else:
        assert f"name the Hub repo as {repo} " in e.value.message


def test_a_source_keeping_small_files_in_lfs_is_found_up_to_date(hub, llama_ckpt, tmp_path, capsys):
    """Many repos track tokenizer.json in LFS; the copy on the target is a plain file. The rerun
    compares the copied files by their bytes, so it is still found up to date."""
    src = tmp_path / "lfs-src"
    shutil.copytree(llama_ckpt, src)
    (src / ".gitattributes").write_text("*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
                                        "tokenizer.json filter=lfs diff=lfs merge=lfs -text\n")
    hub.seed_repo("acme/lfs-tok", src)
    info = huggingface_hub.HfApi(endpoint=hub.url, token=ALICE).model_info("acme/lfs-tok", files_metadata=True)
    assert next(s for s in info.siblings if s.rfilename == "tokenizer.json").lfs  # in LFS at the source
    assert run_cli("acme/lfs-tok", "alice/lfs-tok-fp8", "--scheme", "FP8_DYNAMIC") == 0
    capsys.readouterr()
    assert run_cli("acme/lfs-tok", "alice/lfs-tok-fp8", "--scheme", "FP8_DYNAMIC", "--json") == 0
    assert json.loads(capsys.readouterr().out)["up_to_date"] is True

"""streamer.localhub against the real, unmodified huggingface_hub client (and raw HTTP)."""

from __future__ import annotations

import hashlib
import http.client
import json
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    constants,
    get_hf_file_metadata,
    hf_hub_download,
    hf_hub_url,
    snapshot_download,
)
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from streamer.localhub import LocalHub

MiB = 1024 * 1024
ALICE, BOB = "hf_alice_token", "hf_bob_token"

# huggingface_hub itself passes file objects as `data=` to httpx for LFS PUTs.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")


@pytest.fixture(autouse=True)
def hf_env(tmp_path, monkeypatch):
    """Isolate the client: no real token or cache, no Xet (uploads take the LFS path), online."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    # huggingface_hub reads these at import time, so the env alone is not enough.
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf_home" / "token"))
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_PROGRESS_BARS", True)


@pytest.fixture
def hub(tmp_path):
    with LocalHub(tmp_path / "hub") as hub:
        hub.add_user("alice", ALICE, orgs=["acme"])
        hub.add_user("bob", BOB)
        yield hub


@pytest.fixture
def api(hub):
    return HfApi(endpoint=hub.url, token=ALICE)


def make_folder(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def random_bytes(n: int, seed: int = 0) -> bytes:
    # Deterministic and fast: repeat a hash chain (content only needs to be non-trivial).
    block = b"".join(hashlib.sha256(f"{seed}:{i}".encode()).digest() for i in range(4096))
    return (block * (n // len(block) + 1))[:n]


def raw(hub: LocalHub, method: str, path: str, headers: dict | None = None, body: bytes | None = None):
    """One request on a fresh connection; returns (status, headers, body)."""
    parts = urlsplit(hub.url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


@pytest.fixture
def seeded(hub, tmp_path):
    files = {
        "README.md": b"---\nlicense: apache-2.0\ntags: [test]\n---\n# tiny\n",
        "config.json": b'{"model_type": "llama", "architectures": ["LlamaForCausalLM"]}',
        "model.safetensors": random_bytes(3 * MiB + 17),
        "sub/dir/notes.txt": b"hello\n",
    }
    sha = hub.seed_repo("acme/tiny", make_folder(tmp_path / "seed", files), message="seed tiny")
    return sha, files


# --------------------------------------------------------------------------- users & repos
def test_whoami_and_bad_token(hub, api):
    me = api.whoami()
    assert me["name"] == "alice"
    assert [o["name"] for o in me["orgs"]] == ["acme"]
    assert me["auth"]["accessToken"]["role"] == "write"

    with pytest.raises(HfHubHTTPError) as exc:
        HfApi(endpoint=hub.url, token="hf_not_a_token").whoami()
    assert exc.value.response.status_code == 401

    # A bad token is not mistaken for a missing repo.
    hub.create_repo("acme/public")
    with pytest.raises(HfHubHTTPError) as exc:
        HfApi(endpoint=hub.url, token="hf_not_a_token").model_info("acme/public")
    assert exc.value.response.status_code == 401
    assert not isinstance(exc.value, RepositoryNotFoundError)


def test_create_repo(hub, api):
    url = api.create_repo("acme/model-a")
    assert url.repo_id == "acme/model-a"
    assert api.create_repo("acme/model-a", exist_ok=True).repo_id == "acme/model-a"
    with pytest.raises(HfHubHTTPError) as exc:
        api.create_repo("acme/model-a")
    assert exc.value.response.status_code == 409

    # No namespace: the caller's own.
    assert api.create_repo("mine").repo_id == "alice/mine"
    # Someone else's namespace: forbidden.
    with pytest.raises(HfHubHTTPError) as exc:
        HfApi(endpoint=hub.url, token=BOB).create_repo("acme/not-yours")
    assert exc.value.response.status_code == 403

    # Like the Hub, a new repo starts with one commit holding .gitattributes.
    assert [c.message for c in hub.commits("acme/model-a")] == ["initial commit"]
    assert list(hub.files("acme/model-a")) == [".gitattributes"]

    api.update_repo_settings("acme/model-a", private=True)
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hub.url, token=BOB).model_info("acme/model-a")
    api.auth_check("acme/model-a")
    api.delete_repo("acme/model-a")
    assert not hub.repo_exists("acme/model-a")


def test_dataset_repo(hub, api, tmp_path):
    api.create_repo("acme/data", repo_type="dataset")
    api.upload_file(path_or_fileobj=b"a,b\n1,2\n", path_in_repo="train.csv", repo_id="acme/data", repo_type="dataset")
    assert [s.rfilename for s in api.dataset_info("acme/data").siblings] == [".gitattributes", "train.csv"]
    path = hf_hub_download("acme/data", "train.csv", repo_type="dataset", endpoint=hub.url, token=False,
                           cache_dir=tmp_path / "c")
    assert Path(path).read_bytes() == b"a,b\n1,2\n"
    assert hub.files("acme/data", repo_type="dataset")["train.csv"] == 8


# --------------------------------------------------------------------------- uploads
def _puts(hub) -> list:
    return [r for r in hub.request_log if r.method == "PUT"]


def test_upload_folder_basic_lfs_then_dedup(hub, api, tmp_path):
    hub.multipart_chunk_size = 64 * MiB  # a 12 MB object goes in one PUT
    big = random_bytes(12 * MiB, seed=1)
    folder = make_folder(tmp_path / "up", {"weights.bin": big, "config.json": b"{}", "nested/a.txt": b"a"})
    api.create_repo("acme/up")
    hub.clear_log()
    first = api.upload_folder(repo_id="acme/up", folder_path=folder, commit_message="upload")

    puts = _puts(hub)
    assert len(puts) == 1 and puts[0].bytes_in == len(big)
    assert hub.read_file("acme/up", "weights.bin") == big
    assert hub.files("acme/up") == {".gitattributes": hub.files("acme/up")[".gitattributes"],
                                    "config.json": 2, "nested/a.txt": 1, "weights.bin": len(big)}

    # Same content again under another name: the batch says "already there", nothing is re-sent.
    hub.clear_log()
    second = api.create_commit(
        "acme/up", [CommitOperationAdd("copy.bin", big)], commit_message="copy", parent_commit=first.oid
    )
    assert _puts(hub) == []
    assert sum(r.bytes_in for r in hub.request_log) < 10_000
    batch = [r for r in hub.request_log if r.path.endswith("/info/lfs/objects/batch")]
    assert len(batch) == 1

    history = hub.commits("acme/up")
    assert [c.message for c in history] == ["copy", "upload", "initial commit"]
    assert history[0].sha == second.oid and history[0].added == ("copy.bin",)
    assert set(history[1].files_changed) == {"config.json", "nested/a.txt", "weights.bin"}
    assert len(api.list_repo_commits("acme/up")) == 3


def test_multipart_upload(hub, api):
    hub.multipart_chunk_size = 8 * MiB
    data = random_bytes(20 * MiB + 5, seed=2)
    api.create_repo("acme/multi")
    hub.clear_log()
    api.upload_file(path_or_fileobj=data, path_in_repo="model.safetensors", repo_id="acme/multi")

    parts = [r for r in _puts(hub)]
    assert len(parts) == 3  # 8 + 8 + 4 MiB
    assert sum(r.bytes_in for r in parts) == len(data)
    completions = [r for r in hub.request_log if r.method == "POST" and "/api/localhub/lfs/" in r.path]
    assert len(completions) == 1 and completions[0].status == 200
    assert hub.read_file("acme/multi", "model.safetensors") == data


def test_upload_rejects_wrong_content(hub, api):
    """A PUT whose bytes do not hash to the announced oid never reaches the blob store."""
    api.create_repo("acme/bad")
    data = b"x" * 1000
    oid = hashlib.sha256(b"something else").hexdigest()
    status, _, body = raw(
        hub, "POST", "/acme/bad.git/info/lfs/objects/batch",
        {"Authorization": f"Bearer {ALICE}", "Content-Type": "application/json"},
        json.dumps({"operation": "upload", "transfers": ["basic"], "objects": [{"oid": oid, "size": 1000}]}).encode(),
    )
    assert status == 200
    href = json.loads(body)["objects"][0]["actions"]["upload"]["href"]
    status, _, _ = raw(hub, "PUT", urlsplit(href).path, {}, data)
    assert status == 400
    assert not hub.storage.blobs.has(oid)

    # And a commit cannot point at a blob that was never uploaded.
    payload = b"\n".join(json.dumps(line).encode() for line in [
        {"key": "header", "value": {"summary": "dangling", "description": ""}},
        {"key": "lfsFile", "value": {"path": "w.bin", "algo": "sha256", "oid": oid, "size": 1000}},
    ])
    status, _, body = raw(hub, "POST", "/api/models/acme/bad/commit/main",
                          {"Authorization": f"Bearer {ALICE}", "Content-Type": "application/x-ndjson"}, payload)
    assert status == 400 and b"does not exist" in body
    assert len(hub.commits("acme/bad")) == 1


def test_pull_request_branches_and_parent_check(hub, api):
    api.create_repo("acme/pr")
    base = api.create_commit("acme/pr", [CommitOperationAdd("a.txt", b"v1")], commit_message="v1")

    pr = api.create_commit("acme/pr", [CommitOperationAdd("a.txt", b"v2")], commit_message="v2", create_pr=True)
    assert pr.pr_url.endswith("/discussions/1") and pr.pr_revision == "refs/pr/1"
    assert hub.read_file("acme/pr", "a.txt") == b"v1"  # main untouched
    assert hub.read_file("acme/pr", "a.txt", revision="refs/pr/1") == b"v2"
    assert [c.message for c in hub.commits("acme/pr", "refs/pr/1")][:2] == ["v2", "v1"]
    refs = api.list_repo_refs("acme/pr", include_pull_requests=True)
    assert [r.ref for r in refs.pull_requests] == ["refs/pr/1"]
    path = hf_hub_download("acme/pr", "a.txt", revision="refs/pr/1", endpoint=hub.url, token=ALICE,
                           cache_dir=hub.root.parent / "cache-pr")
    assert Path(path).read_bytes() == b"v2"

    # Bob may not write to acme but may open a pull request.
    bob = HfApi(endpoint=hub.url, token=BOB)
    with pytest.raises(HfHubHTTPError) as exc:
        bob.create_commit("acme/pr", [CommitOperationAdd("b.txt", b"b")], commit_message="nope")
    assert exc.value.response.status_code == 403
    assert bob.create_commit("acme/pr", [CommitOperationAdd("b.txt", b"b")], commit_message="pr",
                             create_pr=True).pr_revision == "refs/pr/2"

    # Stale parent: 412, nothing committed.
    api.create_commit("acme/pr", [CommitOperationAdd("a.txt", b"v3")], commit_message="v3")
    with pytest.raises(HfHubHTTPError) as exc:
        api.create_commit("acme/pr", [CommitOperationAdd("a.txt", b"v4")], commit_message="v4",
                          parent_commit=base.oid)
    assert exc.value.response.status_code == 412
    assert hub.read_file("acme/pr", "a.txt") == b"v3"

    # Branches.
    api.create_branch("acme/pr", branch="dev")
    api.create_commit("acme/pr", [CommitOperationDelete("a.txt")], commit_message="rm", revision="dev")
    assert "a.txt" not in hub.files("acme/pr", "dev") and "a.txt" in hub.files("acme/pr")
    with pytest.raises(RevisionNotFoundError):
        api.create_commit("acme/pr", [CommitOperationAdd("c.txt", b"c")], commit_message="x", revision="nope")
    api.delete_branch("acme/pr", branch="dev")
    assert "dev" not in hub.refs("acme/pr")["heads"]


# --------------------------------------------------------------------------- reading
def test_model_info_tree_paths_info(hub, api, seeded):
    sha, files = seeded
    info = api.model_info("acme/tiny", files_metadata=True)
    assert info.sha == sha
    sizes = {s.rfilename: s.size for s in info.siblings}
    assert sizes == {name: len(data) for name, data in files.items()}
    lfs = {s.rfilename: s.lfs for s in info.siblings}
    assert lfs["model.safetensors"].sha256 == hashlib.sha256(files["model.safetensors"]).hexdigest()
    assert lfs["config.json"] is None
    assert info.card_data.license == "apache-2.0"
    assert info.config["model_type"] == "llama"
    # As on the Hub, sizes need files_metadata=True.
    assert {s.size for s in api.model_info("acme/tiny").siblings} == {None}
    assert api.model_info("acme/tiny", revision=sha).sha == sha

    top = {(f.path, type(f).__name__) for f in api.list_repo_tree("acme/tiny")}
    assert ("sub", "RepoFolder") in top and ("sub/dir/notes.txt", "RepoFile") not in top
    everything = {f.path for f in api.list_repo_tree("acme/tiny", recursive=True)}
    assert everything == set(files) | {"sub", "sub/dir"}
    assert [f.path for f in api.list_repo_tree("acme/tiny", path_in_repo="sub/dir")] == ["sub/dir/notes.txt"]
    expanded = list(api.list_repo_tree("acme/tiny", expand=True))
    assert all(f.last_commit.oid == sha for f in expanded)

    infos = api.get_paths_info("acme/tiny", ["config.json", "sub", "missing.txt"])
    assert [(i.path, type(i).__name__) for i in infos] == [("config.json", "RepoFile"), ("sub", "RepoFolder")]
    assert infos[0].size == len(files["config.json"])
    assert [c.title for c in api.list_repo_commits("acme/tiny")] == ["seed tiny"]


def test_downloads_are_byte_identical(hub, seeded, tmp_path):
    sha, files = seeded
    path = hf_hub_download("acme/tiny", "model.safetensors", endpoint=hub.url, token=False, cache_dir=tmp_path / "c1")
    assert Path(path).read_bytes() == files["model.safetensors"]

    folder = snapshot_download("acme/tiny", endpoint=hub.url, token=False, cache_dir=tmp_path / "c2")
    for name, data in files.items():
        assert (Path(folder) / name).read_bytes() == data
    assert Path(folder).name == sha

    meta = get_hf_file_metadata(hf_hub_url("acme/tiny", "model.safetensors", endpoint=hub.url), token=False)
    assert meta.commit_hash == sha
    assert meta.etag == hashlib.sha256(files["model.safetensors"]).hexdigest()
    assert meta.size == len(files["model.safetensors"])
    small = get_hf_file_metadata(hf_hub_url("acme/tiny", "config.json", endpoint=hub.url), token=False)
    git_oid = hashlib.sha1(b"blob %d\0" % len(files["config.json"]) + files["config.json"]).hexdigest()
    assert small.etag == git_oid and small.size == len(files["config.json"])


def test_range_requests(hub, seeded):
    sha, files = seeded
    data = files["model.safetensors"]
    size = len(data)
    url = "/acme/tiny/resolve/main/model.safetensors"

    parts = urlsplit(hub.url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    # Several requests on one kept-alive connection, as pooled clients do.
    for header, (start, end) in [("bytes=0-7", (0, 7)), ("bytes=100-", (100, size - 1)),
                                 ("bytes=-10", (size - 10, size - 1)), (f"bytes=5-{size + 100}", (5, size - 1))]:
        conn.request("GET", url, headers={"Range": header})
        resp = conn.getresponse()
        body = resp.read()
        assert resp.status == 206
        assert resp.getheader("Content-Range") == f"bytes {start}-{end}/{size}"
        assert int(resp.getheader("Content-Length")) == end - start + 1
        assert body == data[start : end + 1]
        assert resp.getheader("X-Repo-Commit") == sha
        assert resp.getheader("Accept-Ranges") == "bytes"
    conn.close()

    status, headers, _ = raw(hub, "GET", url, {"Range": f"bytes={size}-"})
    assert status == 416 and headers["content-range"] == f"bytes */{size}"
    status, headers, body = raw(hub, "GET", url)
    assert status == 200 and body == data
    assert headers["etag"] == f'"{hashlib.sha256(data).hexdigest()}"'
    assert headers["x-linked-size"] == str(size)

    records = [r for r in hub.request_log if r.file == "model.safetensors"]
    assert records[0].range == (0, 7) and records[0].bytes_out == 8 and records[0].repo_id == "acme/tiny"

    status, headers, _ = raw(hub, "HEAD", "/acme/tiny/resolve/main/nope.bin")
    assert status == 404 and headers["x-error-code"] == "EntryNotFound"
    status, headers, _ = raw(hub, "GET", "/acme/tiny/resolve/v9/config.json")
    assert status == 404 and headers["x-error-code"] == "RevisionNotFound"
    status, _, body = raw(hub, "GET", f"/acme/tiny/resolve/{sha}/config.json")
    assert status == 200 and body == files["config.json"]


def test_private_and_gated(hub, tmp_path):
    folder = make_folder(tmp_path / "p", {"config.json": b"{}"})
    hub.seed_repo("acme/secret", folder, private=True)
    hub.seed_repo("acme/gated", folder, gated=True)
    anon, bob, alice = (HfApi(endpoint=hub.url, token=t) for t in (False, BOB, ALICE))

    for client in (anon, bob):
        with pytest.raises(RepositoryNotFoundError) as exc:
            client.model_info("acme/secret")
        assert not isinstance(exc.value, GatedRepoError)
        with pytest.raises(RepositoryNotFoundError):
            hf_hub_download("acme/secret", "config.json", endpoint=hub.url, token=client.token,
                            cache_dir=tmp_path / "c")
    assert alice.model_info("acme/secret").private is True
    status, headers, _ = raw(hub, "GET", "/acme/secret/resolve/main/config.json")
    assert status == 401 and headers["x-error-code"] == "RepoNotFound"

    # Gated: metadata is visible, contents need a grant.
    assert bob.model_info("acme/gated").gated == "manual"
    with pytest.raises(GatedRepoError):
        hf_hub_download("acme/gated", "config.json", endpoint=hub.url, token=BOB, cache_dir=tmp_path / "c")
    status, headers, _ = raw(hub, "GET", "/acme/gated/resolve/main/config.json", {"Authorization": f"Bearer {BOB}"})
    assert status == 403 and headers["x-error-code"] == "GatedRepo"
    hub.grant_gated("acme/gated", "bob")
    path = hf_hub_download("acme/gated", "config.json", endpoint=hub.url, token=BOB, cache_dir=tmp_path / "c")
    assert Path(path).read_bytes() == b"{}"


def test_lfs_redirect_mode(tmp_path):
    """Like the Hub: LFS files redirect to a signed URL on another host, fetched without a token."""
    data = random_bytes(2 * MiB, seed=5)
    with LocalHub(tmp_path / "hub", redirect_lfs=True) as hub:
        hub.add_user("alice", ALICE, orgs=["acme"])
        sha = hub.seed_repo("acme/r", make_folder(tmp_path / "r", {"w.safetensors": data, "c.json": b"{}"}),
                            private=True)
        auth = {"Authorization": f"Bearer {ALICE}"}
        status, headers, _ = raw(hub, "HEAD", "/acme/r/resolve/main/w.safetensors", auth)
        assert status == 302 and headers["x-repo-commit"] == sha and headers["x-linked-size"] == str(len(data))
        location = urlsplit(headers["location"])
        assert location.hostname == "localhost" and location.path.startswith("/cdn-lfs/")
        cdn_path = f"{location.path}?{location.query}"
        status, headers, body = raw(hub, "GET", cdn_path, {"Range": "bytes=10-19"})
        assert status == 206 and body == data[10:20] and "x-repo-commit" not in headers
        assert raw(hub, "GET", cdn_path.replace("sig=", "sig=0"))[0] == 403
        assert raw(hub, "GET", "/acme/r/resolve/main/c.json", auth)[0] == 200  # small files: no redirect

        hub.clear_log()
        path = hf_hub_download("acme/r", "w.safetensors", endpoint=hub.url, token=ALICE, cache_dir=tmp_path / "c")
        assert Path(path).read_bytes() == data
        cdn = [r for r in hub.request_log if r.path.startswith("/cdn-lfs/")]
        assert [(r.method, r.user, r.status) for r in cdn] == [("GET", None, 200)]


# --------------------------------------------------------------------------- faults & throttling
def test_fault_injection_is_deterministic(hub, seeded):
    _, files = seeded
    data = files["model.safetensors"]
    url = "/acme/tiny/resolve/main/model.safetensors"
    hub.set_faults(every=3, kinds=("drop",), only_paths="resolve")
    outcomes = []
    parts = urlsplit(hub.url)
    for _ in range(6):
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
        conn.request("GET", url)
        resp = conn.getresponse()
        try:
            outcomes.append("ok" if resp.read() == data else "bad")
        except http.client.IncompleteRead as exc:
            outcomes.append(f"drop@{len(exc.partial)}")
        conn.close()
    assert outcomes == ["ok", "ok", f"drop@{len(data) // 2}", "ok", "ok", f"drop@{len(data) // 2}"]
    assert [r.fault for r in hub.request_log[-6:]] == [None, None, "drop", None, None, "drop"]

    # Non-matching paths are neither faulted nor counted.
    assert raw(hub, "GET", "/api/models/acme/tiny")[0] == 200

    hub.set_faults(every=2, kinds=("429", "503"), retry_after=7)
    statuses = [raw(hub, "GET", url) for _ in range(4)]
    assert [s for s, _, _ in statuses] == [200, 429, 200, 503]
    assert statuses[1][1]["retry-after"] == "7"

    hub.set_faults(None)
    assert all(raw(hub, "GET", url)[0] == 200 for _ in range(3))


def test_client_resumes_after_a_dropped_download(hub, seeded, tmp_path):
    _, files = seeded
    hub.set_faults(every=1, kinds=("drop",), methods=("GET",), max_faults=1)
    path = hf_hub_download("acme/tiny", "model.safetensors", endpoint=hub.url, token=False, cache_dir=tmp_path / "c")
    assert Path(path).read_bytes() == files["model.safetensors"]
    gets = [r for r in hub.request_log if r.method == "GET" and r.file == "model.safetensors"]
    assert [r.fault for r in gets] == ["drop", None]
    assert gets[0].bytes_out == len(files["model.safetensors"]) // 2


def test_throttle(hub, tmp_path):
    data = random_bytes(4 * 1000 * 1000, seed=3)
    hub.seed_repo("acme/slow", make_folder(tmp_path / "s", {"w.safetensors": data}))
    hub.set_throttle(down_bytes_per_s=8_000_000)
    started = time.monotonic()
    status, _, body = raw(hub, "GET", "/acme/slow/resolve/main/w.safetensors")
    elapsed = time.monotonic() - started
    assert status == 200 and body == data
    assert elapsed >= 0.3  # 4 MB at 8 MB/s is 0.5 s; only a loose lower bound

    hub.set_throttle(up_bytes_per_s=8_000_000)
    api = HfApi(endpoint=hub.url, token=ALICE)
    started = time.monotonic()
    other = random_bytes(len(data), seed=4)  # new content, or the upload would be skipped
    api.upload_file(path_or_fileobj=other, path_in_repo="up.safetensors", repo_id="acme/slow")
    assert time.monotonic() - started >= 0.3
    assert hub.read_file("acme/slow", "up.safetensors") == other
    hub.set_throttle()


# --------------------------------------------------------------------------- misc
def test_persistence_and_validate_yaml(hub, tmp_path, seeded):
    sha, files = seeded
    with LocalHub(hub.root) as again:  # same root, second server
        assert again.files("acme/tiny") == {k: len(v) for k, v in files.items()}
        assert HfApi(endpoint=again.url, token=ALICE).whoami()["name"] == "alice"

    api = HfApi(endpoint=hub.url, token=ALICE)
    with pytest.raises(ValueError):
        api.upload_file(path_or_fileobj=b"---\nlicense: [unclosed\n---\n", path_in_repo="README.md",
                        repo_id="acme/tiny")
    assert hub.commits("acme/tiny")[0].sha == sha


def test_cli(tmp_path):
    """The command line's switches, driven in-process (a subprocess would pay `import streamer`)."""
    from streamer.localhub.__main__ import build_hub, build_parser

    seed = make_folder(tmp_path / "seed", {"config.json": b'{"a": 1}'})
    args = build_parser().parse_args([
        "--root", str(tmp_path / "root"), "--port", "0", "--user", f"carol:{ALICE}:team",
        "--seed", f"team/m={seed}", "--throttle-down", "100", "--fault-every", "2", "--fault-kinds", "503",
    ])
    with build_hub(args) as hub:
        api = HfApi(endpoint=hub.url, token=ALICE)
        assert api.whoami()["name"] == "carol"
        assert [s.rfilename for s in api.model_info("team/m").siblings] == ["config.json"]
        assert hub.state.throttle.down.rate == 100e6
        statuses = [raw(hub, "GET", "/team/m/resolve/main/config.json")[0] for _ in range(2)]
        assert statuses == [200, 503]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--root", str(tmp_path), "--user", "no-token"])

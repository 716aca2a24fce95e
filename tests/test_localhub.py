"""streamer.localhub against the real, unmodified huggingface_hub client (and raw HTTP)."""

from __future__ import annotations

import hashlib
import http.client
import json
import socket
import struct
import subprocess
import sys
import time
import urllib.request
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
from huggingface_hub.lfs import post_lfs_batch_info

from streamer.localhub import LocalHub, xet

MiB = 1024 * 1024
ALICE, BOB = "hf_alice_token", "hf_bob_token"

# huggingface_hub itself passes file objects as `data=` to httpx for LFS PUTs.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")


@pytest.fixture(autouse=True)
def hf_env(tmp_path, monkeypatch):
    """Isolate the client: no real token or cache, online, and Xet as the client's default leaves it
    (used whenever hf_xet is importable, by huggingface_hub >= 1.20) even if the shell disabled it."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_HUB_DISABLE_XET", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    # huggingface_hub reads these at import time, so the env alone is not enough.
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf_home" / "token"))
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_PROGRESS_BARS", True)


@pytest.fixture
def lfs_client(monkeypatch):
    """For tests of the LFS protocol itself (PUTs, parts), which clients use when hf_xet is absent."""
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)


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
    # Deterministic, and without repeats: Xet would deduplicate repeated blocks away.
    return hashlib.shake_256(f"localhub:{seed}".encode()).digest(n)


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


def test_upload_folder_basic_lfs_then_dedup(hub, api, tmp_path, lfs_client):
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


def test_multipart_upload(hub, api, lfs_client):
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


# --------------------------------------------------------------------------- Xet
def _bf16_like(n: int, seed: int) -> bytes:
    """Weights-like bytes: sign/exponent bytes from a narrow set, mantissas random (what bg4-lz4 is for)."""
    noise = random_bytes(n, seed)
    return bytes(b if i % 2 == 0 else 0x3C + (b & 3) for i, b in enumerate(noise))


XET_FILES = {
    "random.safetensors": random_bytes(3 * MiB + 5, seed=7),
    "bf16.safetensors": _bf16_like(1 * MiB, seed=8),  # compressed chunk by chunk with bg4-lz4
    "zeros.bin": bytes(2 * MiB),  # lz4, and one chunk used many times over
    "log.txt": b"".join(b"step %d loss %.4f\n" % (i, 1 / (i + 1)) for i in range(60_000)),
}


def _refused(hub) -> list[tuple[str, str, int]]:
    """Requests answered with an error, less the probes a client expects to fail (they mean "not offered")."""
    probes = ("/v1/chunks/", "/v1/xorb-grants/", "/v2/shards", "/api/agent-harnesses")
    return [(r.method, r.path, r.status) for r in hub.request_log
            if r.status >= 400 and not any(p in r.path for p in probes)]


def test_upload_with_hf_xet_importable_and_nothing_disabled(hub, api, tmp_path):
    """The installed client, left to choose its transfer, uploads and downloads (issue 12)."""
    pytest.importorskip("hf_xet")
    assert constants.HF_HUB_DISABLE_XET is False
    api.create_repo("acme/xet")
    hub.clear_log()
    api.create_commit("acme/xet", [CommitOperationAdd(k, v) for k, v in XET_FILES.items()], commit_message="x")
    assert _refused(hub) == []
    for name, data in XET_FILES.items():
        assert hub.read_file("acme/xet", name) == data, name
        path = hf_hub_download("acme/xet", name, endpoint=hub.url, token=ALICE, cache_dir=tmp_path / "c")
        assert Path(path).read_bytes() == data, name
    # Downloads stay plain HTTP: nothing told the client that a file is stored in Xet.
    assert not [r for r in hub.request_log if "xet-read-token" in r.path]


@pytest.mark.parametrize("decoder", ["liblz4", "python"])
def test_xet_upload_reassembles_every_compression(hub, api, monkeypatch, decoder):
    """The Xet path whatever the installed huggingface_hub's own choice: its `_upload_xet_files`
    (the same since 1.0) drives hf_xet, then the commit points at what the shards described."""
    pytest.importorskip("hf_xet")
    from huggingface_hub._commit_api import _upload_xet_files

    if decoder == "python":
        monkeypatch.setattr(xet, "_LZ4_USING_DICT", None)
    elif xet._LZ4_USING_DICT is None:
        pytest.skip("no liblz4 on this machine")
    api.create_repo("acme/xet")
    ops = [CommitOperationAdd(k, v) for k, v in XET_FILES.items()]
    hub.clear_log()
    _upload_xet_files(additions=ops, repo_type="model", repo_id="acme/xet", headers=api._build_hf_headers(),
                      endpoint=hub.url, revision="main")
    assert _refused(hub) == []
    xorbs = [r for r in hub.request_log if "/v1/xorbs/default/" in r.path]
    assert xorbs and all(r.status == 200 for r in xorbs)
    assert [r.status for r in hub.request_log if r.path.endswith("/v1/shards")] == [200]
    schemes = {ref.scheme for p in (hub.root / "xet" / "xorbs").rglob("*") if p.is_file()
               for ref in xet._chunk_table(p, p.name)}
    assert schemes == {0, 1, 2}  # stored, lz4, bg4-lz4: each decoded below

    for op in ops:  # now part of the repo's uploads, as after an LFS upload
        assert hub.storage.get_repo("model", "acme/xet").holds(op.upload_info.sha256.hex())
    hub.clear_log()
    api.create_commit("acme/xet", ops, commit_message="x")
    resent = [r for r in hub.request_log if r.method == "PUT" or "/v1/xorbs/" in r.path]
    assert sum(r.bytes_in for r in resent) == 0, resent
    for name, data in XET_FILES.items():
        assert hub.read_file("acme/xet", name) == data, name


def test_clients_that_negotiate_the_transfer_get_lfs(hub, api):
    """huggingface_hub 1.0-1.19 offer "xet" in the LFS batch and take it only if the server picks it."""
    api.create_repo("acme/neg")
    data = random_bytes(MiB, seed=9)
    op = CommitOperationAdd("w.safetensors", data)
    actions, errors, chosen = post_lfs_batch_info(
        upload_infos=[op.upload_info], token=ALICE, repo_type="model", repo_id="acme/neg", revision="main",
        endpoint=hub.url, transfers=["basic", "multipart", "xet"],
    )
    assert chosen == "basic" and errors == []
    assert actions[0]["actions"]["upload"]["href"].startswith(hub.url + "/api/localhub/lfs/")


def test_xet_tokens_follow_repo_rights(hub, api):
    pytest.importorskip("hf_xet")
    api.create_repo("acme/xt")
    path = "/api/models/acme/xt/xet-write-token/main"
    assert raw(hub, "GET", path)[0] == 401
    assert raw(hub, "GET", path, {"Authorization": f"Bearer {BOB}"})[0] == 403
    # A pull request needs only read access, as its commit does.
    assert raw(hub, "GET", "/api/models/acme/xt/xet-write-token/None?create_pr=1",
               {"Authorization": f"Bearer {BOB}"})[0] == 200
    status, headers, body = raw(hub, "GET", path, {"Authorization": f"Bearer {ALICE}"})
    info = json.loads(body)
    assert status == 200 and info["exp"] > time.time() and headers["x-xet-access-token"] == info["accessToken"]
    cas = urlsplit(info["casUrl"]).path
    shard = xet.SHARD_TAG + struct.pack("<QQ", 2, 0) + b"\xff" * 32 + bytes(16)  # no file: valid and empty
    assert raw(hub, "POST", f"{cas}/v1/shards", {}, shard)[0] == 401
    assert raw(hub, "POST", f"{cas}/v1/shards", {"Authorization": "Bearer xet_forged"}, shard)[0] == 401
    assert raw(hub, "POST", f"{cas}/v1/shards", {"Authorization": f"Bearer {ALICE}"}, shard)[0] == 401
    assert raw(hub, "POST", f"{cas}/v1/shards", {"Authorization": f"Bearer {info['accessToken']}"}, shard)[0] == 200


# --------------------------------------------------------------------------- who may reach a blob (issue 14 #5)
def _hash_bytes(hex_hash: str) -> bytes:
    """Inverse of xet-core's hex form (each 8-byte word printed as a little-endian u64)."""
    return b"".join(bytes.fromhex(hex_hash[i : i + 16])[::-1] for i in range(0, 64, 16))


def _commit_lfs_pointer(hub, token: str, repo: str, oid: str, size: int, create_pr: bool = False):
    payload = b"\n".join(json.dumps(line).encode() for line in [
        {"key": "header", "value": {"summary": "pointer", "description": ""}},
        {"key": "lfsFile", "value": {"path": "stolen.bin", "algo": "sha256", "oid": oid, "size": size}},
    ])
    query = "?create_pr=1" if create_pr else ""
    return raw(hub, "POST", f"/api/models/{repo}/commit/main{query}",
               {"Authorization": f"Bearer {token}", "Content-Type": "application/x-ndjson"}, payload)


@pytest.fixture
def secret(hub, tmp_path):
    """A blob only alice (acme) may read, and what a thief knows of it: sha256 and size."""
    data = random_bytes(2 * MiB, seed=11)
    hub.seed_repo("acme/secret", make_folder(tmp_path / "s", {"w.safetensors": data}), private=True)
    return hashlib.sha256(data).hexdigest(), len(data), data


def test_a_commit_cannot_point_at_someone_elses_blob(hub, secret):
    oid, size, data = secret
    hub.create_repo("bob/steal")
    hub.create_repo("acme/public")
    status, _, body = _commit_lfs_pointer(hub, BOB, "bob/steal", oid, size)
    assert status == 400 and b"does not exist" in body  # the same answer as for a blob that does not exist
    assert "stolen.bin" not in hub.files("bob/steal")
    assert _commit_lfs_pointer(hub, BOB, "acme/public", oid, size, create_pr=True)[0] == 400
    assert hub.refs("acme/public")["prs"] == {}

    # Who can read the blob through a repo may reuse it; and once the repo is public, anyone may.
    hub.create_repo("acme/copy")
    assert _commit_lfs_pointer(hub, ALICE, "acme/copy", oid, size)[0] == 200
    assert hub.read_file("acme/copy", "stolen.bin") == data
    hub.set_repo("acme/secret", private=False)
    assert _commit_lfs_pointer(hub, BOB, "bob/steal", oid, size)[0] == 200


def test_lfs_batch_and_verify_check_repo_rights(hub, secret):
    oid, size, data = secret
    hub.create_repo("acme/up")
    hub.create_repo("bob/steal")
    objects = {"objects": [{"oid": oid, "size": size}]}

    def batch(repo: str, token: str | None, operation: str = "upload", ref: str | None = "main"):
        body = {"operation": operation, "transfers": ["basic"], **objects, **({"ref": {"name": ref}} if ref else {})}
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
        status, _, answer = raw(hub, "POST", f"/{repo}.git/info/lfs/objects/batch", headers, json.dumps(body).encode())
        return status, json.loads(answer)

    assert batch("acme/up", None)[0] == 401
    assert batch("acme/up", BOB)[0] == 403  # no write access to main
    assert batch("acme/secret", BOB)[0] == 404  # cannot even see it
    # A pull request needs read access only: bob may upload for one, but must send the bytes,
    # since "already there" would hand him alice's blob.
    status, answer = batch("acme/up", BOB, ref=None)
    assert status == 200 and "actions" in answer["objects"][0]
    status, answer = batch("bob/steal", BOB)
    assert status == 200 and "actions" in answer["objects"][0]
    href = answer["objects"][0]["actions"]["upload"]["href"]
    assert raw(hub, "PUT", urlsplit(href).path, {}, b"\0" * size)[0] == 400  # not the bytes
    assert _commit_lfs_pointer(hub, BOB, "bob/steal", oid, size)[0] == 400
    # alice, who can read it, is told it is there.
    status, answer = batch("acme/up", ALICE)
    assert status == 200 and "actions" not in answer["objects"][0]

    verify = "/bob/steal.git/info/lfs/objects/verify"
    check = json.dumps({"oid": oid, "size": size}).encode()
    assert raw(hub, "POST", verify, {}, check)[0] == 401
    assert raw(hub, "POST", verify, {"Authorization": f"Bearer {BOB}"}, check)[0] == 404
    assert raw(hub, "POST", "/acme/secret.git/info/lfs/objects/verify", {"Authorization": f"Bearer {ALICE}"},
               check)[0] == 200

    # Downloads: read rights, and only objects committed in that repo.
    assert batch("acme/secret", None, "download")[0] == 401
    status, answer = batch("bob/steal", BOB, "download")
    assert status == 200 and answer["objects"][0]["error"]["code"] == 404
    status, answer = batch("acme/secret", ALICE, "download")
    link = urlsplit(answer["objects"][0]["actions"]["download"]["href"])
    status, _, body = raw(hub, "GET", f"{link.path}?{link.query}")
    assert status == 200 and body == data


def test_a_xet_shard_cannot_claim_someone_elses_blob(hub, secret):
    """Announcing a sha256 in a shard grants nothing: the file is rebuilt from the xorbs and hashed."""
    oid, size, _ = secret
    hub.create_repo("bob/steal")
    status, _, body = raw(hub, "GET", "/api/models/bob/steal/xet-write-token/main", {"Authorization": f"Bearer {BOB}"})
    info = json.loads(body)
    cas, auth = urlsplit(info["casUrl"]).path, {"Authorization": f"Bearer {info['accessToken']}"}
    junk = b"not alice's weights"
    xorb = bytes([0]) + len(junk).to_bytes(3, "little") + bytes([0]) + len(junk).to_bytes(3, "little") + junk
    xorb_hash = hashlib.sha256(b"any name").hexdigest()
    status, _, body = raw(hub, "POST", f"{cas}/v1/xorbs/default/{xorb_hash}", auth, xorb)
    assert status == 200
    shard = (xet.SHARD_TAG + struct.pack("<QQ", 2, 0)
             + _hash_bytes("ab" * 32) + struct.pack("<IIQ", 1 << 30, 1, 0)  # one file, one segment, its sha256
             + _hash_bytes(xorb_hash) + struct.pack("<IIII", 0, len(junk), 0, 1)
             + _hash_bytes(oid) + bytes(16)
             + b"\xff" * 32 + bytes(16))
    status, _, body = raw(hub, "POST", f"{cas}/v1/shards", auth, shard)
    assert status == 400 and b"reassembles to sha256" in body
    assert not hub.storage.get_repo("model", "bob/steal").holds(oid)
    assert _commit_lfs_pointer(hub, BOB, "bob/steal", oid, size)[0] == 400


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


def test_throttle_per_client_gives_each_link_its_own_buckets(tmp_path):
    """With per_client, clients dialling different loopback addresses (the nodes of a local
    cluster) are paced by separate buckets at the full rate each; without it they share one."""
    data = random_bytes(300_000, seed=5)
    with LocalHub(tmp_path / "hub", host="0.0.0.0") as hub:
        hub.seed_repo("acme/w", make_folder(tmp_path / "s", {"w.safetensors": data}))
        hub.set_throttle(down_bytes_per_s=50_000_000, per_client=True)
        throttle = hub.state.throttle
        for host in ("127.0.0.2", "127.0.0.3", "127.0.0.2"):
            url = f"http://{host}:{hub.port}/acme/w/resolve/main/w.safetensors"
            with urllib.request.urlopen(url) as r:
                assert r.read() == data
        links = throttle.links("down")
        assert [link.split(">")[1] for link in links] == ["127.0.0.2", "127.0.0.3"]
        buckets = [throttle.bucket("down", link) for link in links]
        assert buckets[0] is not buckets[1] and all(b.rate == 50_000_000 for b in buckets)
        assert throttle.bucket("down", links[0]) is buckets[0]  # one link, one bucket, kept
        hub.set_throttle(down_bytes_per_s=50_000_000)  # shared again: one link for everyone
        assert throttle.bucket("down", links[0]) is throttle.bucket("down", links[1]) is throttle.down


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


def test_an_upload_survives_a_restart(hub, api):
    """What was uploaded to a repo stays committable there by a server restarted on the same root,
    as a resumed conversion needs (it commits shards a killed run uploaded)."""
    api.create_repo("acme/resume")
    op = CommitOperationAdd("w.safetensors", random_bytes(2 * MiB, seed=12))
    api.preupload_lfs_files("acme/resume", [op])
    hub.stop()
    with LocalHub(hub.root) as again:
        HfApi(endpoint=again.url, token=ALICE).create_commit("acme/resume", [op], commit_message="resumed")
        assert again.read_file("acme/resume", "w.safetensors") == random_bytes(2 * MiB, seed=12)


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


def test_port_in_use_is_a_sentence_not_a_traceback(tmp_path, llama_ckpt):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = subprocess.run([sys.executable, "-m", "streamer.localhub", "--root", str(tmp_path / "r"),
                              "--port", str(port), "--user", "a:hf_a:acme", "--seed", f"acme/t={llama_ckpt}"],
                             capture_output=True, text=True, timeout=60)  # fmt: skip
    assert run.returncode == 2
    assert f"port {port}" in run.stderr and "already in use" in run.stderr and "--port 0" in run.stderr
    assert not (tmp_path / "r").exists() and "seeded" not in run.stdout  # said before anything is written
    assert "Traceback" not in run.stderr


# --------------------------------------------------------------------------- malformed input, rude clients (issue 14)
def test_huge_range_numbers(hub, seeded):
    _, files = seeded
    data = files["model.safetensors"]
    url = "/acme/tiny/resolve/main/model.safetensors"
    digits = "9" * 5000  # past Python's 4300-digit limit for int()
    status, headers, _ = raw(hub, "GET", url, {"Range": f"bytes={digits}-"})
    assert status == 416 and headers["content-range"] == f"bytes */{len(data)}"
    status, _, body = raw(hub, "GET", url, {"Range": f"bytes=0-{digits}"})
    assert status == 206 and body == data
    status, _, body = raw(hub, "GET", url, {"Range": f"bytes=-{digits}"})
    assert status == 206 and body == data
    status, _, body = raw(hub, "GET", url, {"Range": f"bytes={'0' * 5000}5-9"})  # a long way to write 5
    assert status == 206 and body == data[5:10]


_HEADER = b'{"key": "header", "value": {"summary": "s"}}\n'
MALFORMED = {
    "commit: not JSON": ("commit", b"not json"),
    "commit: line is a list": ("commit", b'["key", "value"]'),
    "commit: value is a string": ("commit", b'{"key": "header", "value": "summary"}'),
    "commit: summary is a list": ("commit", b'{"key": "header", "value": {"summary": ["s"]}}'),
    "commit: parentCommit is a number": ("commit", b'{"key": "header", "value": {"summary": "s", "parentCommit": 5}}'),
    "commit: file path is a number": ("commit", _HEADER + b'{"key": "file", "value": {"path": 5, "content": ""}}'),
    "commit: content is not base64": ("commit", _HEADER + b'{"key": "file", "value": {"path": "a", "content": "abc"}}'),
    "commit: lfsFile path is a list": ("commit", _HEADER + b'{"key": "lfsFile", "value": {"path": ["a"], "oid": 1}}'),
    "commit: deletedFolder path is a number": ("commit", _HEADER + b'{"key": "deletedFolder", "value": {"path": 7}}'),
    "commit: nesting deeper than the parser": ("commit", b"[" * 100_000),
    "preupload: files is a number": ("preupload", b'{"files": 5}'),
    "preupload: file is a number": ("preupload", b'{"files": [1]}'),
    "preupload: sample is not base64": ("preupload", b'{"files": [{"path": "a.bin", "sample": "abc", "size": 3}]}'),
    "preupload: size is a string": ("preupload", b'{"files": [{"path": "a.bin", "sample": "", "size": "big"}]}'),
    "preupload: gitIgnore is a number": ("preupload", b'{"files": [], "gitIgnore": 3}'),
    "preupload: nesting deeper than the parser": ("preupload", b"[" * 100_000),
    "batch: object is a number": ("batch", b'{"operation": "upload", "objects": [1]}'),
    "batch: transfers is a string": ("batch", b'{"operation": "upload", "objects": [], "transfers": "basic"}'),
    "batch: operation is a list": ("batch", b'{"operation": ["upload"], "objects": []}'),
    "batch: ref is a string": ("batch", b'{"operation": "upload", "objects": [], "ref": "main"}'),
    "paths-info: not JSON": ("paths-info", b'{"paths": '),
    "paths-info: paths is a number": ("paths-info", b'{"paths": 5}'),
}
_ENDPOINTS = {
    "commit": ("/api/models/acme/m/commit/main", "application/x-ndjson"),
    "preupload": ("/api/models/acme/m/preupload/main", "application/json"),
    "batch": ("/acme/m.git/info/lfs/objects/batch", "application/vnd.git-lfs+json"),
    "paths-info": ("/api/models/acme/m/paths-info/main", "application/json"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_bodies_get_a_400_that_says_what(hub, case):
    endpoint, body = MALFORMED[case]
    hub.create_repo("acme/m")
    path, content_type = _ENDPOINTS[endpoint]
    status, headers, answer = raw(hub, "POST", path, {"Authorization": f"Bearer {ALICE}",
                                                      "Content-Type": content_type}, body)
    assert status == 400, answer
    assert headers["content-type"].startswith("application/json")
    assert json.loads(answer)["error"]
    assert len(hub.commits("acme/m")) == 1


def test_negative_content_length(hub):
    status, headers, answer = raw(hub, "POST", "/api/validate-yaml", {"Content-Length": "-1"})
    assert status == 400 and json.loads(answer)["error"] == "Invalid Content-Length"


def test_a_client_resetting_its_connection_is_not_a_traceback(hub, capfd):
    def reset(first_bytes: bytes) -> None:
        conn = socket.create_connection((hub.host, hub.port))
        conn.sendall(first_bytes)
        time.sleep(0.2)  # the server's thread is now waiting for the rest
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST
        conn.close()

    reset(b"")  # idle kept-alive connection
    reset(b"GET /api/whoami-v2 HTTP/1.1\r\nHost: x\r\n")  # in the middle of the headers
    time.sleep(0.3)
    assert raw(hub, "GET", "/api/models/none/such")[0] == 401  # still serving
    err = capfd.readouterr().err
    assert "Traceback" not in err and "ConnectionResetError" not in err


def test_hostile_small_files_do_not_break_the_repo_api(hub, api, tmp_path):
    """A repo whose config.json or card nests past Python's recursion limit still answers
    model_info (without the parsed config or card data), instead of a 500 and a traceback."""
    files = {
        "config.json": b"[" * 100_000 + b"]" * 100_000,
        "README.md": b"---\nx: " + b"[" * 50_000 + b"]" * 50_000 + b"\n---\n",
        "model.safetensors": random_bytes(1024),
    }
    hub.seed_repo("acme/nested", make_folder(tmp_path / "nested", files))
    info = api.model_info("acme/nested")
    assert {s.rfilename for s in info.siblings} >= {"config.json", "README.md"}
    assert not info.config and not info.card_data

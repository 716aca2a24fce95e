"""Is a job's target up to date? The source's current commit and the job's settings, compared with
the provenance streamer wrote into the target's model card: two small requests, no tensor byte
read, nothing written to the HF cache, and neither torch nor compressed-tensors imported."""

from __future__ import annotations

from dataclasses import dataclass

from streamer.formats import allows_nonfinite, hub_token
from streamer.io.provenance import read_provenance
from streamer.mirror.jobs import MirrorJob


@dataclass
class Check:
    """The answer for one job: whether its target is up to date, and why (not)."""

    up_to_date: bool
    reason: str
    source_commit: str
    streamer_target: bool = False  # the target branch's card was written by streamer
    where: str | None = None  # the ref holding the up-to-date conversion


def short_sha(sha: str | None) -> str:
    """The first 7 digits of the commit SHA, "-" for none."""
    return sha[:7] if isinstance(sha, str) and sha else "-"


def read_card(repo_id: str, revision: str, *, token: str | None = None, endpoint: str | None = None) -> str | None:
    """README.md of the target REPO_ID at REVISION, with one small GET under the Hub retry policy
    (no HF cache); None when the repo, the branch or the card does not exist.

    :param repo_id: the repo, `org/name`.
    :param revision: a branch, tag, commit or `refs/pr/N`.
    :param token: the Hugging Face token (default: HF_TOKEN or the saved login).
    :param endpoint: the Hub's URL (default: HF_ENDPOINT)."""
    from streamer.io.hub_http import read_text

    return read_text(repo_id, "README.md", revision=revision, token=token, endpoint=endpoint, what="target repo")


def compare(job: MirrorJob, prov: dict | None, source_commit: str) -> str | None:
    """None when PROV records a conversion of SOURCE_COMMIT with the job's settings, else why not.

    :param job: the job.
    :param prov: the `streamer:` block of the target's card (`read_provenance`), None for none.
    :param source_commit: the source's current commit sha."""
    if prov is None:
        return "target has no conversion by streamer yet"
    if str(prov.get("source", "")).lower() != job.source.lower():
        return f"target was converted from {prov.get('source')}, not {job.source}"
    if prov.get("source_commit") != source_commit:
        return f"new source commit {short_sha(prov.get('source_commit'))} -> {short_sha(source_commit)}"
    stored_dq = prov.get("dequant_dtype")
    # dequant_dtype only applies to quantized sources: a job that leaves it unset accepts the
    # dtype streamer chose, and a plain source records none whatever the job asked for.
    dq = stored_dq if (job.dequant_dtype is None or stored_dq is None) else job.dequant_dtype
    # settings the shards do not show, written on the card only when they differ from a plain run
    allowed = job.nonfinite == "passthrough" if job.nonfinite is not None else allows_nonfinite()
    if prov.get("nonfinite") and not allowed:
        return "target holds weights quantized with their NaN/Inf (nonfinite = passthrough), which this job refuses"
    if prov.get("quality") is False:
        return "target was converted without its quality report"
    if prov.get("settings") == job.settings_key(dq):
        return None
    diffs = []
    if prov.get("scheme") != job.scheme:
        diffs.append(f"scheme {prov.get('scheme')} -> {job.scheme}")
    if list(prov.get("ignore") or []) != list(job.ignore):
        diffs.append(f"ignore {list(prov.get('ignore') or [])} -> {list(job.ignore)}")
    if dq != stored_dq:
        diffs.append(f"dequant_dtype {stored_dq} -> {dq}")
    if "policy" not in prov:
        diffs.append("converted before streamer kept embeddings, lm_head and routers unquantized by default")
    elif list(prov.get("policy") or []) != list(job.policy):
        diffs.append(f"policy {list(prov.get('policy') or [])} -> {list(job.policy)}")
    return "settings changed (" + (", ".join(diffs) or "settings hash differs") + ")"


def check_job(job: MirrorJob, *, token: str | None = None, endpoint: str | None = None) -> Check:
    """Is JOB's target up to date? Reads the source's commit sha and the target's model card(s)
    (with `create_pr`, also the cards of the target's pull requests).

    :param job: the job.
    :param token: the Hugging Face token (default: HF_TOKEN or the saved login).
    :param endpoint: the Hub's URL (default: HF_ENDPOINT)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    from streamer.io.hub_http import account_name, explain, hub_call, hub_endpoint, own_pull_request, pr_refs

    token = hub_token(token)
    api = HfApi(endpoint=hub_endpoint(endpoint), token=token)
    try:
        info = hub_call(f"reading {job.source}'s commit", api.model_info, job.source, revision=job.source_revision)
    except HfHubHTTPError as e:
        raise explain(e, job.source, what="source repo") from None
    sha = info.sha
    branch = job.target_revision or "main"
    prov = None
    text = read_card(job.target, branch, token=token, endpoint=endpoint)
    if text is not None:
        prov = read_provenance(text)
    why = compare(job, prov, sha)
    if why is None:
        return Check(True, f"up to date ({job.scheme} of {short_sha(sha)})", sha, True, branch)
    if job.create_pr:
        # A PR (open, merged or closed) to the job's branch already proposing this exact
        # conversion counts as done: a mirror must not open the same PR again on every run. Only
        # one this account wrote: anyone can open a PR on a public repo with a card that says the same.
        mine = None  # the token's account: asked once, and only when a PR's card matches
        for ref in pr_refs(api, job.target):
            pr_text = read_card(job.target, ref, token=token, endpoint=endpoint)
            if pr_text is None or compare(job, read_provenance(pr_text), sha) is not None:
                continue
            if mine is None:
                mine = account_name(api) or ""
            if mine and own_pull_request(api, job.target, ref, mine, branch):
                num = ref.rsplit("/", 1)[-1]
                return Check(True, f"up to date: PR #{num} proposes {job.scheme} of {short_sha(sha)}", sha, prov is not None, ref)
    return Check(False, why, sha, prov is not None)

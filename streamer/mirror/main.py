"""Mirroring jobs: keep quantized copies of Hub models up to date, automatically.

`python -m streamer mirror jobs.toml` runs a declarative list of jobs (TOML):

    [defaults]                      # optional; any job key except name/source/target
    scheme = "FP8_DYNAMIC"
    ignore = ["lm_head"]

    [[job]]
    name = "llama-fp8"
    source = "meta-llama/Llama-3.1-8B-Instruct"     # org/name[@revision]
    target = "acme/Llama-3.1-8B-Instruct-FP8"       # org/name[@branch]

Every run is idempotent. Before a single tensor byte is read, each job compares the source's
current commit (`HfApi.model_info`) and the job's settings with the provenance that streamer
wrote into the target's model card (`streamer:` block of README.md's front matter, fetched with
one small GET, nothing written to the HF cache). A job whose target already holds that exact
conversion is skipped; otherwise `streamer.engine.convert.convert` publishes a new commit (or PR).

Jobs are independent: one failing does not stop the others; the exit code is 1 if any failed.
Trigger modes: cron/CI (run the command), Hugging Face Jobs (`hf jobs scheduled run …`), and a
webhook listener (`--serve`, see streamer/mirror/webhook.py). See examples/ for each.
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import os
import re
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import quote

from streamer.engine.card import Provenance, policy_flags, read_provenance
from streamer.errors import HubError, StreamerError, TargetError
from streamer.engine.progress import human_bytes

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    try:
        import tomli as tomllib  # type: ignore[no-redef]
    except ModuleNotFoundError:
        tomllib = None  # type: ignore[assignment]

log = logging.getLogger("streamer.mirror.main")

# --------------------------------------------------------------------------------------------
# the jobs file
# --------------------------------------------------------------------------------------------

REQUIRED = ("name", "source", "target", "scheme")
#: key -> (type, description) of every key a [[job]] accepts
JOB_KEYS: dict[str, tuple[type, str]] = {
    "name": (str, "a unique name (letters, digits, . _ -), used by --only and in the summary"),
    "source": (str, "source repo id org/name, optionally @revision (branch, tag or commit)"),
    "target": (str, "target repo id org/name, optionally @branch (default main)"),
    "scheme": (str, "compressed-tensors preset, e.g. FP8_DYNAMIC, FP8_BLOCK, NVFP4A16, W4A16"),
    "ignore": (list, "modules left unquantized: exact names or re:PATTERN"),
    "private": (bool, "create the target repo private (true) or public (false); default: private when the source is private or gated"),
    "create_pr": (bool, "publish each conversion as a pull request on the target (default false)"),
    "dequant_dtype": (str, "dtype a quantized source is expanded to: bfloat16, float16 or float32"),
    "device": (str, "auto, cpu, cuda or cuda:N (default: the --device option)"),
    "overwrite": (bool, "allow replacing a target that holds files streamer did not write (default false)"),
    "default_ignore": (bool, "keep embeddings, lm_head, MoE routers and vision/audio towers unquantized (default true)"),
    "quantize_towers": (bool, "quantize vision/audio towers and multimodal projectors too (default false)"),
    "skip_incompatible": (bool, "keep weights the scheme cannot serve unquantized instead of failing (default false)"),
}
DEFAULT_KEYS = {k: v for k, v in JOB_KEYS.items() if k not in ("name", "source", "target")}
TOP_KEYS = ("defaults", "job")
DEQUANT_DTYPES = ("bfloat16", "float16", "float32")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_REPO = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SHA = re.compile(r"^[0-9a-f]{40}$")


class JobsFileError(StreamerError):
    """The jobs file cannot be read or is invalid; lists every problem found."""

    def __init__(self, origin: str, problems: list[str]):
        self.origin = origin
        self.problems = list(problems)
        if len(self.problems) == 1:
            text = f"{origin}: {self.problems[0]}"
        else:
            text = f"{origin}: {len(self.problems)} problems:\n" + "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(text)


@dataclass(frozen=True)
class Job:
    name: str
    source: str  # repo id, without revision
    target: str  # repo id, without branch
    scheme: str  # canonical preset name, as the model card records it
    ignore: tuple[str, ...] = ()
    source_revision: str | None = None
    target_revision: str | None = None  # branch; None = main
    private: bool | None = None  # None: as private as the source (a private or gated source stays private)
    create_pr: bool = False
    dequant_dtype: str | None = None
    device: str | None = None
    overwrite: bool = False
    default_ignore: bool = True
    quantize_towers: bool = False
    skip_incompatible: bool = False

    @property
    def policy(self) -> tuple[str, ...]:
        """The non-default policy choices, named as the model card records them."""
        flags = policy_flags(self.default_ignore, self.quantize_towers, self.skip_incompatible)
        return tuple(f.lstrip("-") for f in flags)

    @property
    def policy_kwargs(self) -> dict:
        return {
            "default_ignore": self.default_ignore,
            "quantize_towers": self.quantize_towers,
            "skip_incompatible": self.skip_incompatible,
        }

    @property
    def source_spec(self) -> str:
        return self.source + (f"@{self.source_revision}" if self.source_revision else "")

    @property
    def target_spec(self) -> str:
        return self.target + (f"@{self.target_revision}" if self.target_revision else "")

    def settings_key(self, dequant_dtype: str | None) -> str:
        """The `settings` hash streamer writes into the card, computed the same way."""
        return Provenance(
            source=self.source, source_commit=None, scheme=self.scheme,
            ignore=tuple(self.ignore), dequant_dtype=dequant_dtype, policy=self.policy,
        ).settings_key()  # fmt: skip


def load_jobs(path: str | os.PathLike) -> list[Job]:
    """Read and validate a jobs file; raises JobsFileError listing every problem."""
    origin = str(path)
    if tomllib is None:  # pragma: no cover
        raise JobsFileError(origin, ["reading TOML needs Python >= 3.11 or `pip install tomli`"])
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise JobsFileError(origin, [f"cannot read the jobs file ({e.strerror or e})"]) from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise JobsFileError(origin, ["not UTF-8 text"]) from None
    except tomllib.TOMLDecodeError as e:
        raise JobsFileError(origin, [f"not valid TOML: {e}"]) from None
    return parse_jobs(data, origin=origin)


def _unknown(key: str, known) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else f" (accepted: {', '.join(known)})"
    return f"unknown key {key!r}{hint}"


def _type_problem(key: str, value) -> str | None:
    kind = JOB_KEYS[key][0]
    if kind is bool:
        return None if isinstance(value, bool) else f"{key} must be true or false, not {value!r}"
    if kind is str:
        if not isinstance(value, str):
            return f"{key} must be a string, not {value!r}"
        return None if value.strip() else f"{key} is empty"
    if kind is list:
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            return f"{key} must be a list of non-empty strings, e.g. [\"lm_head\"], not {value!r}"
    return None


def _split_repo(spec: str, key: str) -> tuple[str | None, str | None, str | None]:
    """(repo_id, revision, problem)"""
    repo, _, rev = spec.strip().partition("@")
    if not _REPO.match(repo) or (spec.count("@") and not rev):
        return None, None, f"{key} {spec!r} is not a Hub repo id (org/name, optionally @revision)"
    return repo, (rev or None), None


def parse_jobs(data: dict, *, origin: str = "jobs file") -> list[Job]:
    """Validate the parsed TOML document and build the jobs (see the module docstring)."""
    from streamer.quant.schemes import make_recipe

    problems: list[str] = []
    for key in data:
        if key not in TOP_KEYS:
            problems.append(f"top level: {_unknown(key, TOP_KEYS)}")
    defaults = data.get("defaults", {})
    if not isinstance(defaults, dict):
        problems.append("[defaults] must be a table")
        defaults = {}
    defaults = dict(defaults)
    for key, value in list(defaults.items()):
        if key in ("name", "source", "target"):
            problems.append(f"[defaults]: {key!r} belongs in each [[job]], not in [defaults]")
        elif key not in DEFAULT_KEYS:
            problems.append(f"[defaults]: {_unknown(key, DEFAULT_KEYS)}")
        elif (why := _type_problem(key, value)) is not None:
            problems.append(f"[defaults]: {why}")
        else:
            continue
        defaults.pop(key)

    entries = data.get("job")
    if entries is None:
        problems.append("no jobs: add at least one [[job]] table with name, source, target and scheme")
        entries = []
    elif isinstance(entries, dict):
        problems.append("'job' must be an array of tables: write [[job]], not [job]")
        entries = []
    elif not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        problems.append("'job' must be an array of tables ([[job]])")
        entries = []

    jobs: list[Job] = []
    names: dict[str, int] = {}
    targets: dict[tuple[str, str], str] = {}
    for i, entry in enumerate(entries, 1):
        label = f"[[job]] #{i}"
        if isinstance(entry.get("name"), str) and entry["name"]:
            label += f" ({entry['name']})"
        before = len(problems)
        for key in entry:
            if key not in JOB_KEYS:
                problems.append(f"{label}: {_unknown(key, JOB_KEYS)}")
        merged = {**defaults, **{k: v for k, v in entry.items() if k in JOB_KEYS}}
        for key, value in list(merged.items()):
            if (why := _type_problem(key, value)) is not None:
                problems.append(f"{label}: {why}")
                merged.pop(key)
        missing = [k for k in REQUIRED if k not in merged and k not in entry]
        if missing:
            where = " (scheme may also come from [defaults])" if "scheme" in missing else ""
            problems.append(f"{label}: missing {', '.join(missing)}{where}")

        name = merged.get("name")
        if name is not None:
            if not _NAME.match(name):
                problems.append(f"{label}: name {name!r} may only use letters, digits, '.', '_' and '-'")
            elif name in names:
                problems.append(f"{label}: duplicate name {name!r} (also job #{names[name]})")
            else:
                names[name] = i
        source = source_rev = target = target_rev = None
        if "source" in merged:
            source, source_rev, why = _split_repo(merged["source"], "source")
            if why:
                problems.append(f"{label}: {why}")
        if "target" in merged:
            target, target_rev, why = _split_repo(merged["target"], "target")
            if why:
                problems.append(f"{label}: {why}")
            elif target_rev and (target_rev.startswith("refs/") or _SHA.match(target_rev)):
                problems.append(f"{label}: target {merged['target']!r}: after '@' give a branch name")
        if source and target and source.lower() == target.lower():
            problems.append(f"{label}: source and target are the same repo ({source})")
        if target:
            slot = (target.lower(), target_rev or "main")
            if slot in targets:
                problems.append(
                    f"{label}: target {target}@{slot[1]} is also written by job {targets[slot]!r}; "
                    "two jobs must not publish to the same branch"
                )
            else:
                targets[slot] = name or f"#{i}"
        dq = merged.get("dequant_dtype")
        if dq is not None and dq not in DEQUANT_DTYPES:
            problems.append(f"{label}: dequant_dtype {dq!r}: use one of {', '.join(DEQUANT_DTYPES)}")
        recipe = None
        if "scheme" in merged:
            try:
                recipe = make_recipe(merged["scheme"], ignore=list(merged.get("ignore", [])))
            except StreamerError as e:
                problems.append(f"{label}: {e}")
        if len(problems) > before or recipe is None:
            continue
        jobs.append(Job(
            name=name, source=source, target=target, scheme=recipe.name,
            ignore=tuple(recipe.ignore), source_revision=source_rev, target_revision=target_rev,
            private=merged.get("private"), create_pr=merged.get("create_pr", False),
            dequant_dtype=dq, device=merged.get("device"), overwrite=merged.get("overwrite", False),
            default_ignore=merged.get("default_ignore", True), quantize_towers=merged.get("quantize_towers", False),
            skip_incompatible=merged.get("skip_incompatible", False),
        ))  # fmt: skip
    if problems:
        raise JobsFileError(origin, problems)
    return jobs


def select_jobs(jobs: list[Job], only: list[str] | None) -> list[Job]:
    if not only:
        return list(jobs)
    wanted = [n.strip() for item in only for n in item.split(",") if n.strip()]
    known = {j.name for j in jobs}
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise StreamerError(f"--only: no job named {', '.join(map(repr, unknown))}; jobs: {', '.join(sorted(known))}")
    return [j for j in jobs if j.name in wanted]


# --------------------------------------------------------------------------------------------
# the skip check: source commit + settings vs the target's provenance, no tensor byte read
# --------------------------------------------------------------------------------------------


@dataclass
class Check:
    up_to_date: bool
    reason: str
    source_commit: str
    streamer_target: bool = False  # the target branch's card was written by streamer
    where: str | None = None  # the ref holding the up-to-date conversion


def _short(sha: str | None) -> str:
    return sha[:7] if isinstance(sha, str) and sha else "-"


def read_card(repo_id: str, revision: str = "main", *, token: str | None = None, endpoint: str | None = None) -> str | None:
    """README.md of a repo at `revision`, with one small GET (no HF cache); None when absent.

    Under the Hub retry policy of every streamer call (hub.hub_call): a dropped connection, a
    5xx or a 429 is tried again; one that persists is a sentence naming the Hub."""
    from streamer.io.hub import _endpoint, hub_get

    url = f"{_endpoint(endpoint)}/{repo_id}/resolve/{quote(revision, safe='')}/README.md"
    r = hub_get(f"reading {repo_id}'s model card", url, token=token, endpoint=endpoint)
    if r.status_code == 200:
        return r.text
    if r.status_code == 404:
        return None  # no repo, no branch or no card: nothing streamer wrote
    if r.status_code == 401:
        if r.headers.get("x-error-code") == "RepoNotFound":
            return None  # the Hub answers 401 for a missing repo when not logged in
        raise HubError(f"reading {repo_id}'s model card: the token was rejected (check --token / HF_TOKEN)")
    raise HubError(f"reading {repo_id}'s model card failed (HTTP {r.status_code} {r.headers.get('x-error-message', '')})".rstrip())


def compare(job: Job, prov: dict | None, source_commit: str) -> str | None:
    """None when `prov` records a conversion of `source_commit` with the job's settings, else why not."""
    if prov is None:
        return "target has no conversion by streamer yet"
    if str(prov.get("source", "")).lower() != job.source.lower():
        return f"target was converted from {prov.get('source')}, not {job.source}"
    if prov.get("source_commit") != source_commit:
        return f"new source commit {_short(prov.get('source_commit'))} -> {_short(source_commit)}"
    stored_dq = prov.get("dequant_dtype")
    # dequant_dtype only applies to quantized sources: a job that leaves it unset accepts the
    # dtype streamer chose, and a plain source records none whatever the job asked for.
    dq = stored_dq if (job.dequant_dtype is None or stored_dq is None) else job.dequant_dtype
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


def check_job(job: Job, *, token: str | None = None, endpoint: str | None = None) -> Check:
    """Is the target up to date? Reads the source's commit sha and the target's model card(s)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    from streamer.io.hub import _endpoint, explain, hub_call

    api = HfApi(endpoint=_endpoint(endpoint), token=token)
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
        return Check(True, f"up to date ({job.scheme} of {_short(sha)})", sha, True, branch)
    if job.create_pr:
        # A PR (open, merged or closed) already proposing this exact conversion counts as done:
        # a mirror must not open the same PR again on every run.
        for ref in _pr_refs(api, job.target):
            pr_text = read_card(job.target, ref, token=token, endpoint=endpoint)
            if pr_text is not None and compare(job, read_provenance(pr_text), sha) is None:
                num = ref.rsplit("/", 1)[-1]
                return Check(True, f"up to date: PR #{num} proposes {job.scheme} of {_short(sha)}", sha, prov is not None, ref)
    return Check(False, why, sha, prov is not None)


def _pr_refs(api, repo_id: str, limit: int = 20) -> list[str]:
    from huggingface_hub.errors import HfHubHTTPError

    from streamer.io.hub import hub_call

    try:
        refs = hub_call(f"listing {repo_id}'s pull requests", api.list_repo_refs, repo_id, include_pull_requests=True)
    except HfHubHTTPError:
        return []  # no target yet
    prs = [r.ref for r in (refs.pull_requests or []) if r.ref.startswith("refs/pr/")]

    def num(ref: str) -> int:
        tail = ref.rsplit("/", 1)[-1]
        return int(tail) if tail.isdigit() else -1

    return sorted(prs, key=num, reverse=True)[:limit]


# --------------------------------------------------------------------------------------------
# running jobs
# --------------------------------------------------------------------------------------------


@dataclass
class JobResult:
    name: str
    status: str  # "converted" | "skipped" | "failed" | "planned" (dry run: would convert)
    source: str
    target: str
    scheme: str
    reason: str = ""
    source_commit: str | None = None
    url: str | None = None
    error: str | None = None
    bytes_read: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    finished_at: float = field(default_factory=time.time)

    @property
    def ok(self) -> bool:
        return self.status != "failed"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["seconds"] = round(self.seconds, 3)
        return d


class MirrorRunner:
    """Runs jobs (check, then convert when needed), several at once under one memory budget.

    The memory budget (`max_memory`, default: half the free RAM) is one `Budget` that every
    concurrent conversion draws from.
    """

    def __init__(
        self,
        *,
        token: str | None = None,
        dry_run: bool = False,
        parallel: int = 1,
        max_memory: int | None = None,
        device: str = "auto",
        workers: int = 4,
        endpoint: str | None = None,
    ):
        from streamer.engine.pipeline import default_memory_budget

        if parallel < 1:
            raise StreamerError("--parallel must be at least 1")
        self.token = token
        self.dry_run = dry_run
        self.parallel = parallel
        self.max_memory = max_memory or default_memory_budget()
        self.device = device
        self.workers = workers
        self.endpoint = endpoint
        self.cancel = threading.Event()
        from streamer.engine.pipeline import Budget

        self.budget = Budget(self.max_memory)

    def _memory_kwargs(self) -> dict:
        return {"budget": self.budget, "max_memory": self.max_memory}

    def run_one(self, job: Job) -> JobResult:
        t0 = time.monotonic()
        res = JobResult(job.name, "failed", job.source_spec, job.target_spec, job.scheme)
        try:
            self._run(job, res)
        except KeyboardInterrupt:  # Ctrl-C, or another job's cancel: stop everything cleanly
            self.cancel.set()
            res.status, res.error = "failed", "interrupted: nothing was published"
        except TargetError as e:
            res.status, res.error = "failed", str(e)
            if "did not write" in str(e):
                res.error += " (or set overwrite = true in this job)"
        except StreamerError as e:
            res.status, res.error = "failed", str(e)
        except Exception as e:  # a bug or an unexpected environment problem: the other jobs go on
            log.debug("[%s] failed", job.name, exc_info=True)
            res.status, res.error = "failed", f"{type(e).__name__}: {e}"
        res.seconds = time.monotonic() - t0
        res.finished_at = time.time()
        if res.status == "failed":
            log.error("[%s] failed: %s", job.name, res.error)
        elif res.status == "converted":
            log.info("[%s] converted in %.1fs: %s", job.name, res.seconds, res.url)
        return res

    def _run(self, job: Job, res: JobResult) -> None:
        if self.cancel.is_set():
            raise KeyboardInterrupt
        check = check_job(job, token=self.token, endpoint=self.endpoint)
        res.source_commit = check.source_commit
        res.reason = check.reason
        if check.up_to_date:
            res.status = "skipped"
            log.info("[%s] %s", job.name, check.reason)
            return
        # Pin the commit that was checked, so the card records exactly what was converted.
        source = f"{job.source}@{check.source_commit}"
        if self.dry_run:
            from streamer.engine.convert import prepare

            src, plan = prepare(source, scheme=job.scheme, ignore=job.ignore, token=self.token,
                                dequant_dtype=job.dequant_dtype, **job.policy_kwargs)
            src.close()
            res.status = "planned"
            res.reason = (
                f"{check.reason}; would write {len(plan.jobs)} shard(s), {plan.n_quantized} weights "
                f"quantized, {human_bytes(plan.bytes_in)} -> {human_bytes(plan.bytes_out)}"
                + (" as a PR" if job.create_pr else "")
            )
            log.info("[%s] would convert: %s", job.name, res.reason)
            return
        from streamer.engine.convert import convert
        from streamer.engine.progress import Progress

        log.info("[%s] converting %s -> %s: %s", job.name, job.source_spec, job.target_spec, check.reason)
        result = convert(
            source, job.target_spec,
            scheme=job.scheme, ignore=job.ignore, device=job.device or self.device,
            workers=self.workers, token=self.token,
            # The target is streamer's own (its card says so) or new; anything else is only
            # replaced when the job says overwrite = true.
            overwrite=check.streamer_target or job.overwrite,
            private=job.private, create_pr=job.create_pr, dequant_dtype=job.dequant_dtype,
            progress=Progress(), cancel=self.cancel, **job.policy_kwargs, **self._memory_kwargs(),
        )  # fmt: skip
        res.status = "converted"
        res.url = result.url
        if result.stats is not None:
            res.bytes_read = result.stats.bytes_read
            res.bytes_written = result.stats.bytes_written

    def run(self, jobs: list[Job], on_result=None) -> list[JobResult]:
        """Run `jobs` (at most `parallel` at once); results in the order of `jobs`."""
        results: dict[str, JobResult] = {}

        def done(r: JobResult) -> None:
            results[r.name] = r
            if on_result is not None:
                on_result(r)

        if self.parallel == 1 or len(jobs) <= 1:
            for job in jobs:  # after a Ctrl-C, the remaining jobs report "interrupted" at once
                done(self.run_one(job))
            return [results[j.name] for j in jobs]
        pool = ThreadPoolExecutor(self.parallel, thread_name_prefix="streamer-mirror")
        try:
            pending = {pool.submit(self.run_one, j) for j in jobs}
            while pending:
                try:
                    finished, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                except KeyboardInterrupt:
                    log.warning("interrupted: cancelling the running conversions")
                    self.cancel.set()
                    continue
                for f in finished:
                    done(f.result())
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        return [results[j.name] for j in jobs]


def run_jobs(jobs: list[Job], **options) -> list[JobResult]:
    """Run jobs once. Options: token, dry_run, parallel, max_memory, device, workers, endpoint."""
    return MirrorRunner(**options).run(jobs)


# --------------------------------------------------------------------------------------------
# reporting
# --------------------------------------------------------------------------------------------


def summary(results: list[JobResult]) -> dict:
    counts = {s: sum(r.status == s for r in results) for s in ("converted", "skipped", "failed", "planned")}
    return {"ok": all(r.ok for r in results), "counts": counts, "jobs": [r.to_dict() for r in results]}


def _one_line(text: str, width: int = 160) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def render_table(results: list[JobResult]) -> str:
    header = ("job", "status", "source commit", "read", "written", "time", "commit / error")
    rows = []
    for r in results:
        if r.status == "failed":
            last = f"error: {r.error}"
        elif r.status == "converted":
            last = r.url or ""
        else:
            last = r.reason
        moved = r.status == "converted"
        rows.append((
            r.name, r.status, _short(r.source_commit),
            human_bytes(r.bytes_read) if moved else "-",
            human_bytes(r.bytes_written) if moved else "-",
            f"{r.seconds:.1f}s", _one_line(last),
        ))  # fmt: skip
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header) - 1)]
    lines = []
    for row in [header, *rows]:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1])
    counts = summary(results)["counts"]
    parts = [f"{n} {s}" for s, n in counts.items() if n or s != "planned"]
    lines.append(f"{len(results)} job(s): " + ", ".join(parts))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from streamer.cli.main import parse_size

    p = argparse.ArgumentParser(
        prog="python -m streamer mirror",
        description="Keep quantized copies of Hub models up to date. Each job in JOBS_FILE is "
        "skipped when its target already holds a conversion of the source's current commit with "
        "the same settings (read from the target's model card); otherwise it is converted and "
        "published as one new commit (or PR). Exit code 1 when any job failed.",
    )
    p.add_argument("jobs_file", metavar="JOBS_FILE", help="TOML file with [defaults] and [[job]] tables")
    p.add_argument("--only", action="append", metavar="NAME", help="run only this job (repeatable, or comma-separated)")
    p.add_argument("--dry-run", action="store_true",
                   help="check every job and plan the ones that would run (headers only); publish nothing")
    p.add_argument("--parallel", type=int, default=1, metavar="N", help="jobs converted at once (default 1)")
    p.add_argument("--max-memory", type=parse_size, metavar="SIZE",
                   help="byte budget shared by all concurrent conversions (default: half the free RAM)")
    p.add_argument("--device", default="auto", help="default device for jobs: auto, cpu, cuda or cuda:N")
    p.add_argument("--workers", type=int, default=4, help="pieces fetched concurrently per conversion (default 4)")
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
    from streamer.cli.main import _setup_logging

    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    _setup_logging(args.quiet, args.verbose, json=args.json)  # --quiet: the summary and errors only
    if not args.verbose:  # per-job lines come from streamer.mirror.main; the engine's chatter stays quiet
        logging.getLogger("streamer").setLevel(logging.WARNING if not (args.quiet or args.json) else logging.ERROR)
        logging.getLogger("streamer.mirror.main").setLevel(logging.WARNING if (args.quiet or args.json) else logging.INFO)
        for noisy in ("httpx", "httpx2", "httpcore"):  # one INFO line per HTTP request otherwise
            logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        jobs = select_jobs(load_jobs(args.jobs_file), args.only)
        if args.workers < 1:
            raise StreamerError("--workers must be at least 1")
        runner = MirrorRunner(
            token=args.token or None, dry_run=args.dry_run, parallel=args.parallel,
            max_memory=args.max_memory, device=args.device, workers=args.workers,
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
    except StreamerError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted: running conversions were cancelled, nothing half-done was published", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(summary(results), indent=2))
    else:
        print(render_table(results))
    if runner.cancel.is_set():
        return 130
    return 0 if all(r.ok for r in results) else 1

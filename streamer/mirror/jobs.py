"""The jobs file: what each mirroring job converts, read from TOML and checked as a whole.

    [defaults]                      # optional; any job key except name/source/target
    scheme = "FP8_DYNAMIC"
    ignore = ["lm_head"]

    [[job]]
    name = "llama-fp8"
    source = "meta-llama/Llama-3.1-8B-Instruct"     # org/name[@revision]
    target = "acme/Llama-3.1-8B-Instruct-FP8"       # org/name[@branch]

Every problem in the file is listed at once (`JobsFileError`), before any job runs. Checking a
file imports neither torch nor compressed-tensors for the schemes `streamer.formats` knows, so
a run that finds everything up to date starts in a fraction of a second.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from streamer.io.provenance import Provenance, policy_flags
from streamer.errors import StreamerError
from streamer.formats import (
    DATA_FREE_SCHEMES,
    DEQUANT_DTYPES,
    NONFINITE_POLICIES,
    is_commit_sha,
    is_repo_spec,
    split_revision,
)
from streamer.mirror.wording import describe

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    try:
        import tomli as tomllib  # type: ignore[no-redef]
    except ModuleNotFoundError:
        tomllib = None  # type: ignore[assignment]

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
    "nonfinite": (str, 'a weight holding NaN/Inf: "refuse" stops the job naming it (default), '
                       '"passthrough" quantizes it as it is'),
}
DEFAULT_KEYS = {k: v for k, v in JOB_KEYS.items() if k not in ("name", "source", "target")}
TOP_KEYS = ("defaults", "job")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


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
class MirrorJob:
    """One [[job]] of a jobs file, checked and with [defaults] applied."""

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
    nonfinite: str | None = None  # None: the policy of the calling context (refuse unless set)

    @property
    def policy(self) -> tuple[str, ...]:
        """The non-default policy choices, named as the model card records them."""
        flags = policy_flags(self.default_ignore, self.quantize_towers, self.skip_incompatible)
        return tuple(f.lstrip("-") for f in flags)

    @property
    def policy_kwargs(self) -> dict:
        """The policy as `convert()`'s keyword arguments."""
        return {
            "default_ignore": self.default_ignore,
            "quantize_towers": self.quantize_towers,
            "skip_incompatible": self.skip_incompatible,
        }

    @property
    def source_spec(self) -> str:
        """The source as `org/name[@revision]`."""
        return self.source + (f"@{self.source_revision}" if self.source_revision else "")

    @property
    def target_spec(self) -> str:
        """The target as `org/name[@branch]`."""
        return self.target + (f"@{self.target_revision}" if self.target_revision else "")

    def settings_key(self, dequant_dtype: str | None) -> str:
        """The `settings` hash streamer writes into the card, computed the same way.

        :param dequant_dtype: the dequantization dtype the card is compared under (the one the
            conversion used, which the job may leave to streamer)."""
        return Provenance(
            source=self.source, source_commit=None, scheme=self.scheme,
            ignore=tuple(self.ignore), dequant_dtype=dequant_dtype, policy=self.policy,
        ).settings_key()  # fmt: skip


def load_jobs(path: str | os.PathLike) -> list[MirrorJob]:
    """The jobs of the TOML file at PATH; raises JobsFileError listing every problem.

    :param path: the jobs file (see the module docstring for its format)."""
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
    spec = spec.strip()
    if not is_repo_spec(spec):
        return None, None, f"{key} {spec!r} is not a Hub repo id (org/name, optionally @revision)"
    repo, rev = split_revision(spec)
    return repo, rev, None


def _is_pattern(entry: str) -> bool:
    if not entry.startswith("re:"):
        return True
    try:
        re.compile(entry[3:])
    except re.error:
        return False
    return True


def _scheme_and_ignore(scheme: str, ignore: list[str]) -> tuple[str, tuple[str, ...]]:
    """The scheme's canonical name and the ignore entries, as the model card records them.

    A preset that `streamer.formats` knows to be data-free, with valid patterns, needs no more
    checking; anything else is checked by compressed-tensors itself (which imports torch), so an
    unknown scheme or a bad pattern is refused in its words."""
    name = scheme.upper()
    if name in DATA_FREE_SCHEMES and all(map(_is_pattern, ignore)):
        return name, tuple(ignore)
    from streamer.quant.schemes import make_recipe

    recipe = make_recipe(scheme, ignore=list(ignore))
    return recipe.name, tuple(recipe.ignore)


def parse_jobs(data: dict, *, origin: str = "jobs file") -> list[MirrorJob]:
    """Check a parsed jobs file and build its jobs; raises JobsFileError listing every problem.

    :param data: the TOML document, as `tomllib` reads it.
    :param origin: what the problems are said to be in (the file's path)."""
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

    jobs: list[MirrorJob] = []
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
            elif target_rev and (target_rev.startswith("refs/") or is_commit_sha(target_rev)):
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
        nonfinite = merged.get("nonfinite")
        if nonfinite is not None and nonfinite not in NONFINITE_POLICIES:
            problems.append(f"{label}: nonfinite {nonfinite!r}: use one of {', '.join(NONFINITE_POLICIES)}")
        dq = merged.get("dequant_dtype")
        if dq is not None and dq not in DEQUANT_DTYPES:
            problems.append(f"{label}: dequant_dtype {dq!r}: use one of {', '.join(DEQUANT_DTYPES)}")
        scheme = None
        if "scheme" in merged:
            try:
                scheme, ignore = _scheme_and_ignore(merged["scheme"], list(merged.get("ignore", [])))
            except StreamerError as e:
                problems.append(f"{label}: {describe(e)}")
        if len(problems) > before or scheme is None:
            continue
        jobs.append(MirrorJob(
            name=name, source=source, target=target, scheme=scheme,
            ignore=ignore, source_revision=source_rev, target_revision=target_rev,
            private=merged.get("private"), create_pr=merged.get("create_pr", False),
            dequant_dtype=dq, device=merged.get("device"), overwrite=merged.get("overwrite", False),
            default_ignore=merged.get("default_ignore", True), quantize_towers=merged.get("quantize_towers", False),
            skip_incompatible=merged.get("skip_incompatible", False), nonfinite=nonfinite,
        ))  # fmt: skip
    if problems:
        raise JobsFileError(origin, problems)
    return jobs


def select_jobs(jobs: list[MirrorJob], only: list[str] | None) -> list[MirrorJob]:
    """The jobs named in ONLY (all of JOBS when it is empty), in the file's order.

    :param jobs: the jobs of the file.
    :param only: names, each item possibly comma-separated (as `--only` gives them)."""
    if not only:
        return list(jobs)
    wanted = [n.strip() for item in only for n in item.split(",") if n.strip()]
    known = {j.name for j in jobs}
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise StreamerError(f"--only: no job named {', '.join(map(repr, unknown))}; jobs: {', '.join(sorted(known))}")
    return [j for j in jobs if j.name in wanted]

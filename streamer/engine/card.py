"""The model card written next to the quantized weights, and the provenance it records.

The front matter carries `base_model` / `base_model_relation: quantized` (so the Hub links the
source) and a `streamer` block with the exact source commit and settings; mirroring jobs read that
block back to decide whether a target is already up to date.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import yaml

from streamer import __version__
from streamer.engine.progress import human_bytes

if TYPE_CHECKING:  # the plan brings torch and compressed-tensors; reading a card needs neither
    from streamer.engine.plan import Plan


def policy_flags(default_ignore: bool = True, quantize_towers: bool = False, skip_incompatible: bool = False) -> tuple[str, ...]:
    """The non-default choices of the default policy, as the CLI flags that ask for them."""
    return tuple(
        flag
        for flag, on in (
            ("--no-default-ignore", not default_ignore),
            ("--quantize-towers", quantize_towers),
            ("--skip-incompatible", skip_incompatible),
        )
        if on
    )


@dataclass(frozen=True)
class Provenance:
    source: str  # repo id or local path
    source_commit: str | None
    scheme: str
    ignore: tuple[str, ...]
    streamer_version: str = __version__
    dequant_dtype: str | None = None
    # non-default choices of the default policy, as flag names: no-default-ignore,
    # quantize-towers, skip-incompatible (empty: embeddings, head, routers, towers kept)
    policy: tuple[str, ...] = ()

    def settings_key(self) -> str:
        """What must match for an existing conversion to count as up to date.

        The policy is always part of it, so conversions written before streamer kept
        embeddings, heads and routers unquantized by default count as out of date once."""
        blob = json.dumps(
            {
                "scheme": self.scheme,
                "ignore": list(self.ignore),
                "dequant_dtype": self.dequant_dtype,
                "policy": list(self.policy),
            },
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ignore"] = list(self.ignore)
        d["policy"] = list(self.policy)
        d["settings"] = self.settings_key()
        return d


def front_matter(readme: str | None) -> dict:
    """The YAML front matter of a model card, or {} when it has none or it is not a mapping."""
    if not readme or not readme.startswith("---"):
        return {}
    end = readme.find("\n---", 3)
    if end < 0:
        return {}
    try:
        meta = yaml.safe_load(readme[3:end])
    except yaml.YAMLError:
        return {}
    return meta if isinstance(meta, dict) else {}


def read_provenance(readme: str) -> dict | None:
    """The `streamer` block of a model card's front matter, or None."""
    block = front_matter(readme).get("streamer")
    return block if isinstance(block, dict) else None


# Front-matter keys of the source's model card that describe the model itself, not this copy:
# the quantized model keeps them (its license terms above all).
CARRIED_KEYS = ("license", "license_name", "license_link", "language", "pipeline_tag", "library_name", "datasets", "tags")


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _is_repo(name: str) -> bool:
    return "/" in name and not name.startswith(("/", "."))


def card_metadata(prov: Provenance, scheme: str, source_card: str | None) -> dict:
    """Front matter: the source card's descriptive keys, base_model (a Hub source), our tags."""
    carried = {k: v for k, v in front_matter(source_card).items() if k in CARRIED_KEYS and v not in (None, "", [])}
    meta: dict = {}
    if _is_repo(prov.source):
        meta["base_model"] = prov.source
        meta["base_model_relation"] = "quantized"
    for key in CARRIED_KEYS:
        if key == "tags":
            ours = ["compressed-tensors", scheme.lower(), "quantized", "streamer"]
            meta["tags"] = list(dict.fromkeys([*map(str, _as_list(carried.get("tags"))), *ours]))
        elif key == "library_name":
            meta["library_name"] = carried.get("library_name", "transformers")
        elif key in carried:
            meta[key] = carried[key]
    meta["streamer"] = prov.to_dict()
    return meta


def _policy_rows(plan: Plan) -> list[str]:
    from streamer.engine.plan import INCOMPATIBLE

    rows = []
    defaults = [r for r in plan.kept_by_policy if r.rule != INCOMPATIBLE]
    if defaults:
        kept = ", ".join(f"{r.rule} ({len(r.modules)})" for r in defaults)
        rows.append(f"| kept unquantized by default | {kept} |")
    for r in plan.kept_by_policy:
        if r.rule == INCOMPATIBLE:
            rows.append(f"| kept unquantized, shapes the scheme cannot serve | {len(r.modules)} ({r.why}) |")
    if plan.unexpected:
        quantized = ", ".join(f"{r.rule} ({len(r.modules)})" for r in plan.unexpected)
        rows.append(f"| quantized although engines expect them unquantized | {quantized} |")
    return rows


def model_card(plan: Plan, prov: Provenance, *, target: str, source_card: str | None = None) -> str:
    """The output's README.md. TARGET is a repo id, or a local folder's name (never a path);
    SOURCE_CARD is the source's README.md, whose descriptive metadata (license …) is kept."""
    scheme = plan.recipe.name
    front = yaml.safe_dump(card_metadata(prov, scheme, source_card), sort_keys=False, allow_unicode=True).strip()
    is_repo = _is_repo(prov.source)
    groups = plan.recipe.output_groups(plan.kept_groups)  # a stacked source's groups too
    fmt = ", ".join(sorted({str(g.format) for g in groups.values()}))
    source_line = f"[{prov.source}](https://huggingface.co/{prov.source})" if is_repo else f"`{prov.source}`"
    commit = f" at commit `{prov.source_commit}`" if prov.source_commit else ""
    ignore = ", ".join(f"`{i}`" for i in plan.config_ignore) or "none"
    # a local folder is named relative to where the reader stands, never by an absolute path
    serve = target if _is_repo(target) else f"./{target}"
    src_arg = prov.source if is_repo else f"./{prov.source}"
    flags = "".join(f" {f}" for f in plan.effective_flags())
    lines = [
        f"---\n{front}\n---",
        "",
        f"# {target.rsplit('/', 1)[-1]}",
        "",
        f"{scheme} quantization of {source_line}{commit}, in the compressed-tensors format "
        f"(`{fmt}`), made with streamer {prov.streamer_version}.",
        "",
        "| | |",
        "|---|---|",
        f"| source | {source_line}{commit} |",
        f"| scheme | `{scheme}` |",
        f"| ignored modules (`quantization_config.ignore`) | {ignore} |",
        *_policy_rows(plan),
        f"| quantized weights | {plan.n_quantized} |",
        f"| size | {human_bytes(plan.bytes_in)} → {human_bytes(plan.bytes_out)} |",
    ]
    if plan.dequant:
        lines.append(f"| source format | {plan.dequant} |")
    if plan.stacked:
        kept = ", ".join(f"`{g}` ({len(ms)} modules)" for g, ms in plan.stacked.items())
        lines.append(f"| stacked: the source's quantization kept as stored | {kept} |")
    if plan.fused_sets:
        lines.append(f"| fused sets sharing a global scale | {len(plan.fused_sets)} |")
    lines += [
        "",
        "## Serve it with vLLM",
        "",
        "```bash",
        f"vllm serve {serve}",
        "```",
        "",
        "## Reproduce",
        "",
        "```bash",
        # the distribution is streamer-quant: `pip install streamer` is an unrelated project
        f"pip install 'streamer-quant[xet]=={prov.streamer_version}'",
        f"python -m streamer {src_arg}{'@' + prov.source_commit if prov.source_commit else ''} "
        f"{serve} --scheme {scheme}" + "".join(f" --ignore '{i}'" for i in prov.ignore) + flags,
        "```",
        "",
    ]
    return "\n".join(lines)

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

from . import __version__
from .progress import human_bytes

if TYPE_CHECKING:  # the plan brings torch and compressed-tensors; reading a card needs neither
    from .plan import Plan


@dataclass(frozen=True)
class Provenance:
    source: str  # repo id or local path
    source_commit: str | None
    scheme: str
    ignore: tuple[str, ...]
    streamer_version: str = __version__
    dequant_dtype: str | None = None

    def settings_key(self) -> str:
        """What must match for an existing conversion to count as up to date."""
        blob = json.dumps(
            {"scheme": self.scheme, "ignore": list(self.ignore), "dequant_dtype": self.dequant_dtype},
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ignore"] = list(self.ignore)
        d["settings"] = self.settings_key()
        return d


def read_provenance(readme: str) -> dict | None:
    """The `streamer` block of a model card's front matter, or None."""
    if not readme.startswith("---"):
        return None
    end = readme.find("\n---", 3)
    if end < 0:
        return None
    try:
        meta = yaml.safe_load(readme[3:end])
    except yaml.YAMLError:
        return None
    block = meta.get("streamer") if isinstance(meta, dict) else None
    return block if isinstance(block, dict) else None


def model_card(plan: Plan, prov: Provenance, *, target: str) -> str:
    scheme = plan.recipe.name
    meta = {
        "library_name": "transformers",
        "tags": ["compressed-tensors", scheme.lower(), "quantized", "streamer"],
        "streamer": prov.to_dict(),
    }
    is_repo = "/" in prov.source and not prov.source.startswith(("/", "."))
    if is_repo:
        meta = {"base_model": prov.source, "base_model_relation": "quantized", **meta}
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).strip()
    groups = plan.recipe.groups
    fmt = ", ".join(sorted({str(g.format) for g in groups.values()}))
    source_line = f"[{prov.source}](https://huggingface.co/{prov.source})" if is_repo else f"`{prov.source}`"
    commit = f" at commit `{prov.source_commit}`" if prov.source_commit else ""
    ignore = ", ".join(f"`{i}`" for i in prov.ignore) or "none"
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
        f"| ignored modules | {ignore} |",
        f"| quantized weights | {plan.n_quantized} |",
        f"| size | {human_bytes(plan.bytes_in)} → {human_bytes(plan.bytes_out)} |",
    ]
    if plan.dequant:
        lines.append(f"| source format | {plan.dequant} |")
    if plan.fused_sets:
        lines.append(f"| fused sets sharing a global scale | {len(plan.fused_sets)} |")
    lines += [
        "",
        "## Serve it with vLLM",
        "",
        "```bash",
        f"vllm serve {target}",
        "```",
        "",
        "## Reproduce",
        "",
        "```bash",
        f"python -m streamer {prov.source}{'@' + prov.source_commit if prov.source_commit else ''} "
        f"{target} --scheme {scheme}" + "".join(f" --ignore '{i}'" for i in prov.ignore),
        "```",
        "",
    ]
    return "\n".join(lines)

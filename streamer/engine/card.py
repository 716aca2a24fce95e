"""The model card written next to the quantized weights.

The front matter carries `base_model` / `base_model_relation: quantized` (so the Hub links the
source) and a `streamer` block with the exact source commit and settings (its format is
`streamer.io.provenance`: the sinks and mirroring read that block back to decide whether a
target is already up to date).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import yaml

from streamer.formats import human_bytes
from streamer.io.provenance import Provenance, front_matter

if TYPE_CHECKING:  # the plan brings torch and compressed-tensors; reading a card needs neither
    from streamer.engine.plan import Plan
    from streamer.engine.quality import QualityReport


# Front-matter keys of the source's model card that describe the model itself, not this copy:
# the quantized model keeps them (its license terms above all).
CARRIED_KEYS = ("license", "license_name", "license_link", "language", "pipeline_tag", "library_name", "datasets", "tags")


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _plain(value):
    """VALUE when it is what a card's descriptive key holds: a short string, number or boolean, or
    a short list of them; None for anything else. A source card is anyone's text: a nested value
    (a YAML alias bomb, a few hundred bytes that unfold to gigabytes once walked) is not carried."""

    def scalar(v) -> bool:
        return isinstance(v, (str, int, float, bool)) and len(str(v)) <= 200

    if scalar(value):
        return value
    if isinstance(value, list) and len(value) <= 100 and all(scalar(v) for v in value):
        return list(value)
    return None


def _is_repo(name: str) -> bool:
    return "/" in name and not name.startswith(("/", "."))


def card_metadata(prov: Provenance, scheme: str, source_card: str | None) -> dict:
    """Front matter: the source card's descriptive keys, base_model (a Hub source), our tags."""
    found = front_matter(source_card)
    carried = {k: _plain(found[k]) for k in CARRIED_KEYS if k in found}
    carried = {k: v for k, v in carried.items() if v not in (None, "", [])}
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


def _quality_section(quality: QualityReport) -> list[str]:
    from streamer.engine.quality import card_section  # torch comes with it: only for a run's card

    return card_section(quality)


def model_card(
    plan: Plan, prov: Provenance, *, target: str, source_card: str | None = None, quality: QualityReport | None = None
) -> str:
    """The output's README.md. TARGET is a repo id, or a local folder's name (never a path);
    SOURCE_CARD is the source's README.md, whose descriptive metadata (license …) is kept;
    QUALITY, the run's quality report, adds its "Quantization error" section."""
    scheme = plan.recipe.name
    front = yaml.safe_dump(card_metadata(prov, scheme, source_card), sort_keys=False, allow_unicode=True).strip()
    is_repo = _is_repo(prov.source)
    groups = plan.recipe.output_groups(plan.kept_groups)  # a stacked source's groups too
    fmt = ", ".join(sorted({str(g.format) for g in groups.values()}))
    if is_repo:  # on the Hub the card is read on: huggingface.co, or the HF_ENDPOINT this run talks to
        from streamer.io.hub_http import hub_endpoint

        source_line = f"[{prov.source}]({hub_endpoint()}/{prov.source})"
    else:
        source_line = f"`{prov.source}`"
    commit = f" at commit `{prov.source_commit}`" if prov.source_commit else ""
    ignore = ", ".join(f"`{i}`" for i in plan.config_ignore) or "none"
    # a local folder is named relative to where the reader stands, never by an absolute path
    serve = target if _is_repo(target) else f"./{target}"
    src_arg = prov.source if is_repo else f"./{prov.source}"
    flags = "".join(f" {f}" for f in plan.effective_flags())
    if prov.nonfinite:  # without it the same command stops at the first of those weights
        flags += " --nonfinite passthrough"
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
    if prov.nonfinite:
        names = ", ".join(f"`{n}`" for n in prov.nonfinite)
        lines.append(f"| quantized as they were, holding NaN or Inf (`--nonfinite passthrough`) | {names} |")
    lines += [
        "",
        "## Serve it with vLLM",
        "",
        "```bash",
        f"vllm serve {serve}",
        "```",
        "",
        *(_quality_section(quality) if quality is not None else []),
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

"""Sensible defaults for a conversion, from a source's config.json and its tensor headers.

Pure functions (no I/O): the Space and the CLI read the config and the catalog, then ask here
which modules to leave unquantized, what to call the target repo, and what a scheme is for.

Ignore entries use the recipe's syntax: a plain string is an exact module name, `re:PATTERN` is
`re.match` on the module name (anchored at the start only).
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable

__all__ = [
    "Suggestion",
    "WeightInfo",
    "architecture",
    "is_moe",
    "is_multimodal",
    "scheme_blurb",
    "suggest_ignore",
    "suggest_repo_name",
    "parse_ignore",
    "format_ignore",
]

# (module name, shape, safetensors dtype) of one tensor named `<module>.weight`
WeightInfo = tuple[str, tuple[int, ...], str]

LM_HEAD = "lm_head"
EMBEDDINGS = ("re:.*embed_tokens$", "re:.*wte$", "re:.*wpe$", "re:.*word_embeddings$")
ROUTERS = ("re:.*mlp.gate$", "re:.*block_sparse_moe.gate$", "re:.*router", "re:.*shared_expert_gate$")
TOWERS = (
    "re:.*vision_tower.*",
    "re:.*vision_model.*",
    "re:.*visual.*",
    "re:.*multi_modal_projector.*",
    "re:.*mm_projector.*",
    "re:.*audio_tower.*",
)

_MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size", "num_experts_per_tok")
_TOWER_KEYS = ("vision_config", "audio_config", "vision_tower", "mm_vision_tower")


@dataclass
class Suggestion:
    ignore: list[str]  # entries, in display order
    notes: list[str] = field(default_factory=list)  # one sentence each, for the user
    incompatible: list[str] = field(default_factory=list)  # modules the scheme cannot quantize


def _configs(config: dict | None) -> list[dict]:
    """The config and its nested text config (multimodal models keep the LM under text_config)."""
    if not isinstance(config, dict):
        return []
    out = [config]
    for key in ("text_config", "language_config", "llm_config"):
        sub = config.get(key)
        if isinstance(sub, dict):
            out.append(sub)
    return out


def architecture(config: dict | None) -> str:
    """`LlamaForCausalLM` (or the model_type, or "unknown")."""
    if not isinstance(config, dict):
        return "unknown"
    archs = config.get("architectures")
    if isinstance(archs, list) and archs and isinstance(archs[0], str):
        return archs[0]
    return str(config.get("model_type") or "unknown")


def is_moe(config: dict | None) -> bool:
    for c in _configs(config):
        for key in _MOE_KEYS:
            value = c.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return True
        if "moe" in str(c.get("model_type", "")).lower():
            return True
    return False


def is_multimodal(config: dict | None) -> bool:
    return any(isinstance(c, dict) and any(c.get(k) for k in _TOWER_KEYS) for c in _configs(config))


def _matches(module: str, entry: str) -> bool:
    if entry.startswith("re:"):
        return re.match(entry[3:], module) is not None
    return module == entry


def _candidates(config: dict | None) -> list[tuple[str, str]]:
    """(entry, why) worth ignoring for this architecture, before looking at any tensor."""
    out = [(LM_HEAD, "output head: quality is most sensitive here")]
    out += [(e, "embeddings are a lookup table, not a Linear layer") for e in EMBEDDINGS]
    if config is None or is_moe(config):
        out += [(e, "MoE router: tiny and precision-critical") for e in ROUTERS]
    if config is None or is_multimodal(config):
        out += [(e, "vision/audio tower or projector: not served quantized") for e in TOWERS]
    return out


def _quantizable(weights: Iterable[WeightInfo]) -> list[WeightInfo]:
    """The weights a recipe could match: `<module>.weight`, 2-D, module not a norm."""
    return [(m, tuple(s), d) for m, s, d in weights if len(s) == 2 and not m.endswith("norm")]


def _group_key(module: str) -> str:
    return re.sub(r"(?<=\.)\d+(?=\.|$)", "#", module)


def _regex_for(key: str) -> str:
    return "re:" + re.escape(key).replace("\\#", "#").replace("#", r"\d+") + "$"


def _compress(bad: list[str], all_modules: list[str]) -> list[str]:
    """`re:model\\.layers\\.\\d+\\.mlp\\.down_proj$` when every layer's module is in BAD, else names."""
    total: dict[str, int] = defaultdict(int)
    for m in all_modules:
        total[_group_key(m)] += 1
    by_key: dict[str, list[str]] = defaultdict(list)
    for m in bad:
        by_key[_group_key(m)].append(m)
    out = []
    for key, members in by_key.items():
        if len(members) > 1 and len(members) == total[key]:
            out.append(_regex_for(key))
        else:
            out.extend(sorted(members))
    return out


def suggest_ignore(
    config: dict | None,
    weights: Iterable[WeightInfo] | None = None,
    scheme: str | None = None,
) -> Suggestion:
    """Default ignore list for a source, and why.

    config: the source's config.json (None when unknown: every generic pattern is suggested).
    weights: (module, shape, dtype) of the checkpoint's `.weight` tensors, from the catalog
      (3-D fused experts already split per expert); when given, only entries that match some
      quantizable module are kept, and with SCHEME, modules whose shapes the scheme cannot
      handle are added.
    scheme: a preset name (e.g. "NVFP4A16").
    """
    notes: list[str] = []
    arch = architecture(config)
    candidates = _candidates(config)
    if weights is None:
        ignore = [e for e, _ in candidates]
        return Suggestion(ignore=ignore, notes=notes)

    weights = _quantizable(weights)
    modules = [m for m, _, _ in weights]
    ignore = [e for e, _ in candidates if e == LM_HEAD or any(_matches(m, e) for m in modules)]
    reasons = {e: why for e, why in candidates}
    for e in ignore:
        if e != LM_HEAD:
            hits = sum(1 for m in modules if _matches(m, e))
            notes.append(f"{e}: {reasons[e]} ({hits} module{'s' if hits != 1 else ''})")

    incompatible: list[str] = []
    if scheme:
        incompatible, why = _shape_problems(weights, ignore, scheme)
        remaining = [m for m in modules if not any(_matches(m, e) for e in ignore)]
        if incompatible and len(incompatible) == len(remaining):
            notes.append(
                f"{scheme} cannot quantize any weight of this {arch}: {why}. Pick another scheme "
                "(FP8_DYNAMIC has no shape constraint)"
            )
        elif incompatible:
            entries = _compress(incompatible, modules)
            ignore.extend(entries)
            notes.append(
                f"{len(incompatible)} weight(s) have shapes {scheme} cannot handle and are left "
                f"unquantized ({why}): {', '.join(entries[:4])}{' …' if len(entries) > 4 else ''}"
            )
    return Suggestion(ignore=ignore, notes=notes, incompatible=incompatible)


def _shape_problems(weights: list[WeightInfo], ignore: list[str], scheme: str) -> tuple[list[str], str]:
    """Modules the scheme would quantize but cannot (shape), and the first reason."""
    from .errors import StreamerError
    from .plan import TORCH_DTYPES
    from .kernels import ShapeError, output_layout
    from .schemes import make_recipe

    try:
        recipe = make_recipe(scheme, ignore=ignore)
    except StreamerError:
        return [], ""
    bad, first = [], ""
    for module, shape, dtype in weights:
        matched = recipe.match(module)
        if matched is None or dtype not in TORCH_DTYPES:
            continue
        try:
            output_layout(shape, TORCH_DTYPES[dtype], matched[1])
        except ShapeError as e:
            bad.append(module)
            if not first:
                first = str(e).split(";")[0]
        except ValueError:
            continue
    return bad, first


# --- names -------------------------------------------------------------------------------------


def suggest_repo_name(source: str, scheme: str) -> str:
    """`meta-llama/Llama-3-8B@main` + NVFP4A16 -> `Llama-3-8B-NVFP4A16` (within the Hub's 96 chars)."""
    name = source.strip().split("@", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    name = re.sub(r"[^\w.-]+", "-", name).strip("-.") or "model"
    suffix = f"-{scheme.upper()}" if scheme else ""
    if suffix and name.upper().endswith(suffix.upper()):
        suffix = ""
    return (name[: 96 - len(suffix)] + suffix).strip("-.")


def parse_ignore(text: str | Iterable[str] | None) -> list[str]:
    """Entries from a textbox: one per line or comma-separated; blank lines and `#` comments dropped.

    A comma inside a `re:` pattern (e.g. `{1,3}`) is kept: such entries must stand on their own line.
    """
    if text is None:
        return []
    if not isinstance(text, str):
        return [str(t).strip() for t in text if str(t).strip()]
    out: list[str] = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip() if not line.strip().startswith("re:") else line.strip()
        if not line:
            continue
        parts = [line] if line.startswith("re:") else [p.strip() for p in line.split(",")]
        out.extend(p for p in parts if p and p not in out)
    return out


def format_ignore(entries: Iterable[str]) -> str:
    return "\n".join(entries)


# --- schemes -----------------------------------------------------------------------------------

# One line each: what the scheme stores, and what serves it (vLLM kernels).
_BLURBS = {
    "FP8_DYNAMIC": "FP8 weights (per channel) and FP8 activations quantized on the fly; ~2x smaller. "
    "Native on Hopper/Ada/Blackwell (H100, L4, B200); weight-only FP8 Marlin on Ampere (A100).",
    "FP8_BLOCK": "FP8 weights in 128x128 blocks, dynamic FP8 activations (DeepSeek-V3 style); ~2x smaller. "
    "Hopper/Blackwell (H100, H200, B200).",
    "NVFP4A16": "FP4 weights, groups of 16 with FP8 scales + a global scale, 16-bit activations; ~3.5x smaller. "
    "Native on Blackwell (B200, RTX 50xx); Marlin weight-only kernels on Ampere/Hopper.",
    "W4A16": "INT4 weights, groups of 128, 16-bit activations; ~3.5x smaller. Marlin/Machete kernels on "
    "Ampere and newer (A10G, A100, L4, H100); good for small-batch latency.",
    "W4A16_ASYM": "INT4 weights with zero points, groups of 128, 16-bit activations; ~3.5x smaller. "
    "Marlin kernels on Ampere and newer.",
    "W8A16": "INT8 weights, groups of 128, 16-bit activations; ~2x smaller, near-lossless. Marlin kernels "
    "on Ampere and newer.",
    "W8A8": "INT8 weights (per channel) and INT8 activations quantized per token on the fly; ~2x smaller. "
    "Turing and newer (T4, A10G, A100, H100) and CPUs.",
    "INT8": "Same as W8A8: INT8 weights per channel, dynamic INT8 activations. Turing and newer, and CPUs.",
    "W4AFP8": "INT4 weights (groups of 128) with dynamic FP8 activations; ~3.5x smaller. Hopper (H100/H200).",
    "MXFP4A16": "OCP MXFP4 weights (groups of 32, power-of-two scales), 16-bit activations; ~3.5x smaller. "
    "Blackwell and AMD MI350; Marlin fallback elsewhere.",
    "MXFP4": "OCP MXFP4 weights and dynamic MXFP4 activations; ~3.5x smaller. Blackwell / AMD MI350.",
    "MXFP4XFP8": "MXFP4 weights with dynamic FP8 activations. AMD MI350 / Blackwell.",
    "MXFP6A16": "OCP MXFP6 weights, 16-bit activations; ~2.6x smaller. AMD MI350 (experimental elsewhere).",
    "MXFP6A8": "MXFP6 weights with dynamic MXFP8 activations. AMD MI350 (experimental elsewhere).",
    "MXFP8A16": "OCP MXFP8 weights (groups of 32), 16-bit activations; ~2x smaller. Blackwell / AMD MI350.",
    "MXFP8": "OCP MXFP8 weights and dynamic MXFP8 activations; ~2x smaller. Blackwell / AMD MI350.",
}


def scheme_blurb(name: str) -> str:
    """One line: what the scheme stores and what hardware serves it."""
    name = (name or "").upper()
    if name in _BLURBS:
        return _BLURBS[name]
    m = re.fullmatch(r"W(\d)A(\d+)", name)
    if m:
        w, a = m.groups()
        acts = "16-bit activations" if a == "16" else f"dynamic INT{a} activations"
        return (
            f"INT{w} weights (groups of 128) with {acts}; ~{16 / int(w):.1f}x smaller. Experimental: "
            "check that your vLLM build has kernels for it (mostly Ampere+ Marlin for A16)."
        )
    return "A compressed-tensors preset; check your serving engine's support."

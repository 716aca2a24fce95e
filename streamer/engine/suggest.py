"""The front ends' suggestions: the ignore list, repo name and scheme blurb a form is prefilled
with, and reading / writing an ignore list as text.

Pure functions (no I/O, nothing heavy imported until a shape is checked): the Space asks here
what to prefill; what is kept is the default policy's (streamer.engine.policy), named in the
recipe's ignore syntax.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

from streamer.engine.policy import (
    EMBEDDING,
    EMBEDDINGS,
    HEAD,
    LM_HEAD,
    ROUTER,
    ROUTERS,
    RULES,
    TOWER,
    TOWERS,
    WeightInfo,
    default_kept,
    ignore_entries,
    is_moe,
    is_multimodal,
    is_quantizable,
    matches,
)

__all__ = [
    "Suggestion",
    "architecture",
    "scheme_blurb",
    "suggest_ignore",
    "suggest_repo_name",
    "parse_ignore",
    "format_ignore",
]


@dataclass
class Suggestion:
    """What a form is prefilled with: ignore entries, notes for the user, the modules the scheme
    cannot quantize.
    """

    ignore: list[str]  # entries, in display order
    notes: list[str] = field(default_factory=list)  # one sentence each, for the user
    incompatible: list[str] = field(default_factory=list)  # modules the scheme cannot quantize


def architecture(config: dict | None) -> str:
    """The architecture CONFIG (a config.json) declares: `LlamaForCausalLM` (or the model_type,
    or "unknown").
    """
    if not isinstance(config, dict):
        return "unknown"
    archs = config.get("architectures")
    if isinstance(archs, list) and archs and isinstance(archs[0], str):
        return archs[0]
    return str(config.get("model_type") or "unknown")


# --- the Space's suggestion --------------------------------------------------------------------


def _candidates(config: dict | None) -> list[tuple[str, str]]:
    """(entry, rule) worth ignoring for this architecture, before looking at any tensor."""
    out = [(LM_HEAD, HEAD)]
    out += [(e, EMBEDDING) for e in EMBEDDINGS]
    if config is None or is_moe(config):
        out += [(e, ROUTER) for e in ROUTERS]
    if config is None or is_multimodal(config):
        out += [(e, TOWER) for e in TOWERS]
    return out


def _quantizable(weights: Iterable[WeightInfo]) -> list[WeightInfo]:
    """The weights a recipe could match (the policy's is_quantizable), shapes as tuples."""
    return [(m, tuple(s), d) for m, s, d in weights if is_quantizable(m, s)]


def _compress(bad: list[str], all_modules: list[str]) -> list[str]:
    """Entries for BAD that match nothing else of ALL_MODULES (see ignore_entries)."""
    others = set(all_modules) - set(bad)
    return ignore_entries({m: "shape" for m in bad}, others)


def suggest_ignore(
    config: dict | None,
    weights: Iterable[WeightInfo] | None = None,
    scheme: str | None = None,
) -> Suggestion:
    """The ignore list the Space pre-fills: what the default policy keeps, named in few entries.

    config: the source's config.json (None when unknown: every generic pattern is suggested).
    weights: (module, shape, dtype) of the checkpoint's `.weight` tensors, from the catalog
      (3-D fused experts already split per expert); when given, the entries name exactly the
      modules `default_kept` finds, and with SCHEME, modules whose shapes the scheme cannot
      serve are added (what skip_incompatible does in a conversion).
    scheme: a preset name (e.g. "NVFP4A16").
    """
    notes: list[str] = []
    arch = architecture(config)
    if weights is None:
        return Suggestion(ignore=[e for e, _ in _candidates(config)], notes=notes)

    weights = _quantizable(weights)
    modules = [m for m, _, _ in weights]
    kept = default_kept(config, weights, [m + ".weight" for m in modules])
    if LM_HEAD not in kept and LM_HEAD not in modules:
        kept[LM_HEAD] = HEAD  # loaders build an lm_head for causal LMs: say it stays unquantized
    ignore = ignore_entries(kept, [m for m in modules if m not in kept])
    counts: dict[str, int] = defaultdict(int)
    for rule in kept.values():
        counts[rule] += 1
    for rule in RULES:
        if counts[rule] and rule != HEAD:
            n = counts[rule]
            notes.append(f"{rule}: {RULES[rule]} ({n} module{'s' if n != 1 else ''})")

    incompatible: list[str] = []
    if scheme:
        incompatible, why = _shape_problems(weights, ignore, scheme)
        remaining = [m for m in modules if not any(matches(m, e) for e in ignore)]
        if incompatible and len(incompatible) == len(remaining):
            notes.append(
                f"{scheme} cannot quantize any weight of this {arch}: {why}. Pick another scheme "
                "(FP8_DYNAMIC has no shape constraint)"
            )
        elif incompatible:
            entries = _compress(incompatible, modules)
            ignore.extend(entries)
            notes.append(
                f"{len(incompatible)} weight(s) have shapes {scheme} cannot serve and are left "
                f"unquantized ({why}): {', '.join(entries[:4])}{' …' if len(entries) > 4 else ''}"
            )
    return Suggestion(ignore=ignore, notes=notes, incompatible=incompatible)


def _shape_problems(weights: list[WeightInfo], ignore: list[str], scheme: str) -> tuple[list[str], str]:
    """Modules the scheme would quantize but cannot serve (shape), and the first reason."""
    from streamer.engine.plan import shape_problem
    from streamer.errors import StreamerError
    from streamer.formats import DTYPES, torch_dtype
    from streamer.quant.schemes import make_recipe

    try:
        recipe = make_recipe(scheme, ignore=ignore)
    except StreamerError:
        return [], ""
    bad, first = [], ""
    for module, shape, dtype in weights:
        matched = recipe.match(module)
        if matched is None or dtype not in DTYPES:
            continue
        why = shape_problem(shape, torch_dtype(dtype), matched[1])
        if why:
            bad.append(module)
            first = first or why.split(";")[0]
    return bad, first


# --- names -------------------------------------------------------------------------------------


def suggest_repo_name(source: str, scheme: str) -> str:
    """The target repo name for converting SOURCE (`org/name[@rev]` or a folder) with SCHEME:
    `meta-llama/Llama-3-8B@main` + NVFP4A16 -> `Llama-3-8B-NVFP4A16` (within the Hub's 96 chars).
    """
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
    """ENTRIES as a textbox holds them, one per line (parse_ignore reads them back)."""
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
    """One line for the preset NAME: what the scheme stores and what hardware serves it."""
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

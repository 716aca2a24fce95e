"""The default policy for a conversion, and other sensible defaults, from a source's config.json
and its tensor headers.

Pure functions (no I/O): the plan asks here which modules a default conversion keeps
unquantized (one policy for the CLI, the Python API, mirroring jobs and the Space), and how to
name a set of modules with a few ignore entries; the Space also asks what to call the target
repo and what a scheme is for.

Serving engines load only Linear layers in compressed-tensors form, so a default conversion
keeps unquantized, found by role from the config and the tensor names (never by model name):
embedding tables, the output head, MoE routers, and vision/audio towers with their multimodal
projectors.

Ignore entries use the recipe's syntax: a plain string is an exact module name, `re:PATTERN` is
`re.match` on the module name (anchored at the start only).
"""

from __future__ import annotations

import difflib
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

__all__ = [
    "RULES",
    "Suggestion",
    "WeightInfo",
    "architecture",
    "close_modules",
    "default_kept",
    "ignore_entries",
    "is_moe",
    "is_multimodal",
    "matches",
    "scheme_blurb",
    "suggest_ignore",
    "suggest_repo_name",
    "parse_ignore",
    "format_ignore",
]

# (module name, shape, safetensors dtype) of one tensor named `<module>.weight`
WeightInfo = tuple[str, tuple[int, ...], str]

# --- the default policy ------------------------------------------------------------------------

EMBEDDING = "embeddings"
HEAD = "output head"
ROUTER = "MoE routers"
TOWER = "vision/audio towers"
#: rule -> why, in the order rules are tried and shown
RULES: dict[str, str] = {
    HEAD: "engines keep the output head in 16 bits (and quality is most sensitive there)",
    EMBEDDING: "lookup tables, not Linear layers: engines load them unquantized",
    ROUTER: "tiny and precision-critical: engines keep routers unquantized",
    TOWER: "vision/audio encoders and multimodal projectors: not served quantized",
}

LM_HEAD = "lm_head"
# Readable patterns, tried first when naming what a rule kept (they also make the Space's
# prefill); each is used only where it matches nothing that is quantized.
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
_READABLE = {HEAD: (LM_HEAD,), EMBEDDING: EMBEDDINGS, ROUTER: ROUTERS, TOWER: TOWERS}

_MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size", "num_experts_per_tok")
_TOWER_KEYS = ("vision_config", "audio_config", "vision_tower", "mm_vision_tower")

# Module leaf names of embedding lookups across architectures (GPT-2 wte/wpe, BLOOM/BERT
# word_embeddings, GPT-NeoX embed_in, Llama-original tok_embeddings, position/type embeddings…).
_EMBED_LEAF = re.compile(r"^(embed_tokens\w*|embed_in|embed_positions|wte|wpe|tok_embeddings|embeddings?|\w+_embeddings?)$")
# Leaf names an output head goes by; all but lm_head only count when the weight has the
# vocabulary's size, since `output` or `head` alone also name ordinary Linears.
_HEAD_LEAVES = ("lm_head", "embed_out", "output", "head", "output_layer")
# Path components of vision/audio encoders and multimodal projectors.
_TOWER_PARTS = {
    "visual", "vision", "audio", "vision_tower", "vision_model", "vision_encoder", "image_encoder",
    "audio_tower", "audio_model", "audio_encoder", "speech_encoder", "multi_modal_projector",
    "mm_projector", "embed_vision", "embed_audio",
}  # fmt: skip


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


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def is_moe(config: dict | None) -> bool:
    for c in _configs(config):
        if any(_positive_int(c.get(key)) for key in _MOE_KEYS):
            return True
        if "moe" in str(c.get("model_type", "")).lower():
            return True
    return False


def is_multimodal(config: dict | None) -> bool:
    return any(isinstance(c, dict) and any(c.get(k) for k in _TOWER_KEYS) for c in _configs(config))


def _vocab_sizes(config: dict | None) -> set[int]:
    return {c["vocab_size"] for c in _configs(config) if _positive_int(c.get("vocab_size"))}


def _tied(config: dict | None) -> bool:
    """The output head shares the embedding's weight (no lm_head tensor is stored).

    transformers defaults tie_word_embeddings to True when a config omits it, but most configs
    that omit it store an lm_head anyway; only an explicit True counts here."""
    return any(c.get("tie_word_embeddings") is True for c in _configs(config))


def matches(module: str, entry: str) -> bool:
    """The recipe's ignore semantics (compressed-tensors' match_name on module names)."""
    if entry.startswith("re:"):
        return re.match(entry[3:], module) is not None
    return module == entry


def _expert_parents(tensor_names: Iterable[str]) -> set[str]:
    """Paths P such that `P.experts.…` exists: the MoE blocks, fused 3-D experts included."""
    out = set()
    for name in tensor_names:
        head, sep, _ = name.partition(".experts.")
        if sep:
            out.add(head)
    return out


def _is_router(module: str, parents: set[str], bias_owners: set[str]) -> bool:
    """A router by role: it owns an `e_score_correction_bias` (DeepSeek, GLM-4 MoE), is named
    `router`, or is (or sits under) a `gate`/`*_gate` of a block that has experts
    (`mlp.gate`, `block_sparse_moe.gate`, `shared_expert_gate`, Hunyuan's `mlp.gate.wg`)."""
    if module in bias_owners:
        return True
    parts = module.split(".")
    for i, part in enumerate(parts):
        if part == "router" or part.endswith("_router"):
            return True
        if (part == "gate" or part.endswith("_gate")) and ".".join(parts[:i]) in parents:
            return True
    return False


def _is_tower(module: str) -> bool:
    return any(
        p in _TOWER_PARTS or p.startswith(("vision_", "audio_")) or p.endswith("_projector")
        for p in module.split(".")
    )


def default_kept(
    config: dict | None,
    weights: Iterable[WeightInfo],
    tensor_names: Iterable[str] = (),
    *,
    towers: bool = True,
) -> dict[str, str]:
    """module -> rule (a key of RULES) for every 2-D weight a default conversion keeps unquantized.

    config: the source's config.json (vocab_size and tie_word_embeddings are read, nested text
      configs included); weights: (module, shape, dtype) of the `.weight` tensors; tensor_names:
      every tensor name (routers are found next to their experts and correction biases).
    towers: False when the user asked to quantize vision/audio towers too.

    A tied output head has no tensor of its own; it is reported as `lm_head` so that loaders,
    which build an lm_head Linear, are told to keep it unquantized.
    """
    weights = [(m, tuple(s), d) for m, s, d in weights if len(s) == 2 and not m.endswith("norm")]
    names = list(tensor_names) or [m + ".weight" for m, _, _ in weights]
    parents = _expert_parents(names)
    bias_owners = {n[: -len(".e_score_correction_bias")] for n in names if n.endswith(".e_score_correction_bias")}
    vocab = _vocab_sizes(config)
    kept: dict[str, str] = {}
    for module, shape, _ in weights:
        leaf = module.rsplit(".", 1)[-1]
        vocab_rows = shape[0] in vocab
        if leaf == LM_HEAD or (vocab_rows and leaf in _HEAD_LEAVES):
            kept[module] = HEAD
        elif _EMBED_LEAF.match(leaf) or vocab_rows:
            kept[module] = EMBEDDING
        elif _is_router(module, parents, bias_owners):
            kept[module] = ROUTER
        elif towers and _is_tower(module):
            kept[module] = TOWER
    if _tied(config) and HEAD not in kept.values():
        kept[LM_HEAD] = HEAD
    return kept


# --- naming a set of modules with few ignore entries -------------------------------------------


def _natural(s: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", s)]


def _group_key(module: str) -> str:
    return re.sub(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.)", "#", module)


def _pattern(key: str, subtree: bool) -> str:
    body = re.escape(key).replace("\\#", "#").replace("#", r"\d+")
    return "re:" + body + (r"\." if subtree else "$")


def _covers_none(entry: str, modules: Iterable[str]) -> bool:
    return not any(matches(m, entry) for m in modules)


def _root(module: str, quantized: set[str], prefixes: set[str]) -> tuple[str, bool]:
    """The shortest dotted prefix of MODULE under which nothing is quantized: (prefix, subtree)."""
    parts = module.split(".")
    for i in range(1, len(parts)):
        p = ".".join(parts[:i])
        if p not in prefixes and p not in quantized:
            return p, True
    return module, False


def _structural(kept: list[str], quantized: set[str]) -> list[str]:
    """Whole subtrees (`re:model\\.visual\\.`), then one regex per layer-indexed family
    (`re:model\\.layers\\.\\d+\\.mlp\\.gate$`), then exact names; none matches QUANTIZED."""
    prefixes = {".".join(q.split(".")[:i]) for q in quantized for i in range(1, q.count(".") + 1)}
    found = {m: _root(m, quantized, prefixes) for m in kept}
    under: dict[str, int] = defaultdict(int)
    for root, _ in found.values():
        under[root] += 1
    # a subtree only pays off when it holds several kept modules; a lone one is named exactly
    # (`…mlp.down_proj`, not "everything under …mlp" that happens to hold nothing else today)
    roots = {(r, True) if sub and under[r] > 1 else (m, False) for m, (r, sub) in found.items()}
    roots = sorted(roots, key=lambda r: _natural(r[0]))
    families: dict[tuple[str, bool], list[str]] = defaultdict(list)
    for root, subtree in roots:
        families[(_group_key(root), subtree)].append(root)
    out = []
    for (key, subtree), members in families.items():
        regex = _pattern(key, subtree)
        if len(members) > 1 and _covers_none(regex, quantized):
            out.append(regex)
        else:
            out += [_pattern(m, True) if subtree else m for m in members]
    return out


def ignore_entries(kept: Mapping[str, str], quantized: Iterable[str]) -> list[str]:
    """A short ignore list that matches every module of KEPT (module -> rule) and no module of
    QUANTIZED: the readable pattern of each rule where it fits, else structural regexes, else
    exact names. Entries come in rule order (RULES, then other reasons)."""
    quantized = set(quantized)
    remaining = dict(kept)
    out: list[str] = []
    rules = list(RULES) + sorted({r for r in kept.values() if r not in RULES})
    for rule in rules:
        for entry in _READABLE.get(rule, ()):
            hits = [m for m, r in remaining.items() if r == rule and matches(m, entry)]
            if hits and _covers_none(entry, quantized):
                out.append(entry)
                remaining = {m: r for m, r in remaining.items() if not matches(m, entry)}
        members = [m for m, r in remaining.items() if r == rule]
        if members:
            out += _structural(members, quantized)
            remaining = {m: r for m, r in remaining.items() if r != rule}
    return out


def close_modules(entry: str, modules: Iterable[str], n: int = 3) -> list[str]:
    """Module names closest to an ignore ENTRY that matches nothing (a typo such as `lm-head`).

    A `re:` entry is compared by its literal text (`re:.*mlp\\.gaet$` -> `mlp.gaet`) with the
    modules' trailing parts, so a pattern meant for every layer still finds `mlp.gate`."""
    modules = list(dict.fromkeys(modules))
    if not entry.startswith("re:"):
        return difflib.get_close_matches(entry, modules, n=n, cutoff=0.6)
    literal = re.sub(r"\\(.)", r"\1", re.sub(r"\.\*|\.\+|[\^$()?+*\[\]{}|]|\\d", "", entry[3:])).strip(".")
    tails: dict[str, None] = {}  # ordered set
    for m in modules:
        parts = m.split(".")
        for k in range(1, min(4, len(parts)) + 1):
            if not parts[-k].isdigit():  # `mlp.gate`, not `1.mlp.gate`
                tails[".".join(parts[-k:])] = None
    return difflib.get_close_matches(literal, list(tails), n=n, cutoff=0.6)


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
    """The weights a recipe could match: `<module>.weight`, 2-D, module not a norm."""
    return [(m, tuple(s), d) for m, s, d in weights if len(s) == 2 and not m.endswith("norm")]


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
      serve are added (what --skip-incompatible does on the command line).
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
    from streamer.errors import StreamerError
    from streamer.engine.plan import TORCH_DTYPES, shape_problem
    from streamer.quant.schemes import make_recipe

    try:
        recipe = make_recipe(scheme, ignore=ignore)
    except StreamerError:
        return [], ""
    bad, first = [], ""
    for module, shape, dtype in weights:
        matched = recipe.match(module)
        if matched is None or dtype not in TORCH_DTYPES:
            continue
        why = shape_problem(shape, TORCH_DTYPES[dtype], matched[1])
        if why:
            bad.append(module)
            first = first or why.split(";")[0]
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

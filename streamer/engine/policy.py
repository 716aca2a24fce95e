"""The default policy of a conversion: which weights are quantized at all, which a default
conversion keeps unquantized, and how to name a set of modules with a few ignore entries.

Pure functions (no I/O), one policy for the CLI, the Python API, mirroring jobs and the Space:
the plan asks here what to keep; the front ends' suggestions (streamer.engine.suggest) ask the
same questions to prefill a form.

Serving engines load only Linear layers in compressed-tensors form, so a default conversion
keeps unquantized, found by role from the config and the tensor names (never by model name):
embedding tables, the output head, MoE routers, and vision/audio towers with their multimodal
projectors.

Ignore entries use the recipe's syntax, matched by compressed-tensors' own `match_name`: a plain
string is an exact module name, `re:PATTERN` is `re.match` on the module name (anchored at the
start only).
"""

from __future__ import annotations

import difflib
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence

from streamer.formats import natural_key

__all__ = [
    "EMBEDDING",
    "EMBEDDINGS",
    "HEAD",
    "LM_HEAD",
    "ROUTER",
    "ROUTERS",
    "RULES",
    "TOWER",
    "TOWERS",
    "WeightInfo",
    "close_modules",
    "default_kept",
    "ignore_entries",
    "is_moe",
    "is_multimodal",
    "is_quantizable",
    "matches",
    "not_quantizable",
]

# (module name, shape, safetensors dtype) of one tensor named `<module>.weight`
WeightInfo = tuple[str, tuple[int, ...], str]

# --- the rules of the default policy ------------------------------------------------------------

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
# A module inside a repeated block (`model.layers.3.`, `h.0.`, `blocks.12.`): an embedding table
# under an unknown name is found by its vocabulary-sized rows only outside such blocks, where a
# Linear whose width happens to equal the vocabulary (a small model) is an ordinary layer.
_NUMBERED_BLOCK = re.compile(r"(^|\.)\d+\.")
# Path components of vision/audio encoders and multimodal projectors.
_TOWER_PARTS = {
    "visual", "vision", "audio", "vision_tower", "vision_model", "vision_encoder", "image_encoder",
    "audio_tower", "audio_model", "audio_encoder", "speech_encoder", "multi_modal_projector",
    "mm_projector", "embed_vision", "embed_audio",
}  # fmt: skip



# --- which weights a recipe may quantize at all ------------------------------------------------


def not_quantizable(module: str, shape: Sequence[int]) -> str | None:
    """Why the weight `MODULE.weight` of SHAPE is never quantized, whatever the recipe; None when
    it may be.

    module: the module name (the tensor name less `.weight`); shape: the weight's shape.
    Returns "" for a norm's weight (kept without a word: never a Linear) and a reason to show for
    a weight that is not 2-D (only Linear weights, (out, in), can be quantized).
    """
    if module.endswith("norm"):
        return ""
    if len(shape) != 2:
        return f"{len(shape)}-D, not a Linear weight"
    return None


def is_quantizable(module: str, shape: Sequence[int]) -> bool:
    """Whether the weight `MODULE.weight` of SHAPE may be quantized at all (see not_quantizable)."""
    return not_quantizable(module, shape) is None


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



def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def is_moe(config: dict | None) -> bool:
    """Whether CONFIG (a config.json, nested text configs included) describes a mixture of experts."""
    for c in _configs(config):
        if any(_positive_int(c.get(key)) for key in _MOE_KEYS):
            return True
        if "moe" in str(c.get("model_type", "")).lower():
            return True
    return False


def is_multimodal(config: dict | None) -> bool:
    """Whether CONFIG (a config.json) declares a vision or audio tower."""
    return any(isinstance(c, dict) and any(c.get(k) for k in _TOWER_KEYS) for c in _configs(config))


def _vocab_sizes(config: dict | None) -> set[int]:
    return {c["vocab_size"] for c in _configs(config) if _positive_int(c.get("vocab_size"))}


def _tied(config: dict | None) -> bool:
    """The output head shares the embedding's weight (no lm_head tensor is stored).

    transformers defaults tie_word_embeddings to True when a config omits it, but most configs
    that omit it store an lm_head anyway; only an explicit True counts here."""
    return any(c.get("tie_word_embeddings") is True for c in _configs(config))



def matches(module: str, entry: str) -> bool:
    """Whether the ignore (or target) ENTRY names MODULE: compressed-tensors' own `match_name`,
    as the recipe and every loader match them (exact name, or `re:PATTERN` with re.match)."""
    from compressed_tensors.utils.match import match_name  # imports torch: only when asked

    return match_name(module, entry)


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
    weights = [(m, tuple(s), d) for m, s, d in weights if is_quantizable(m, s)]
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
        elif _EMBED_LEAF.match(leaf) or (vocab_rows and not _NUMBERED_BLOCK.search(module)):
            kept[module] = EMBEDDING
        elif _is_router(module, parents, bias_owners):
            kept[module] = ROUTER
        elif towers and _is_tower(module):
            kept[module] = TOWER
    if _tied(config) and HEAD not in kept.values():
        kept[LM_HEAD] = HEAD
    return kept


# --- naming a set of modules with few ignore entries -------------------------------------------


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
    roots = sorted(roots, key=lambda r: natural_key(r[0]))
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


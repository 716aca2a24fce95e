"""The plan: for every output shard, which tensors to read, quantize, pass through and write.

Built from the catalog and the recipe alone, before any tensor byte is read, so that every error
a user can hit is raised here with the tensor names in the message. The plan also fixes the exact
name, dtype and shape of every output tensor, so output headers are known up front.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from streamer.engine.policy import (
    HEAD,
    LM_HEAD,
    RULES,
    TOWER,
    close_modules,
    default_kept,
    ignore_entries,
    matches,
    not_quantizable,
)
from streamer.errors import Hint, PlanError
from streamer.formats import (
    FLOAT_DTYPES,
    collapse_names,
    dtype_size,
    human_bytes,
    natural_key,
    safetensors_name,
    torch_dtype,
)
from streamer.io.catalog import Catalog, TensorInfo
from streamer.io.provenance import policy_flags
from streamer.io.source import Span
from streamer.quant.dequant import Dequantizer, PassThrough
from streamer.quant.schemes import Recipe, accepted_presets, make_recipe
from streamer.quant.spec import ShapeError, needs_global_scale, output_layout

# Sibling modules that vLLM fuses into one kernel when it loads the model, so that schemes with a
# global scale (NVFP4) must give them one shared scale. Order matters: the first member present
# is the set's primary, and the whole set is written to the primary's output shard (as the
# reference does for q/k/v and gate/up).
FUSED_FAMILIES: tuple[tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj"),
    ("gate_proj", "up_proj"),
    ("w1", "w3"),
    ("q_a_proj", "kv_a_proj_with_mqa"),
    ("wq_a", "wkv_a_with_mqa"),
)
_FAMILY_OF = {leaf: fam for fam in FUSED_FAMILIES for leaf in fam}

# 3-D fused expert tensors that are split into one 2-D Linear weight per expert, as the reference
# does; vLLM loads the per-expert names.
_EXPERT_SPLITS = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}


@dataclass(frozen=True)
class Policy:
    """What a conversion keeps unquantized besides the user's ignore list (see policy.py)."""

    default_ignore: bool = True  # embeddings, output head, MoE routers, towers (policy.RULES)
    quantize_towers: bool = False  # quantize vision/audio towers and projectors anyway
    skip_incompatible: bool = False  # keep weights of shapes the scheme cannot serve, instead of refusing

    def flags(self) -> tuple[str, ...]:
        """The command-line flags that ask for this policy (empty for the defaults)."""
        return policy_flags(self.default_ignore, self.quantize_towers, self.skip_incompatible)


#: reason recorded for weights kept because the scheme cannot serve their shape
INCOMPATIBLE = "shapes the scheme cannot serve"


@dataclass(frozen=True)
class KeptRule:
    """Modules one rule of the policy kept unquantized (or, defaults off, let through)."""

    rule: str  # a key of policy.RULES, or INCOMPATIBLE
    why: str
    modules: tuple[str, ...]


@dataclass(frozen=True)
class QuantOp:
    """One weight to quantize: its tensor, module, config group and fused set (if any)."""

    tensor: str  # input tensor name, "<module>.weight"
    module: str
    group: str  # config group name in the recipe
    fused: int | None = None  # FusedSet.id when the op shares a global scale


@dataclass(frozen=True)
class OutTensor:
    """One tensor of an output shard, and the input tensor it is made from."""

    name: str
    dtype: str  # safetensors dtype name
    shape: tuple[int, ...]
    origin: str  # the input tensor it is made from

    @property
    def nbytes(self) -> int:
        """Bytes the tensor takes in its output file."""
        return math.prod(self.shape) * dtype_size(self.dtype)


@dataclass(frozen=True)
class FusedSet:
    """Weights vLLM fuses, quantized with one shared global scale into one output shard."""

    id: int
    family: str  # e.g. "q_proj+k_proj+v_proj"
    parent: str  # module path the members share
    members: tuple[str, ...]  # input tensor names, in family order
    shard: str  # output shard all members are written to


@dataclass
class Job:
    """Everything one output shard needs; the pipeline runs jobs independently."""

    shard: str
    inputs: list[TensorInfo]  # what to read, wherever the source stored it
    quantize: list[QuantOp]
    passthrough: list[str]
    outputs: list[OutTensor]  # in file order
    fused: list[int] = field(default_factory=list)

    @property
    def bytes_in(self) -> int:
        """Bytes the job reads."""
        return sum(t.nbytes for t in self.inputs)

    @property
    def bytes_out(self) -> int:
        """Bytes the job writes."""
        return sum(o.nbytes for o in self.outputs)


@dataclass
class Plan:
    """Everything a conversion will do, decided before any tensor byte is read (see make_plan)."""

    source: str
    recipe: Recipe
    catalog: Catalog
    jobs: list[Job]
    fused_sets: list[FusedSet]
    kept_weights: list[tuple[str, str]]  # (.weight tensor left unquantized, why) worth listing
    warnings: list[str]
    dequantizer: Dequantizer = field(default_factory=PassThrough)  # expands a quantized source
    policy: Policy = field(default_factory=Policy)
    kept_by_policy: list[KeptRule] = field(default_factory=list)  # beyond the user's ignore list
    # defaults off: what the default rules would have kept and is quantized instead
    unexpected: list[KeptRule] = field(default_factory=list)
    config_ignore: list[str] = field(default_factory=list)  # quantization_config.ignore
    towers_quantized: int = 0  # tower weights quantized because the policy asked for it
    unexpected_note: str = ""  # the warning about `unexpected`, also among `warnings`
    # stacking on a compressed-tensors source: its config groups that still describe modules
    # kept as stored (name -> scheme), and those modules per group
    kept_groups: dict = field(default_factory=dict)
    stacked: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def quantization_config(self) -> dict:
        """config.json's `quantization_config`: the recipe (after a stacked source's groups),
        with an ignore list that names every module the groups target and the plan leaves
        unquantized."""
        return self.recipe.quantization_config(ignore=self.config_ignore, kept_groups=self.kept_groups)

    @property
    def n_requantized(self) -> int:
        """Weights the source stored quantized that are expanded and quantized again."""
        return sum(self.dequantizer.transforms(q.tensor) for j in self.jobs for q in j.quantize)

    def effective_flags(self) -> tuple[str, ...]:
        """The policy flags that changed this output (the shortest command that reproduces it)."""
        return tuple(
            flag
            for flag, mattered in (
                ("--no-default-ignore", bool(self.unexpected)),
                ("--quantize-towers", self.policy.default_ignore and self.towers_quantized > 0),
                ("--skip-incompatible", any(r.rule == INCOMPATIBLE for r in self.kept_by_policy)),
            )
            if mattered
        )

    @property
    def dequant(self) -> str | None:
        """How the quantized source is expanded on the fly, for the plan and the model card."""
        return self.dequantizer.describe()

    @property
    def bytes_in(self) -> int:
        """Bytes the conversion reads."""
        return sum(j.bytes_in for j in self.jobs)

    @property
    def bytes_out(self) -> int:
        """Bytes the conversion writes."""
        return sum(j.bytes_out for j in self.jobs)

    @property
    def weight_map(self) -> dict[str, str]:
        """Output tensor name -> the shard it is written to (the output index's weight_map)."""
        return {o.name: j.shard for j in self.jobs for o in j.outputs}

    @property
    def n_quantized(self) -> int:
        """Weights quantized."""
        return sum(len(j.quantize) for j in self.jobs)


def _split_experts(info: TensorInfo) -> list[TensorInfo] | None:
    """Per-expert 2-D views of a 3-D fused expert tensor, as byte sub-ranges: no copy needed."""
    leaf = info.name.rsplit(".", 1)[-1]
    base = info.name
    if leaf == "weight":
        base = info.name[: -len(".weight")]
        leaf = base.rsplit(".", 1)[-1]
    if leaf not in _EXPERT_SPLITS or len(info.shape) != 3:
        return None
    parts = _EXPERT_SPLITS[leaf]
    experts, rows, cols = info.shape
    if rows % len(parts):
        raise PlanError([f"{info.name}: shape {list(info.shape)} cannot be split into {parts}"])
    part_rows = rows // len(parts)
    isz = dtype_size(info.dtype)
    prefix = base[: -len(leaf)]
    views = []
    for e in range(experts):
        for k, part in enumerate(parts):
            start = info.span.start + ((e * rows + k * part_rows) * cols) * isz
            views.append(
                TensorInfo(
                    name=f"{prefix}{e}.{part}.weight",
                    file=info.file,
                    dtype=info.dtype,
                    shape=(part_rows, cols),
                    span=Span(start, start + part_rows * cols * isz),
                )
            )
    return views


def expand_inputs(catalog: Catalog) -> tuple[list[TensorInfo], list[str]]:
    """The tensors of CATALOG with 3-D fused experts replaced by per-expert views, and a note
    per tensor split.
    """
    out, notes = [], []
    for info in catalog.tensors.values():
        views = _split_experts(info)
        if views is None:
            out.append(info)
        else:
            out.extend(views)
            notes.append(f"{info.name}: 3-D fused experts split into {len(views)} per-expert weights")
    return out, notes


def make_plan(
    catalog: Catalog,
    recipe: Recipe,
    *,
    source: str = "",
    dequant: Dequantizer | None = None,
    policy: Policy | None = None,
) -> Plan:
    """The plan of converting CATALOG with RECIPE; PlanError naming every problem found.

    source: the source's label, for the plan's rendering; dequant: the source's Dequantizer
    (streamer.quant.dequant.detect_dequantizer; None: a dense source, read as stored);
    policy: what is kept unquantized besides the recipe's ignore list (None: the defaults).
    """
    dequant = dequant if dequant is not None else PassThrough()
    problems: list[str] = []
    hints: list[Hint] = []
    warnings: list[str] = list(catalog.notices)
    kept: list[tuple[str, str]] = []

    inputs, split_notes = expand_inputs(catalog)
    warnings.extend(split_notes)
    by_name: dict[str, TensorInfo] = {}
    for info in inputs:
        if info.name in by_name:
            problems.append(f"{info.name}: name clash between {by_name[info.name].file} and {info.file}")
        by_name[info.name] = info

    # A quantized source: the dequantizer says which tensors become dense weights and which
    # (scales, packed data) are consumed; see streamer/quant/dequant.py.
    by_name, consumed = dequant.plan_inputs(by_name)

    # 1. decide what happens to every tensor
    policy = policy or Policy()
    weights = [
        (name[: -len(".weight")], info.shape, info.dtype)
        for name, info in by_name.items()
        if name not in consumed and name.endswith(".weight")
    ]
    by_role = default_kept(catalog.config, weights, by_name, towers=True)
    policy_kept: dict[str, str] = {}  # module -> rule, beyond the user's ignore list
    unexpected: dict[str, str] = {}  # defaults off: module -> the rule that would have kept it
    incompatible: dict[str, str] = {}  # module -> why the scheme cannot serve its shape
    not_float: list[str] = []  # modules whose weights are stored in no float dtype
    ops: dict[str, QuantOp] = {}
    layouts: dict[str, dict] = {}
    for name, info in by_name.items():
        if name in consumed:
            continue
        module, _, param = name.rpartition(".")
        if param != "weight" or dequant.keeps(module):
            continue  # stacked: kept quantized as the source stores it
        matched = recipe.match(module)
        if matched is None:
            continue
        group, scheme = matched
        why = not_quantizable(module, info.shape)
        if why is not None:
            if why:
                kept.append((name, why))
            continue
        rule = by_role.get(module)
        if rule is not None:
            if not policy.default_ignore:
                unexpected[module] = rule
            elif not (rule == TOWER and policy.quantize_towers):
                policy_kept[module] = rule
                continue
        src_dtype = dequant.dense_dtype(name)
        if src_dtype not in FLOAT_DTYPES:
            problems.append(
                f"{name}: dtype {src_dtype} is not a float weight (already quantized?); "
                "keep it unquantized or convert a dense source"
            )
            not_float.append(module)
            continue
        why = shape_problem(info.shape, torch_dtype(src_dtype), scheme)
        if why is not None:
            incompatible[module] = why
            continue
        layouts[name] = output_layout(info.shape, torch_dtype(src_dtype), scheme)
        ops[name] = QuantOp(tensor=name, module=module, group=group)

    if policy.default_ignore and by_role.get(LM_HEAD) == HEAD and LM_HEAD + ".weight" not in by_name:
        if recipe.match(LM_HEAD) is not None:  # a tied head: loaders still build an lm_head Linear
            policy_kept[LM_HEAD] = HEAD
    if dequant.keep_stored(set(ops)):
        # A targeted module the plan leaves unquantized (default policy, shape) would be written
        # dense from the dequantized values: it is kept as the source stores it instead.
        return make_plan(catalog, recipe, source=source, dequant=dequant, policy=policy)
    quantized = {op.module for op in ops.values()}
    towers_quantized = sum(by_role.get(m) == TOWER for m in quantized) if policy.default_ignore else 0
    if not_float:
        hints.append(Hint("ignore", tuple(not_float)))
    if incompatible and (not policy.skip_incompatible or not ops):
        # refused by default; with skip_incompatible only when nothing at all would be quantized
        refusal, fixes = _incompatible_problems(incompatible, quantized, recipe, weights)
        problems[:0] = refusal
        hints[:0] = fixes
    for module in incompatible:
        policy_kept[module] = INCOMPATIBLE
    unexpected = {m: r for m, r in unexpected.items() if m in quantized}
    unexpected_note = unexpected_warning(unexpected, quantized) if unexpected else ""
    if unexpected_note:
        warnings.append(unexpected_note)
    warnings += _unmatched_ignore_warnings(recipe.ignore, {n.rpartition(".")[0] for n in by_name})
    kept_rules = _kept_rules(policy_kept, incompatible, recipe)
    config_ignore = _config_ignore(recipe, policy_kept, quantized)
    kept_groups, stacked = {}, {}
    if dequant.kept:
        kept_groups = dequant.kept_groups()
        for module, group in sorted(dequant.kept.items(), key=lambda kv: natural_key(kv[0])):
            stacked.setdefault(group, []).append(module)
        dense = {
            n[: -len(".weight")] for n, i in by_name.items()
            if n not in consumed and n.endswith(".weight") and not_quantizable(n[: -len(".weight")], i.shape) is None
            and n not in ops and not dequant.keeps(n[: -len(".weight")])
        }  # fmt: skip
        new = dict(zip(recipe.groups, list(recipe.output_groups(kept_groups))[len(kept_groups) :]))
        stored = {**dequant.kept, **{op.module: new[op.group] for op in ops.values()}}
        config_ignore, stack_problems = stacked_ignore(
            recipe.output_groups(kept_groups), config_ignore, list(dequant.ignore), stored, dense
        )
        problems += stack_problems
        if stack_problems:
            hints.append(Hint("scheme_file"))

    # 2. fused sets share a global scale and an output shard
    fused_sets = _fused_sets(ops, recipe, by_name, dequant, warnings)
    for fs in fused_sets:
        for member in fs.members:
            ops[member] = QuantOp(**{**ops[member].__dict__, "fused": fs.id})
    shard_of = {name: dequant.shard_of(name) for name in by_name}
    for fs in fused_sets:
        for member in fs.members:
            shard_of[member] = fs.shard

    # 3. output tensors, and clashes between them
    outputs_of: dict[str, list[OutTensor]] = {}
    produced: dict[str, str] = {}
    for name, info in by_name.items():
        if name in consumed:
            continue
        if name in ops:
            base = name[: -len("weight")]
            outs = [
                OutTensor(base + suffix, safetensors_name(dt), tuple(shape), name)
                for suffix, (dt, shape) in layouts[name].items()
            ]
        else:
            outs = [OutTensor(name, dequant.dense_dtype(name), info.shape, name)]
        for o in outs:
            if o.name in produced:
                problems.append(
                    f"{o.name}: written twice (from {produced[o.name]} and {name}); the source "
                    "already has a tensor with a quantized name: is it already quantized?"
                )
            produced[o.name] = name
        outputs_of[name] = outs

    if problems:
        raise PlanError(problems, hints=hints)
    if not ops:
        warnings.append("no tensor matches the scheme: the output would be a copy of the source")

    # 4. one job per output shard, in source shard order
    jobs: dict[str, Job] = {s: Job(s, [], [], [], []) for s in catalog.shards}
    for name in by_name:
        if name in consumed:
            continue
        job = jobs[shard_of[name]]
        job.inputs.extend(dequant.inputs_for(name))
        if name in ops:
            job.quantize.append(ops[name])
        else:
            job.passthrough.append(name)
        job.outputs.extend(outputs_of[name])
    for fs in fused_sets:
        jobs[fs.shard].fused.append(fs.id)
    for job in jobs.values():
        # Widest dtypes first, as safetensors itself orders them, so every tensor is aligned.
        job.outputs.sort(key=lambda o: (-dtype_size(o.dtype), o.name))
        job.inputs = list({(t.file, t.span.start, t.name): t for t in job.inputs}.values())
        job.inputs.sort(key=lambda t: (t.file, t.span.start))
    empty = [s for s, j in jobs.items() if not j.outputs]
    for s in empty:
        warnings.append(f"{s}: every tensor moved to its fused partners' shard; no output file")
        del jobs[s]

    return Plan(
        source=source,
        recipe=recipe,
        catalog=catalog,
        jobs=list(jobs.values()),
        fused_sets=fused_sets,
        kept_weights=kept,
        warnings=warnings,
        dequantizer=dequant,
        policy=policy,
        kept_by_policy=kept_rules,
        unexpected=_kept_rules(unexpected, {}, recipe),
        config_ignore=config_ignore,
        towers_quantized=towers_quantized,
        unexpected_note=unexpected_note,
        kept_groups=kept_groups,
        stacked={g: tuple(ms) for g, ms in stacked.items()},
    )


# --- stacking on a compressed-tensors source ---------------------------------------------------


def loader_groups(module: str, groups: dict, ignore: list[str]) -> set[str]:
    """The config groups compressed-tensors and vLLM may load MODULE with: none when ignored;
    else the groups whose name or `re:` targets match it (both loaders prefer those), else
    those targeting the class Linear. More than one means the loaders may disagree (one takes
    the first regex alphabetically, the other the first in config order)."""
    if any(matches(module, e) for e in ignore):
        return set()
    named = {g for g, s in groups.items() if any(t != "Linear" and matches(module, t) for t in s.targets)}
    if named:
        return named
    return {g for g, s in groups.items() if not s.targets or "Linear" in s.targets}


def stacked_ignore(
    groups: dict, ignore: list[str], source_ignore: list[str], stored: dict[str, str], dense: set[str]
) -> tuple[list[str], list[str]]:
    """(ignore list, problems) for an output holding GROUPS, where STORED maps each quantized
    module to the group it is stored with and DENSE names the unquantized Linear weights.

    The ignore list is IGNORE (the plan's), then those of SOURCE_IGNORE (the source's entries)
    that still keep a dense module the others do not, less every entry that matches a module stored quantized (the
    global list would unquantize it for every group), plus the exact name of any dense module
    a group would still claim. A quantized module that the loaders would load with another
    group, or could load with two, is a problem: the config would lie."""
    out = [e for e in ignore if not any(matches(m, e) for m in stored)]
    for entry in source_ignore:
        if any(matches(m, entry) for m in stored):
            continue
        if any(matches(m, entry) and not any(matches(m, e) for e in out) for m in dense):
            out.append(entry)
    out += sorted((m for m in dense if loader_groups(m, groups, out)), key=natural_key)
    wrong: dict[tuple[str, str], list[str]] = defaultdict(list)
    for module, group in stored.items():
        got = loader_groups(module, groups, out)
        if got != {group}:
            wrong[(group, " and ".join(sorted(got)) or "none (unquantized)")].append(module)
    problems = [
        f"stacking on the source's quantization: {', '.join(collapse_names(ms))} are stored with "
        f"config group {group!r}, but compressed-tensors and vLLM would load them with {got}: "
        "the targets of the new scheme and of the groups kept from the source overlap. Give the "
        "new scheme targets that name only the modules it quantizes (`re:` targets in a scheme "
        "described in a file), or target the kept modules too to re-quantize them"
        for (group, got), ms in wrong.items()
    ]
    return out, problems


# --- shapes a scheme cannot serve -------------------------------------------------------------

# Shown first when suggesting schemes that fit: the ones most users want.
_COMMON_SCHEMES = ("FP8_DYNAMIC", "W8A16", "W8A8", "W4A16", "NVFP4A16", "MXFP4A16", "FP8_BLOCK", "MXFP8A16")


def _serving_problem(shape: tuple[int, ...], scheme) -> str | None:
    """Why a Linear of SHAPE cannot run with SCHEME's activations, though its weight quantizes.

    Activations quantized in groups along the input (FP8_BLOCK: per token, groups of 128) need
    whole groups: compressed-tensors' forward fails (`unflatten`) and vLLM's per-token-group
    kernels assume it. The weight side alone (ceil-shaped block scales) would be fine."""
    acts = scheme.input_activations
    if acts is None or str(getattr(acts.strategy, "value", acts.strategy)) != "group" or not acts.group_size:
        return None
    cols, gs = shape[-1], int(acts.group_size)
    if cols % gs == 0:
        return None
    return (
        f"weight of shape {list(shape)}: in_features {cols} is not a multiple of {gs}: activations "
        f"are quantized per token in groups of {gs} along the input, so this Linear cannot run "
        "(transformers and vLLM need whole groups)"
    )


def shape_problem(shape, dtype: torch.dtype, scheme) -> str | None:
    """Why SCHEME cannot quantize and serve a weight of SHAPE and (torch) DTYPE, or None when it can."""
    try:
        output_layout(shape, dtype, scheme)
    except ShapeError as e:
        return e.message
    return _serving_problem(tuple(shape), scheme)


def schemes_that_fit(shapes: list[tuple[tuple[int, ...], str]]) -> list[str]:
    """Accepted presets that quantize and serve every (shape, safetensors dtype) of SHAPES, common ones first."""
    shapes = list({(tuple(s), d) for s, d in shapes if d in FLOAT_DTYPES})
    names = accepted_presets()
    ordered = [n for n in _COMMON_SCHEMES if n in names] + [n for n in names if n not in _COMMON_SCHEMES]
    out = []
    for name in ordered:
        scheme = next(iter(make_recipe(name).groups.values()))
        if all(shape_problem(s, torch_dtype(d), scheme) is None for s, d in shapes):
            out.append(name)
    return out


def _incompatible_problems(
    incompatible: dict[str, str], quantized: set[str], recipe: Recipe, weights
) -> tuple[list[str], list[Hint]]:
    """The refusal: a summary that names every module and the ignore entries that fix it, then
    one line per weight (the Space groups those by reason); and the hints that get past it."""
    modules = sorted(incompatible, key=natural_key)
    shown = ", ".join(_split_count(n) for n in collapse_names(modules))
    first = next(iter(incompatible.values())).split("; ")[0]
    first = re.sub(r"^weight of shape \[[\d, ]*\]: ", "", first)
    if not quantized:
        shapes = {m: (tuple(s), d) for m, s, d in weights}
        fits = schemes_that_fit([shapes[m] for m in modules if m in shapes])
        if fits:
            hint = f"schemes that fit every weight: {', '.join(fits[:6])}"
            hints = [Hint("scheme", tuple(fits[:6])), Hint("ignore")]
        else:  # keep the modules above unquantized, or describe a scheme with another group size
            hint = "no preset fits every weight"
            hints = [Hint("ignore"), Hint("scheme_file")]
        head = (
            f"{recipe.name} cannot quantize any weight of this checkpoint: {len(modules)} weight(s) have "
            f"shapes it cannot serve ({first}): {shown}. Choose another scheme; {hint}"
        )
    else:
        entries = ignore_entries({m: INCOMPATIBLE for m in modules}, quantized)
        quoted = " ".join(f"'{e}'" for e in entries)
        head = (
            f"{len(modules)} weight(s) have shapes {recipe.name} cannot serve ({first}): {shown}. "
            f"The ignore entries {quoted} keep them unquantized"
        )
        hints = [Hint("ignore", tuple(entries)), Hint("skip_incompatible")]
    return [head] + [f"{m}.weight: {incompatible[m]}" for m in modules], hints


# --- what the policy kept, and the ignore list loaders read ------------------------------------


def _kept_rules(kept: dict[str, str], incompatible: dict[str, str], recipe: Recipe) -> list[KeptRule]:
    out = []
    for rule in [*RULES, INCOMPATIBLE]:
        modules = tuple(sorted((m for m, r in kept.items() if r == rule), key=natural_key))
        if not modules:
            continue
        if rule == INCOMPATIBLE:
            first = next(incompatible[m] for m in modules if m in incompatible)
            why = f"{recipe.name}: " + re.sub(r"^weight of shape \[[\d, ]*\]: ", "", first.split("; ")[0])
        else:
            why = RULES[rule]
        out.append(KeptRule(rule, why, modules))
    return out


def _config_ignore(recipe: Recipe, kept: dict[str, str], quantized: set[str]) -> list[str]:
    """The user's entries as given, then entries for what the policy kept beyond them: together
    they name every targeted module left unquantized, and nothing stored quantized."""
    user = recipe.ignore
    extra = {m: r for m, r in kept.items() if not any(matches(m, e) for e in user)}
    return user + [e for e in ignore_entries(extra, quantized) if e not in user]


def unexpected_warning(unexpected: dict[str, str], quantized: set[str]) -> str:
    """Defaults off: what is quantized that serving engines expect unquantized (UNEXPECTED:
    module -> the rule that would have kept it; QUANTIZED: every module quantized), and the
    ignore entries that would keep it so (the drop-in model_free_ptq logs this before it runs).
    """
    parts = []
    for rule in RULES:
        modules = sorted((m for m, r in unexpected.items() if r == rule), key=natural_key)
        if modules:
            names = [_split_count(n) for n in collapse_names(modules)]
            parts.append(f"{rule} ({len(modules)}: {', '.join(names[:3])}{', …' if len(names) > 3 else ''})")
    fix = " ".join(f"'{e}'" for e in ignore_entries(unexpected, quantized - set(unexpected)))
    return (
        f"quantizing {len(unexpected)} module(s) that serving engines do not expect quantized: "
        f"{'; '.join(parts)}. transformers and vLLM may refuse them or compute garbage; to keep "
        f"them unquantized, ignore {fix} (or keep streamer's default ignore policy on)"
    )


def _unmatched_ignore_warnings(ignore: list[str], modules: set[str]) -> list[str]:
    """An ignore entry that matches nothing is almost always a typo (`lm-head`), and today it
    would silently leave the module quantized: say so, with the closest names."""
    out = []
    for entry in ignore:
        if any(matches(m, entry) for m in modules):
            continue
        close = close_modules(entry, modules)
        hint = f"; closest module names: {', '.join(close)}" if close else ""
        out.append(f"ignore entry '{entry}' matches no module of this checkpoint{hint}")
    return out


def _fused_sets(ops, recipe: Recipe, by_name, dequant, warnings: list[str]) -> list[FusedSet]:
    """Group quantized weights that vLLM fuses, for schemes with a global scale."""
    families: dict[tuple[str, tuple[str, ...], str], dict[str, str]] = defaultdict(dict)
    for name, op in ops.items():
        scheme = recipe.groups[op.group]
        if not needs_global_scale(scheme):
            continue
        parent, _, leaf = op.module.rpartition(".")
        fam = _FAMILY_OF.get(leaf)
        if fam is not None:
            families[(parent, fam, op.group)][leaf] = name

    sets: list[FusedSet] = []
    for (parent, fam, _group), members in sorted(families.items(), key=lambda kv: natural_key(kv[0][0])):
        present = tuple(members[leaf] for leaf in fam if leaf in members)
        absent = [leaf for leaf in fam if leaf not in members]
        if absent:
            why = []
            for leaf in absent:
                t = f"{parent}.{leaf}.weight"
                why.append(f"{leaf} ({'not quantized with this group' if t in by_name else 'not in the checkpoint'})")
            warnings.append(
                f"{parent}: fused partners {', '.join(why)}; the global scale is shared by "
                f"{', '.join(leaf for leaf in fam if leaf in members)} only. vLLM fuses these "
                "modules and needs them quantized alike"
            )
        if len(present) < 2:
            continue
        primary = present[0]
        shard = dequant.shard_of(primary)
        sets.append(FusedSet(len(sets), "+".join(l for l in fam if l in members), parent, present, shard))
    return sets


# --- rendering -------------------------------------------------------------------------------


def render(plan: Plan) -> str:
    """PLAN as the command line prints it: shards, what is quantized and passed through, fused
    sets, what is kept and why, warnings.
    """
    lines = [
        f"plan: {plan.source or '(source)'} with {plan.recipe.name}",
        f"  {len(plan.jobs)} output shard(s), {plan.n_quantized} weights quantized, "
        f"{human_bytes(plan.bytes_in)} read -> {human_bytes(plan.bytes_out)} written",
    ]
    if plan.dequant:
        lines.append(f"  dequantize: {plan.dequant}")
    lines += stacked_lines(plan)
    if plan.recipe.ignore:
        lines.append(f"  ignore: {', '.join(plan.recipe.ignore)}")
    lines += policy_lines(plan)
    if plan.config_ignore:
        lines.append(f"  quantization_config.ignore: {', '.join(plan.config_ignore)}")
    copied = plan.catalog.copy_files
    if copied:
        size = sum(plan.catalog.file_sizes.get(p, 0) for p in copied)
        lines.append(f"  copied as they are ({human_bytes(size)}): {', '.join(sorted(copied))}")
    for job in plan.jobs:
        lines.append("")
        lines.append(
            f"{job.shard}: {human_bytes(job.bytes_in)} in -> {human_bytes(job.bytes_out)} out, "
            f"{len(job.quantize)} quantized, {len(job.passthrough)} passed through"
        )
        if job.quantize:
            lines.append("  quantize:")
            lines += [f"    {n}" for n in collapse_names([q.tensor for q in job.quantize])]
        if job.passthrough:
            lines.append("  pass through:")
            lines += [f"    {n}" for n in collapse_names(job.passthrough)]
        foreign = sorted({t.file for t in job.inputs} - {job.shard})
        if foreign:
            lines.append(f"  also reads from: {', '.join(foreign)}")
    if plan.fused_sets:
        lines.append("")
        lines.append(f"fused sets sharing a global scale ({len(plan.fused_sets)}):")
        by_family: dict[str, list[str]] = defaultdict(list)
        for fs in plan.fused_sets:
            by_family[fs.family].append(fs.parent)
        for fam, parents in by_family.items():
            for p in collapse_names(parents):
                lines.append(f"  {fam} under {p}")
    if plan.kept_weights:
        lines.append("")
        lines.append("weights kept as they are:")
        for name, why in plan.kept_weights:
            lines.append(f"  {name}: {why}")
    if plan.warnings:
        lines.append("")
        lines.append("warnings:")
        lines += [f"  {w}" for w in plan.warnings]
    return "\n".join(lines)


def stacked_lines(plan: Plan) -> list[str]:
    """Rendering lines for PLAN on a compressed-tensors source: what is kept as stored, what is
    re-quantized, how to choose.
    """
    if plan.dequantizer.kind != "compressed-tensors":
        return []
    lines = []
    for group, modules in plan.stacked.items():
        scheme = plan.kept_groups[group]
        names = [_split_count(n) for n in collapse_names(list(modules))]
        shown = ", ".join(names[:3]) + (", …" if len(names) > 3 else "")
        lines.append(
            f"  kept as stored (stacked): {len(modules)} module(s) of the source's group {group!r} "
            f"({scheme.format}): {shown}"
        )
    if plan.dequantizer.stacking:
        dq = plan.dequantizer
        requant = [q.module for j in plan.jobs for q in j.quantize if dq.transforms(q.tensor)]
        names = [_split_count(n) for n in collapse_names(requant)]
        shown = (": " + ", ".join(names[:3]) + (", …" if len(names) > 3 else "")) if names else ""
        lines.append(
            f"  expanded and re-quantized: {len(requant)} weight(s) the source stored quantized "
            f"and {plan.recipe.name} targets{shown}. Modules the scheme does not target (or "
            "--ignore) are kept as stored; target them to re-quantize them"
        )
    return lines


def policy_lines(plan: Plan) -> list[str]:
    """Rendering lines for what PLAN's policy kept beyond the user's ignore list: one line per
    rule, with a count.
    """
    if not plan.kept_by_policy:
        return []
    lines = ["  kept unquantized beyond the ignore list:"]
    for rule in plan.kept_by_policy:
        how = {INCOMPATIBLE: "kept by --skip-incompatible", TOWER: "--quantize-towers quantizes them"}.get(
            rule.rule, "--no-default-ignore quantizes them"
        )
        names = [_split_count(n) for n in collapse_names(list(rule.modules))]
        shown = ", ".join(names[:3]) + (", …" if len(names) > 3 else "")
        lines.append(f"    {rule.rule} ({len(rule.modules)}): {shown} — {rule.why} ({how})")
    return lines


def _split_count(collapsed: str) -> str:
    """`a.{0..1}.b  (2)` -> `a.{0..1}.b`: where the count is shown once per line already."""
    return re.sub(r"\s+\(\d+\)$", "", collapsed)


def _rule_dict(rule: KeptRule) -> dict:
    return {"rule": rule.rule, "why": rule.why, "count": len(rule.modules), "modules": collapse_names(list(rule.modules))}


def plan_summary(plan: Plan) -> dict:
    """PLAN as plain data, for the web app and the command line's --json."""
    return {
        "source": plan.source,
        "scheme": plan.recipe.name,
        "ignore": plan.recipe.ignore,
        "bytes_in": plan.bytes_in,
        "bytes_out": plan.bytes_out,
        "quantized": plan.n_quantized,
        "dequant": plan.dequant,
        "shards": [
            {
                "shard": j.shard,
                "bytes_in": j.bytes_in,
                "bytes_out": j.bytes_out,
                "quantized": [q.tensor for q in j.quantize],
                "passthrough": j.passthrough,
            }
            for j in plan.jobs
        ],
        "fused_sets": [{"family": f.family, "parent": f.parent, "members": list(f.members)} for f in plan.fused_sets],
        "kept": [{"tensor": n, "why": w} for n, w in plan.kept_weights],
        "kept_by_policy": [_rule_dict(r) for r in plan.kept_by_policy],
        "quantized_against_defaults": [_rule_dict(r) for r in plan.unexpected],
        "policy": list(plan.policy.flags()),
        "config_ignore": plan.config_ignore,
        "stacked": {g: collapse_names(list(ms)) for g, ms in plan.stacked.items()},
        "requantized": plan.n_requantized,
        "warnings": plan.warnings,
    }

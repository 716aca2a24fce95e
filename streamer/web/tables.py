"""The dry run as tables: output shards, tensors (grouped, with why each is kept), fused sets, warnings."""

from __future__ import annotations

import html
import re

import pandas as pd
from compressed_tensors.utils.match import match_name

from streamer.engine.plan import INCOMPATIBLE, plan_summary
from streamer.formats import collapse_names, human_bytes
from streamer.web.wording import for_web

SHARD_COLUMNS = ["Output shard", "Read", "Written", "Quantized", "Kept as is"]
TENSOR_COLUMNS = ["Tensors", "Count", "Action", "Why"]
FUSED_COLUMNS = ["Fused set (shares one global scale)", "Under", "Count"]
WARNING_COLUMNS = ["Warnings"]


def _why_kept(name: str, ignore: list[str], kept: dict[str, str]) -> str:
    if name in kept:
        return kept[name]
    module, _, param = name.rpartition(".")
    if param != "weight":
        return "not a weight (bias, buffer, scale)"
    if module.endswith("norm"):
        return "normalization layer"
    for entry in ignore:
        if match_name(module, entry):
            return f"ignored ({entry})"
    return "not targeted by the scheme"


def _policy_reasons(plan) -> dict[str, str]:
    """tensor -> why, for the weights the default policy (or the shape rule) kept unquantized."""
    out = {}
    for rule in plan.kept_by_policy:
        why = (
            f"{plan.recipe.name} cannot serve this shape"
            if rule.rule == INCOMPATIBLE
            else f"kept by default ({rule.rule}): {rule.why}"
        )
        out.update({m + ".weight": why for m in rule.modules})
    return out


def plan_tables(plan) -> tuple[str, pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(overview in Markdown, shards, tensors, fused sets, warnings) for the Plan tab.

    plan: the engine's plan (a dry run's `result.plan`)."""
    summary = plan_summary(plan)
    ignore = list(summary["ignore"])
    kept = {k["tensor"]: k["why"] for k in summary["kept"]}
    kept.update(_policy_reasons(plan))
    shards = pd.DataFrame(
        [
            [s["shard"], human_bytes(s["bytes_in"]), human_bytes(s["bytes_out"]), len(s["quantized"]), len(s["passthrough"])]
            for s in summary["shards"]
        ],
        columns=SHARD_COLUMNS,
    )
    quantized = [q for s in summary["shards"] for q in s["quantized"]]
    by_reason: dict[str, list[str]] = {}
    for s in summary["shards"]:
        for name in s["passthrough"]:
            by_reason.setdefault(_why_kept(name, ignore, kept), []).append(name)
    rows = []
    for pattern in collapse_names(quantized):
        rows.append(_tensor_row(pattern, "quantize", summary["scheme"]))
    for why, names in by_reason.items():
        for pattern in collapse_names(names):
            rows.append(_tensor_row(pattern, "keep", why))
    tensors = pd.DataFrame(rows, columns=TENSOR_COLUMNS)
    fused_rows = []
    by_family: dict[str, list[str]] = {}
    for f in summary["fused_sets"]:
        by_family.setdefault(f["family"], []).append(f["parent"])
    for fam, parents in by_family.items():
        for p in collapse_names(parents):
            pat, count = _split_count(p)
            fused_rows.append([fam.replace("+", " + "), pat, count])
    fused = pd.DataFrame(fused_rows, columns=FUSED_COLUMNS)
    warnings = pd.DataFrame([[for_web(w)] for w in summary["warnings"]] or [["none"]], columns=WARNING_COLUMNS)
    ratio = summary["bytes_in"] / summary["bytes_out"] if summary["bytes_out"] else 0
    overview = (
        f"**{html.escape(summary['source'])}** with **{summary['scheme']}**: "
        f"{summary['quantized']} weights quantized, "
        f"{sum(len(s['passthrough']) for s in summary['shards'])} tensors kept as they are, "
        f"{len(summary['shards'])} output shard(s). "
        f"**{human_bytes(summary['bytes_in'])} read → {human_bytes(summary['bytes_out'])} written**"
        + (f" ({ratio:.1f}x smaller)" if ratio else "")
        + (f". Fused sets sharing a global scale: {len(summary['fused_sets'])}" if summary["fused_sets"] else "")
        + (
            ". Kept unquantized beyond the ignore list: "
            + ", ".join(f"{r['rule']} ({r['count']})" for r in summary["kept_by_policy"])
            if summary["kept_by_policy"]
            else ""
        )
        + (f". Source is already quantized: {html.escape(summary['dequant'])}" if summary.get("dequant") else "")
        + "."
    )
    return overview, shards, tensors, fused, warnings


def _split_count(pattern: str) -> tuple[str, int]:
    m = re.match(r"^(.*?)\s+\((\d+)\)$", pattern)
    return (m.group(1), int(m.group(2))) if m else (pattern, 1)


def _tensor_row(pattern: str, action: str, why: str) -> list:
    pat, count = _split_count(pattern)
    return [pat, count, action, why]


def empty_tables() -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The four tables with their columns and no rows (before a plan, or after a failed one)."""
    return (
        pd.DataFrame([], columns=SHARD_COLUMNS),
        pd.DataFrame([], columns=TENSOR_COLUMNS),
        pd.DataFrame([], columns=FUSED_COLUMNS),
        pd.DataFrame([], columns=WARNING_COLUMNS),
    )


def stack_tables(planned: list[tuple[str, list[pd.DataFrame]]]) -> tuple[pd.DataFrame, ...]:
    """A fan-out's plans in the four tables: each plan's rows, in the targets' order, under a
    first column naming its scheme.

    planned: (scheme, [shards, tensors, fused, warnings] from plan_tables) per planned target."""
    out = []
    for i in range(4):
        frames = [tables[i].assign(Scheme=scheme)[["Scheme", *tables[i].columns]] for scheme, tables in planned]
        out.append(pd.concat(frames, ignore_index=True))
    return tuple(out)

"""The quality report: how much quantization changed the weights, per tensor and aggregated.

The runner records, for every weight it quantizes, ||W||² and ||W - deq(Q(W))||²
(:mod:`streamer.quant.quality`). This module turns those sums into the report the card, the
JSON result, the CLI and the Space show:

* per tensor: relative Frobenius error and SNR (dB);
* by module kind (attention, dense MLP, experts, shared experts, other), for MoE experts also per
  layer, and overall: aggregates are energy-weighted, sqrt(Σ||W - D||² / Σ||W||²), the relative
  error of all the kind's weights taken as one vector (a few tiny tensors cannot dominate it);
* the 10 worst tensors;
* outliers: a tensor whose robust error (the error against the weight's typical magnitude, see
  :mod:`streamer.quant.quality`) is more than ``OUTLIER_FACTOR`` (4) times its kind's median, in a
  kind of at least ``OUTLIER_MIN_KIND`` (3) tensors. The relative error cannot be the judge: a
  few huge values put their own energy in its denominator, so a weight whose small values all
  rounded to zero can still show a small relative error. The outliers' modules are the suggested
  ignore list.

Public API: :func:`module_kind`, :func:`layer_of`, :class:`TensorError`, :class:`QualityReport`,
:func:`build_report`, :func:`summary_line`, :func:`card_section`.
"""

from __future__ import annotations

import math
import re
import statistics
from dataclasses import dataclass, field

from streamer.formats import collapse_names, natural_key
from streamer.quant.quality import ErrorMeasures, ErrorSums, relative_error, snr_db

__all__ = [
    "KINDS", "OUTLIER_FACTOR", "OUTLIER_MIN_KIND", "module_kind", "layer_of", "TensorError",
    "Aggregate", "QualityReport", "build_report", "summary_line", "card_section",
]  # fmt: skip

KINDS = ("attention", "dense MLP", "experts", "shared experts", "other")
OUTLIER_FACTOR = 4.0  # error above this multiple of the kind's median
OUTLIER_MIN_KIND = 3  # a median of fewer tensors says too little
WORST = 10

_LAYER = re.compile(r"\.(?:layers|h|blocks|block|layer)\.(\d+)\.")


def module_kind(name: str) -> str:
    """The module kind of a weight NAME: "shared experts" (shared_expert(s)), "experts" (a routed
    expert), "attention" (attn / attention), "dense MLP" (mlp / feed_forward / ffn), else "other"."""
    n = name.lower()
    if "shared_expert" in n or "shared_mlp" in n:
        return "shared experts"
    if ".experts." in n:
        return "experts"
    if "attn" in n or "attention" in n:
        return "attention"
    if ".mlp." in n or "feed_forward" in n or ".ffn." in n:
        return "dense MLP"
    return "other"


def layer_of(name: str) -> int | None:
    """The decoder layer index in NAME (`model.layers.3.…` -> 3), None outside the layers."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def _module(name: str) -> str:
    return name[: -len(".weight")] if name.endswith(".weight") else name


def _round(x: float, digits: int) -> float | None:
    """X rounded for JSON; None for inf / NaN (JSON has no such numbers)."""
    return round(x, digits) if math.isfinite(x) else None


@dataclass(frozen=True)
class TensorError(ErrorMeasures):
    """One quantized weight's error: NAME (`….weight`) and its sums (see ErrorSums)."""

    name: str
    weight_sq: float
    error_sq: float
    weight_abs: float
    count: int

    @property
    def module(self) -> str:
        return _module(self.name)

    @property
    def kind(self) -> str:
        return module_kind(self.name)

    @property
    def layer(self) -> int | None:
        return layer_of(self.name)

    def as_dict(self) -> dict:
        return {
            "name": self.name, "kind": self.kind, "layer": self.layer,
            "relative_error": _round(self.relative_error, 6), "snr_db": _round(self.snr_db, 2),
            "robust_error": _round(self.robust_error, 6),
        }  # fmt: skip


@dataclass(frozen=True)
class Aggregate:
    """The energy-weighted error of several tensors (see the module's docstring)."""

    tensors: int
    weight_sq: float
    error_sq: float
    median: float  # median of the tensors' own relative errors
    median_robust: float  # median of their robust errors: the outlier rule's yardstick

    @classmethod
    def of(cls, items: list[TensorError]) -> Aggregate:
        """The aggregate of ITEMS (at least one)."""
        return cls(
            len(items), sum(t.weight_sq for t in items), sum(t.error_sq for t in items),
            statistics.median(t.relative_error for t in items),
            statistics.median(t.robust_error for t in items),
        )  # fmt: skip

    @property
    def relative_error(self) -> float:
        return relative_error(self.weight_sq, self.error_sq)

    @property
    def snr_db(self) -> float:
        return snr_db(self.weight_sq, self.error_sq)

    def as_dict(self) -> dict:
        return {
            "tensors": self.tensors, "relative_error": _round(self.relative_error, 6),
            "snr_db": _round(self.snr_db, 2), "median_relative_error": _round(self.median, 6),
            "median_robust_error": _round(self.median_robust, 6),
        }  # fmt: skip


@dataclass
class QualityReport:
    """Everything the report says; built by :func:`build_report`."""

    scheme: str
    tensors: list[TensorError]
    overall: Aggregate | None = None
    by_kind: dict[str, Aggregate] = field(default_factory=dict)
    experts_by_layer: dict[int, Aggregate] = field(default_factory=dict)
    worst: list[TensorError] = field(default_factory=list)
    outliers: list[TensorError] = field(default_factory=list)
    # the modules to keep unquantized next time (exact names, ignore entries as they are)
    suggested_ignore: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        """Plain data for `--json`: overall, by kind, experts per layer, worst, outliers, the
        suggested ignore list and every tensor (in name order)."""
        return {
            "scheme": self.scheme,
            "overall": self.overall.as_dict() if self.overall else None,
            "by_kind": {k: a.as_dict() for k, a in self.by_kind.items()},
            "experts_by_layer": {str(k): a.as_dict() for k, a in self.experts_by_layer.items()},
            "worst": [t.name for t in self.worst],
            "outlier_rule": f"robust error > {OUTLIER_FACTOR:g}x its kind's median "
            f"(kinds of at least {OUTLIER_MIN_KIND} tensors)",
            "outliers": [t.name for t in self.outliers],
            "suggested_ignore": self.suggested_ignore,
            "tensors": [t.as_dict() for t in self.tensors],
        }


def build_report(errors: dict[str, ErrorSums], scheme: str) -> QualityReport:
    """The report of ERRORS (weight name -> its error sums) for a run with SCHEME."""
    tensors = [
        TensorError(n, e.weight_sq, e.error_sq, e.weight_abs, e.count)
        for n, e in sorted(errors.items(), key=lambda kv: natural_key(kv[0]))
    ]
    report = QualityReport(scheme, tensors)
    if not tensors:
        return report
    report.overall = Aggregate.of(tensors)
    kinds: dict[str, list[TensorError]] = {}
    for t in tensors:
        kinds.setdefault(t.kind, []).append(t)
    report.by_kind = {k: Aggregate.of(kinds[k]) for k in KINDS if k in kinds}
    layers: dict[int, list[TensorError]] = {}
    for t in kinds.get("experts", []):
        if t.layer is not None:
            layers.setdefault(t.layer, []).append(t)
    report.experts_by_layer = {i: Aggregate.of(layers[i]) for i in sorted(layers)}
    report.worst = sorted(tensors, key=lambda t: -t.relative_error)[:WORST]
    report.outliers = [
        t for t in sorted(tensors, key=lambda t: -t.robust_error)
        if len(kinds[t.kind]) >= OUTLIER_MIN_KIND
        and t.robust_error > OUTLIER_FACTOR * report.by_kind[t.kind].median_robust
    ]  # fmt: skip
    report.suggested_ignore = sorted({t.module for t in report.outliers}, key=natural_key)
    return report


def _pct(x: float) -> str:
    if not math.isfinite(x):
        return "inf"
    return f"{100 * x:.2f}%" if x < 0.1 else f"{100 * x:.1f}%"


def _db(x: float) -> str:
    return f"{x:.1f} dB" if math.isfinite(x) else ("exact" if x > 0 else "-inf dB")


def summary_line(report: QualityReport, ignore_flag: str = "--ignore") -> str:
    """One line: the overall error and SNR, the worst tensor, the outliers with the ignore
    entries to use (each after IGNORE_FLAG, the front end's word for the ignore setting)."""
    if report.overall is None:
        return "quality: no quantized weight measured"
    o = report.overall
    worst = report.worst[0]
    line = (
        f"quality: rel. error {_pct(o.relative_error)} (SNR {_db(o.snr_db)}) overall; "
        f"worst {worst.module} {_pct(worst.relative_error)}"
    )
    n = len(report.outliers)
    if n:
        if n <= 3:
            entries = " ".join(f"{ignore_flag} {m}" for m in report.suggested_ignore)
        else:
            entries = f"{ignore_flag} " + ", ".join(collapse_names(report.suggested_ignore))
        line += f"; {n} outlier{'s' if n > 1 else ''}: {entries}"
    return line


def card_section(report: QualityReport) -> list[str]:
    """The model card's "Quantization error" section, as lines (empty: nothing was measured)."""
    if report.overall is None:
        return []
    o = report.overall
    lines = [
        "## Quantization error",
        "",
        f"How much {report.scheme} changed the weights, measured while quantizing: the relative "
        "error ‖W − deq(Q(W))‖ / ‖W‖ and the SNR 10·log10(‖W‖² / ‖W − deq(Q(W))‖²) of each "
        "quantized weight against the source (aggregates weight each tensor by its energy).",
        "",
        "| | tensors | rel. error | SNR | median rel. error |",
        "|---|---|---|---|---|",
        f"| **overall** | {o.tensors} | {_pct(o.relative_error)} | {_db(o.snr_db)} | {_pct(o.median)} |",
    ]
    for kind, a in report.by_kind.items():
        lines.append(f"| {kind} | {a.tensors} | {_pct(a.relative_error)} | {_db(a.snr_db)} | {_pct(a.median)} |")
    if report.experts_by_layer:
        lines += ["", "Experts per layer:", "", "| layer | tensors | rel. error | SNR |", "|---|---|---|---|"]
        for i, a in report.experts_by_layer.items():
            lines.append(f"| {i} | {a.tensors} | {_pct(a.relative_error)} | {_db(a.snr_db)} |")
    lines += ["", f"The {len(report.worst)} worst tensors:", "", "| tensor | kind | rel. error | SNR |", "|---|---|---|---|"]
    for t in report.worst:
        lines.append(f"| `{t.name}` | {t.kind} | {_pct(t.relative_error)} | {_db(t.snr_db)} |")
    lines.append("")
    if report.outliers:
        lines += [
            f"Outliers (error against the weight's typical magnitude above {OUTLIER_FACTOR:g}× "
            "their kind's median: a few large values ruined the scales of the rest): "
            + ", ".join(f"`{n}`" for n in collapse_names([t.name for t in report.outliers]))
            + ". To keep them unquantized, add to the command:",
            "",
            "```bash",
            " ".join(f"--ignore {m}" for m in report.suggested_ignore),
            "```",
            "",
        ]
    else:
        lines += [f"No outliers (no tensor's error above {OUTLIER_FACTOR:g}× its kind's median).", ""]
    return lines

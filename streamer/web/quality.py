"""The quality report in the Space's result panel: one sentence and a chart of the error by layer
and module kind (an inline SVG: no extra component, so the convert endpoint's outputs stay as
they are)."""

from __future__ import annotations

import html
import math

from streamer.engine.quality import KINDS, QualityReport
from streamer.errors import Hint
from streamer.web.wording import web_words

_COLORS = dict(zip(KINDS, ("#4e79a7", "#f28e2b", "#59a14f", "#b07aa1", "#9c9c9c")))
_W, _H, _PAD_L, _PAD_B, _PAD_T = 640, 220, 44, 28, 10


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%" if x < 0.1 else f"{100 * x:.1f}%"


def _by_layer(report: QualityReport) -> dict[str, dict[str, float]]:
    """layer label ("0", "1", …, "other" outside the layers) -> kind -> energy-weighted error."""
    sums: dict[str, dict[str, list[float]]] = {}
    for t in report.tensors:
        label = str(t.layer) if t.layer is not None else "other"
        acc = sums.setdefault(label, {}).setdefault(t.kind, [0.0, 0.0])
        acc[0] += t.error_sq
        acc[1] += t.weight_sq
    order = sorted(sums, key=lambda k: (k == "other", int(k) if k.isdigit() else 0))
    return {k: {kind: math.sqrt(e / w) if w > 0 else 0.0 for kind, (e, w) in sums[k].items()} for k in order}


def error_chart_svg(report: QualityReport) -> str:
    """A grouped bar chart (SVG): per layer, one bar per module kind, height = relative error."""
    data = _by_layer(report)
    kinds = [k for k in KINDS if any(k in row for row in data.values())]
    top = max((v for row in data.values() for v in row.values() if math.isfinite(v)), default=0.0) or 1.0
    plot_w, plot_h = _W - _PAD_L - 8, _H - _PAD_B - _PAD_T
    slot = plot_w / max(1, len(data))
    bar = max(1.0, slot * 0.8 / max(1, len(kinds)))
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{_H + 18}" role="img" '
        'aria-label="relative error by layer and module kind" style="font:11px sans-serif">',
        f'<line x1="{_PAD_L}" y1="{_PAD_T + plot_h}" x2="{_W - 8}" y2="{_PAD_T + plot_h}" stroke="#888"/>',
        f'<text x="{_PAD_L - 4}" y="{_PAD_T + 8}" text-anchor="end">{_pct(top)}</text>',
        f'<text x="{_PAD_L - 4}" y="{_PAD_T + plot_h}" text-anchor="end">0</text>',
    ]
    step = max(1, len(data) // 16)  # at most ~16 layer labels
    for i, (label, row) in enumerate(data.items()):
        x0 = _PAD_L + i * slot + slot * 0.1
        for j, kind in enumerate(kinds):
            v = row.get(kind)
            if v is None:
                continue
            h = plot_h * min(1.0, v / top) if math.isfinite(v) else plot_h
            parts.append(
                f'<rect x="{x0 + j * bar:.1f}" y="{_PAD_T + plot_h - h:.1f}" width="{bar:.1f}" height="{h:.1f}" '
                f'fill="{_COLORS[kind]}"><title>layer {html.escape(label)}, {kind}: {_pct(v)}</title></rect>'
            )
        if i % step == 0 or label == "other":
            parts.append(f'<text x="{x0 + slot * 0.4:.1f}" y="{_PAD_T + plot_h + 14}" text-anchor="middle">{html.escape(label)}</text>')
    x = _PAD_L
    for kind in kinds:  # legend
        parts.append(f'<rect x="{x}" y="{_H + 4}" width="10" height="10" fill="{_COLORS[kind]}"/>')
        parts.append(f'<text x="{x + 14}" y="{_H + 13}">{kind}</text>')
        x += 24 + 7 * len(kind)
    parts.append("</svg>")
    return "".join(parts)


def quality_html(report: QualityReport) -> str:
    """The result panel's quality block: overall error and SNR, the worst tensor, the outliers
    with what to put in the ignore list, and the chart."""
    if report.overall is None:
        return ""
    o = report.overall
    worst = report.worst[0]
    snr = f"{o.snr_db:.1f} dB" if math.isfinite(o.snr_db) else "exact"
    text = (
        f"<b>Quantization error</b>: {_pct(o.relative_error)} relative error (SNR {snr}) over "
        f"{o.tensors} weights; worst <code>{html.escape(worst.module)}</code> {_pct(worst.relative_error)}."
    )
    if report.outliers:
        text += (
            f" {len(report.outliers)} outlier(s), far above their kind's error: to keep them unquantized, "
            + html.escape(web_words(Hint("ignore", tuple(report.suggested_ignore))))
            + "."
        )
    return f'<div class="streamer-quality"><p>{text}</p>{error_chart_svg(report)}</div>'

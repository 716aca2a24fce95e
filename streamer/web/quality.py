"""The quality report in the Space's result panel: one sentence and a chart of the error by layer
and module kind (an inline SVG: no extra component, so the convert endpoint's outputs stay as
they are). A fan-out run shows its schemes side by side: a table of each scheme's overall error,
and one chart whose rows are the module kinds and whose bars, per layer, are the schemes.

Every colour is one of the theme's CSS variables (gradio sets them for light and dark), set in a
style attribute: SVG's own default (black text) would vanish on a dark page."""

from __future__ import annotations

import html
import math

from streamer.engine.quality import KINDS, QualityReport
from streamer.errors import Hint
from streamer.web.wording import web_words

# one theme palette colour per module kind (single chart) and per scheme (fan-out chart)
_KIND_COLORS = dict(zip(KINDS, ("blue", "orange", "green", "purple", "grey")))
_SERIES_COLORS = ("blue", "orange", "green", "purple", "pink", "teal", "amber", "indigo")
_TEXT = "fill:var(--body-text-color)"
_AXIS = "stroke:var(--body-text-color-subdued)"
_W, _H, _PAD_L, _PAD_B, _PAD_T = 640, 220, 44, 28, 10


def _fill(color: str) -> str:
    return f"fill:var(--color-{color}-500)"


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%" if x < 0.1 else f"{100 * x:.1f}%"


def _layer_order(labels) -> list[str]:
    return sorted(labels, key=lambda k: (k == "other", int(k) if k.isdigit() else 0))


def _by_layer(report: QualityReport) -> dict[str, dict[str, float]]:
    """layer label ("0", "1", …, "other" outside the layers) -> kind -> energy-weighted error."""
    sums: dict[str, dict[str, list[float]]] = {}
    for t in report.tensors:
        label = str(t.layer) if t.layer is not None else "other"
        acc = sums.setdefault(label, {}).setdefault(t.kind, [0.0, 0.0])
        acc[0] += t.error_sq
        acc[1] += t.weight_sq
    return {
        k: {kind: math.sqrt(e / w) if w > 0 else 0.0 for kind, (e, w) in sums[k].items()}
        for k in _layer_order(sums)
    }


def _top(values) -> float:
    return max((v for v in values if math.isfinite(v)), default=0.0) or 1.0


def _bar(x: float, base: float, plot_h: float, v: float, top: float, width: float, color: str, title: str) -> str:
    h = plot_h * min(1.0, v / top) if math.isfinite(v) else plot_h
    return (
        f'<rect x="{x:.1f}" y="{base - h:.1f}" width="{width:.1f}" height="{h:.1f}" style="{_fill(color)}">'
        f"<title>{html.escape(title)}</title></rect>"
    )


def _legend(items: list[tuple[str, str]], y: float) -> list[str]:
    parts, x = [], _PAD_L
    for name, color in items:
        parts.append(f'<rect x="{x}" y="{y}" width="10" height="10" style="{_fill(color)}"/>')
        parts.append(f'<text x="{x + 14}" y="{y + 9}" style="{_TEXT}">{html.escape(name)}</text>')
        x += 24 + 7 * len(name)
    return parts


def error_chart_svg(report: QualityReport) -> str:
    """A grouped bar chart (SVG): per layer, one bar per module kind, height = relative error."""
    data = _by_layer(report)
    kinds = [k for k in KINDS if any(k in row for row in data.values())]
    top = _top(v for row in data.values() for v in row.values())
    plot_w, plot_h = _W - _PAD_L - 8, _H - _PAD_B - _PAD_T
    slot = plot_w / max(1, len(data))
    bar = max(1.0, slot * 0.8 / max(1, len(kinds)))
    base = _PAD_T + plot_h
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{_H + 18}" role="img" '
        'aria-label="relative error by layer and module kind" style="font:11px sans-serif">',
        f'<line x1="{_PAD_L}" y1="{base}" x2="{_W - 8}" y2="{base}" style="{_AXIS}"/>',
        f'<text x="{_PAD_L - 4}" y="{_PAD_T + 8}" text-anchor="end" style="{_TEXT}">{_pct(top)}</text>',
        f'<text x="{_PAD_L - 4}" y="{base}" text-anchor="end" style="{_TEXT}">0</text>',
    ]
    step = max(1, len(data) // 16)  # at most ~16 layer labels
    for i, (label, row) in enumerate(data.items()):
        x0 = _PAD_L + i * slot + slot * 0.1
        for j, kind in enumerate(kinds):
            v = row.get(kind)
            if v is not None:
                parts.append(_bar(x0 + j * bar, base, plot_h, v, top, bar, _KIND_COLORS[kind], f"layer {label}, {kind}: {_pct(v)}"))
        if i % step == 0 or label == "other":
            parts.append(f'<text x="{x0 + slot * 0.4:.1f}" y="{base + 14}" text-anchor="middle" style="{_TEXT}">{html.escape(label)}</text>')
    parts += _legend([(k, _KIND_COLORS[k]) for k in kinds], _H + 4)
    parts.append("</svg>")
    return "".join(parts)


def compare_chart_svg(reports: list[tuple[str, QualityReport]]) -> str:
    """The schemes side by side (SVG): a row per module kind, on its own scale; in each row, per
    layer, one bar per scheme, coloured by scheme. Each scheme's bars are one <g data-series>.

    reports: (scheme, its report) pairs, in the order of the legend."""
    layers = {name: _by_layer(r) for name, r in reports}
    labels = _layer_order({label for data in layers.values() for label in data})
    kinds = [k for k in KINDS if any(k in row for data in layers.values() for row in data.values())]
    row_h, gap = 90, 26
    plot_w = _W - _PAD_L - 8
    slot = plot_w / max(1, len(labels))
    bar = max(1.0, slot * 0.8 / max(1, len(reports)))
    height = _PAD_T + len(kinds) * (row_h + gap) + 22
    axes: list[str] = []
    series: dict[str, list[str]] = {name: [] for name, _ in reports}
    step = max(1, len(labels) // 16)
    for r, kind in enumerate(kinds):
        top_y = _PAD_T + r * (row_h + gap) + 14
        base = top_y + row_h - 14
        plot_h = base - top_y
        top = _top(data.get(label, {}).get(kind, 0.0) for data in layers.values() for label in labels)
        axes += [
            f'<text x="{_PAD_L}" y="{top_y - 4}" style="{_TEXT};font-weight:600">{html.escape(kind)}</text>',
            f'<line x1="{_PAD_L}" y1="{base}" x2="{_W - 8}" y2="{base}" style="{_AXIS}"/>',
            f'<text x="{_PAD_L - 4}" y="{top_y + 8}" text-anchor="end" style="{_TEXT}">{_pct(top)}</text>',
            f'<text x="{_PAD_L - 4}" y="{base}" text-anchor="end" style="{_TEXT}">0</text>',
        ]
        for i, label in enumerate(labels):
            x0 = _PAD_L + i * slot + slot * 0.1
            for j, (name, _) in enumerate(reports):
                v = layers[name].get(label, {}).get(kind)
                if v is not None:
                    color = _SERIES_COLORS[j % len(_SERIES_COLORS)]
                    series[name].append(_bar(x0 + j * bar, base, plot_h, v, top, bar, color, f"layer {label}, {kind}, {name}: {_pct(v)}"))
            if i % step == 0 or label == "other":
                axes.append(f'<text x="{x0 + slot * 0.4:.1f}" y="{base + 13}" text-anchor="middle" style="{_TEXT}">{html.escape(label)}</text>')
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{height}" role="img" '
        'aria-label="relative error by layer and module kind, per scheme" style="font:11px sans-serif">',
        *axes,
        *(f'<g data-series="{html.escape(name, quote=True)}">{"".join(bars)}</g>' for name, bars in series.items()),
        *_legend([(name, _SERIES_COLORS[j % len(_SERIES_COLORS)]) for j, (name, _) in enumerate(reports)], height - 16),
        "</svg>",
    ]
    return "".join(parts)


def _outliers_text(report: QualityReport) -> str:
    if not report.outliers:
        return ""
    return (
        f" {len(report.outliers)} outlier(s), far above their kind's error: to keep them unquantized, "
        + html.escape(web_words(Hint("ignore", tuple(report.suggested_ignore))))
        + "."
    )


def _snr(report: QualityReport) -> str:
    snr = report.overall.snr_db
    return f"{snr:.1f} dB" if math.isfinite(snr) else "exact"


def quality_html(report: QualityReport) -> str:
    """The result panel's quality block: overall error and SNR, the worst tensor, the outliers
    with what to put in the ignore list, and the chart."""
    if report.overall is None:
        return ""
    o = report.overall
    worst = report.worst[0]
    text = (
        f"<b>Quantization error</b>: {_pct(o.relative_error)} relative error (SNR {_snr(report)}) over "
        f"{o.tensors} weights; worst <code>{html.escape(worst.module)}</code> {_pct(worst.relative_error)}."
    )
    text += _outliers_text(report)
    return f'<div class="streamer-quality"><p>{text}</p>{error_chart_svg(report)}</div>'


def compare_quality_html(reports: list[tuple[str, QualityReport]]) -> str:
    """A fan-out's quality block: a line per scheme (overall error, SNR, worst tensor, outliers)
    and one chart with the schemes side by side. Reports with no measured weight are left out.

    reports: (scheme, its report) pairs, in the run's order of targets."""
    reports = [(name, r) for name, r in reports if r is not None and r.overall is not None]
    if not reports:
        return ""
    if len(reports) == 1:
        return quality_html(reports[0][1])
    rows = "".join(
        f"<li><b>{html.escape(name)}</b>: {_pct(r.overall.relative_error)} relative error (SNR {_snr(r)}) over "
        f"{r.overall.tensors} weights; worst <code>{html.escape(r.worst[0].module)}</code> "
        f"{_pct(r.worst[0].relative_error)}.{_outliers_text(r)}</li>"
        for name, r in reports
    )
    return (
        '<div class="streamer-quality"><p><b>Quantization error, scheme by scheme</b>:</p>'
        f"<ul>{rows}</ul>{compare_chart_svg(reports)}</div>"
    )

"""Writes an audit: ``audit.json`` for machines and ``report.html`` for a reviewer.

``report.html`` is one self-contained file (every picture is an inline base64 PNG) with, in
order: the verdict (flagged classes and why), the per-class table, the per-class mean maps,
histograms of mask energy, border energy and concentration per class (with the thresholds), the
completeness residuals, and overlays of the flagged images, the least and the most on-object
images and the most on-border images (object mask outlined in white).

Example:
    >>> paths = write_audit(audit, "out/")
    >>> paths["html"]
    'out/report.html'
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["audit_json", "render_html", "write_audit"]

_STAT_LABELS = {
    "mask_energy": "mask energy",
    "border_energy": "border energy",
    "concentration": "concentration (top 5%)",
}


# -- JSON ----------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None  # strict JSON has no NaN / Infinity
    return value


def audit_json(audit: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON part of an audit: arrays dropped, example lists reduced to ids, NaN -> null.

    Args:
        audit: The dict ``ComputeAudit`` yields.

    Returns:
        A dict that ``json.dumps`` writes as strict JSON.

    Example:
        >>> json.dumps(audit_json(audit), allow_nan=False)
    """
    out = {k: v for k, v in audit.items() if k not in ("mean_maps", "examples", "drift_maps")}
    out["examples"] = {
        name: [str(r.get("id")) for r in records]
        for name, records in audit.get("examples", {}).items()
    }
    return _jsonable(out)


# -- pictures ------------------------------------------------------------------------------


def _png_base64(array: np.ndarray) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.asarray(array, np.uint8)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _figure_base64(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _outline(mask: np.ndarray) -> np.ndarray:
    """The inner boundary of a bool mask."""
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return mask & ~inner


def _overlay_picture(record: Mapping[str, Any], scale: int = 2) -> np.ndarray:
    from fullgrad.utils import overlay

    saliency = np.asarray(record["map"], np.float32)
    if saliency.ndim == 3:
        saliency = saliency[..., 0]
    thumbnail = record.get("thumbnail")
    if thumbnail is None:
        thumbnail = np.full((*saliency.shape, 3), 128, np.uint8)
    picture = overlay(np.asarray(thumbnail), saliency, alpha=0.5)
    mask = record.get("mask")
    if mask is not None and np.asarray(mask).shape == picture.shape[:2]:
        picture[_outline(np.asarray(mask, bool))] = 255
    return np.kron(picture, np.ones((scale, scale, 1), np.uint8))


def _mean_maps_figure(audit: Mapping[str, Any]) -> str | None:
    from matplotlib.figure import Figure

    maps = {k: v for k, v in audit.get("mean_maps", {}).items() if v is not None}
    if not maps:
        return None
    classes = audit["classes"]
    figure = Figure(figsize=(2.6 * len(maps), 2.9))
    for index, (target, mean_map) in enumerate(maps.items()):
        axis = figure.add_subplot(1, len(maps), index + 1)
        image = axis.imshow(mean_map, cmap="jet", vmin=0.0, vmax=max(float(mean_map.max()), 1e-6))
        info = classes[target]
        flag = "  FLAGGED" if info["flagged"] else ""
        axis.set_title(
            f"class {info['name']}{flag}\nn={info['count']}, mask energy {_fmt(info['mask_energy'])}",
            fontsize=8,
            color="crimson" if info["flagged"] else "black",
        )
        axis.axis("off")
        figure.colorbar(image, ax=axis, fraction=0.046, pad=0.04)
    return _figure_base64(figure)


def _histograms_figure(audit: Mapping[str, Any]) -> str | None:
    from matplotlib.figure import Figure

    classes = audit["classes"]
    if not classes:
        return None
    settings = audit["settings"]
    thresholds = {
        "mask_energy": settings["image_mask_energy_min"],
        "border_energy": settings["image_border_energy_max"],
    }
    figure = Figure(figsize=(13, 3.2))
    for index, (name, label) in enumerate(_STAT_LABELS.items()):
        axis = figure.add_subplot(1, len(_STAT_LABELS), index + 1)
        for info in classes.values():
            counts = np.asarray(info["statistics"][name]["histogram"], float)
            if counts.sum() == 0:
                continue
            edges = np.linspace(0.0, 1.0, len(counts) + 1)
            axis.stairs(
                counts / counts.sum(),
                edges,
                label=f"class {info['name']}",
                linewidth=2.5 if info["flagged"] else 1.2,
                linestyle="-" if info["flagged"] else "--",
            )
        if name in thresholds:
            axis.axvline(thresholds[name], color="black", linewidth=0.8)
        axis.set_title(label, fontsize=9)
        axis.set_xlabel(
            "share of the salient mass" if name != "concentration" else "share of the mass"
        )
        axis.set_ylabel("share of the class's images")
    figure.axes[0].legend(fontsize=7)
    figure.tight_layout()
    return _figure_base64(figure)


def _residual_figure(audit: Mapping[str, Any]) -> str | None:
    from matplotlib.figure import Figure

    counts = audit.get("dataset", {}).get("residual", {}).get("log10_histogram") or []
    if not counts or sum(counts) == 0:
        return None
    figure = Figure(figsize=(5, 2.6))
    axis = figure.add_subplot(1, 1, 1)
    axis.stairs(counts, np.linspace(-10.0, 1.0, len(counts) + 1), fill=True)
    axis.set_xlabel("log10 relative completeness residual")
    axis.set_ylabel("images")
    figure.tight_layout()
    return _figure_base64(figure)


# -- HTML ----------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "&ndash;"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return html.escape(str(value))


def _sci(value: Any) -> str:
    if value is None or not math.isfinite(float(value)):
        return "&ndash;"
    return f"{float(value):.1e}"


def _img(data: str | None, alt: str) -> str:
    if data is None:
        return f"<p><em>{html.escape(alt)}: nothing to show.</em></p>"
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _class_table(audit: Mapping[str, Any]) -> str:
    head = (
        "<tr><th>class</th><th>images</th><th>label = class</th><th>mask energy</th>"
        "<th>mask area</th><th>pointing game</th><th>border energy</th><th>concentration</th>"
        "<th>entropy</th><th>flagged images</th><th>residual (max)</th><th>verdict</th></tr>"
    )
    rows = []
    for info in audit["classes"].values():
        verdict = (
            "<b>flagged</b>: " + ", ".join(html.escape(r) for r in info["reasons"])
            if info["flagged"]
            else "ok"
        )
        rows.append(
            f'<tr class="{"flagged" if info["flagged"] else ""}">'
            f"<td>{html.escape(info['name'])}</td><td>{info['count']}</td>"
            f"<td>{_fmt(info['accuracy'])}</td><td>{_fmt(info['mask_energy'])}</td>"
            f"<td>{_fmt(info['mask_area'])}</td><td>{_fmt(info['pointing_game'])}</td>"
            f"<td>{_fmt(info['border_energy'])}</td><td>{_fmt(info['concentration'])}</td>"
            f"<td>{_fmt(info['entropy'])}</td><td>{info['flagged_images']['any']}</td>"
            f"<td>{_sci(info['residual']['max']) if info['residual']['count'] else '&ndash;'}"
            f"</td><td>{verdict}</td></tr>"
        )
    return f"<table>{head}{''.join(rows)}</table>"


def _gallery(records: Sequence[Mapping[str, Any]], settings: Mapping[str, Any]) -> str:
    if not records:
        return "<p><em>No images.</em></p>"
    names = settings.get("class_names") or []
    cells = []
    for record in records:
        target = int(record["target"])
        name = f"{target} ({names[target]})" if 0 <= target < len(names) else str(target)
        label = record.get("label")
        caption = (
            f"<b>{html.escape(str(record.get('id')))}</b><br>explained class {html.escape(name)}"
            f"{'' if label is None else f', label {html.escape(str(label))}'}<br>"
            f"mask {_fmt(record.get('mask_energy'), 2)} &middot; "
            f"border {_fmt(record.get('border_energy'), 2)}"
        )
        if record.get("flags"):
            caption += "<br><span class=flag>" + ", ".join(record["flags"]) + "</span>"
        cells.append(
            f"<figure>{_img(_png_base64(_overlay_picture(record)), str(record.get('id')))}"
            f"<figcaption>{caption}</figcaption></figure>"
        )
    return f'<div class="gallery">{"".join(cells)}</div>'


_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:1300px;color:#222}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 7px}
tr.flagged{background:#fde2e2}.gallery{display:flex;flex-wrap:wrap;gap:10px}
figure{margin:0;font-size:11px;width:140px}figure img{image-rendering:pixelated;width:128px}
.flag{color:crimson}.verdict{font-size:15px;padding:.6em;border-left:4px solid crimson;
background:#fff4f4}.ok{border-left-color:seagreen;background:#f3fbf5}code{font-size:12px}
"""

_SECTIONS = {
    "flagged_examples": "Flagged images (most severe first)",
    "least_on_object": "Least on the object (lowest mask energy)",
    "most_on_object": "Most on the object (highest mask energy)",
    "most_on_border": "Most on the border (highest border energy)",
}


def render_html(audit: Mapping[str, Any]) -> str:
    """The report as one self-contained HTML string.

    Args:
        audit: The dict ``ComputeAudit`` yields.

    Returns:
        HTML text with every picture inlined.

    Example:
        >>> open("report.html", "w").write(render_html(audit))
    """
    settings = audit["settings"]
    flagged = audit["flagged_classes"]
    classes = audit["classes"]
    if flagged:
        verdict = "Flagged classes: " + "; ".join(
            f"<b>{html.escape(classes[t]['name'])}</b> ({', '.join(classes[t]['reasons'])})"
            for t in flagged
        )
        verdict_class = "verdict"
    else:
        verdict, verdict_class = "No class is flagged.", "verdict ok"
    examples = audit.get("examples", {})
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>fullgrad audit</title>",
        f"<style>{_STYLE}</style></head><body>",
        "<h1>FullGrad attribution audit</h1>",
        (
            f"<p>{audit['images']} explained images, {len(classes)} classes; "
            f"{audit['flagged_images_total']} images flagged.</p>"
        ),
        f'<p class="{verdict_class}">{verdict}</p>',
        (
            "<p>Mask energy: share of the saliency map's salient mass (the map above its "
            f"{settings['floor_quantile']:.0%} quantile) inside the object mask; mask area: the "
            "mask's share of the image. Border energy: share of the salient mass in the outer "
            f"band ({settings['border_fraction']:.0%} of the side). Pointing game: the map's "
            "maximum "
            "falls on the object. A class is flagged when its saliency lies off the object or on "
            "the border, against fixed thresholds and against the median of the other classes.</p>"
        ),
        "<h2>Classes</h2>",
        _class_table(audit),
        "<h2>Mean saliency map per class</h2>",
        _img(_mean_maps_figure(audit), "mean maps"),
        "<h2>Distributions per class</h2>",
        (
            "<p>Flagged classes are drawn with thick solid lines; the black lines are the "
            "image thresholds.</p>"
        ),
        _img(_histograms_figure(audit), "histograms"),
    ]
    from fullgrad.audit.drift_report import report_sections  # it draws with this module's helpers

    parts += report_sections(audit)  # drift against a baseline; strategies (SpRAy clusters)
    for name, title in _SECTIONS.items():
        parts += [f"<h2>{html.escape(title)}</h2>", _gallery(examples.get(name, []), settings)]
    residual = audit.get("dataset", {}).get("residual", {})
    parts += [
        "<h2>Completeness residuals</h2>",
        (
            f"<p>Relative residual of FullGrad's completeness identity: mean "
            f"{_sci(residual.get('mean'))}, max {_sci(residual.get('max'))}, "
            f"{residual.get('violations', 0)} above {settings['residual_tolerance']:g} "
            "(near zero for ReLU networks; large values mean the identity does not hold for this "
            "model, e.g. swish/GELU).</p>"
        ),
        _img(_residual_figure(audit), "residual histogram"),
        "<h2>Settings</h2><table>",
        *(
            f"<tr><td><code>{html.escape(k)}</code></td><td>{html.escape(str(v))}</td></tr>"
            for k, v in settings.items()
        ),
        "</table></body></html>",
    ]
    return "\n".join(parts)


# -- files ---------------------------------------------------------------------------------


def _write(path: str, data: bytes) -> None:
    if "://" in path and not path.startswith("file://"):
        from apache_beam.io.filesystems import FileSystems

        with FileSystems.create(path) as handle:
            handle.write(data)
        return
    path = path.removeprefix("file://")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(data)


def write_audit(audit: Mapping[str, Any], output_dir: str) -> dict[str, str]:
    """Writes ``audit.json`` and ``report.html`` into ``output_dir`` (local or a Beam URI).

    Args:
        audit: The dict ``ComputeAudit`` yields.
        output_dir: Folder to write into; created when local.

    Returns:
        ``{"json": path, "html": path}``.

    Example:
        >>> write_audit(audit, "gs://bucket/audit/")["html"]
        'gs://bucket/audit/report.html'
    """
    base = output_dir.rstrip("/")
    paths = {"json": f"{base}/audit.json", "html": f"{base}/report.html"}
    text = json.dumps(audit_json(audit), indent=2, allow_nan=False)
    _write(paths["json"], text.encode("utf-8"))
    _write(paths["html"], render_html(audit).encode("utf-8"))
    return paths

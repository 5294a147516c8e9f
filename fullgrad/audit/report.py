"""Writes an audit: ``audit.json`` for machines and ``report.html`` for a reviewer.

``report.html`` is one self-contained file (every picture is an inline base64 PNG) with, in
order: the verdict (flagged classes and why, naming the part of the map), a "How to read this"
block with the formulas, the per-class table (each location statistic beside its chance level
and lift, and the parts' lifts), the per-class mean maps, the per-class mean maps of the map's
parts (a grid: classes by parts), histograms of the lifts (over [-1, 1]) and of concentration
per class (with the thresholds), the completeness residuals, and overlays of the flagged
images, the least and the most on-object images and the most on-border images (object mask
outlined in white).

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

from fullgrad.audit.parts import reason_text
from fullgrad.audit.stats import statistic_range
from fullgrad.parts import PART_LABELS, PARTS

__all__ = ["audit_json", "render_html", "write_audit", "write_bytes"]

_STAT_LABELS = {
    "mask_lift": "mask lift (over the mask's area share)",
    "border_lift": "border lift (over the band's area share)",
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
    out = {k: v for k, v in audit.items()
           if k not in ("mean_maps", "mean_part_maps", "examples", "drift_maps")}
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
            f"class {info['name']}{flag}\nn={info['count']}, mask lift {_fmt(info['mask_lift'])}",
            fontsize=8,
            color="crimson" if info["flagged"] else "black",
        )
        axis.axis("off")
        figure.colorbar(image, ax=axis, fraction=0.046, pad=0.04)
    return _figure_base64(figure)


def _part_maps_figure(audit: Mapping[str, Any]) -> str | None:
    """A grid: one row per class, the full mean map then each part's mean map."""
    from matplotlib.figure import Figure

    parts = {k: v for k, v in audit.get("mean_part_maps", {}).items() if v is not None}
    if not parts:
        return None
    classes, full = audit["classes"], audit.get("mean_maps", {})
    columns = 1 + len(PARTS)
    figure = Figure(figsize=(1.7 * columns, 1.8 * len(parts)))
    for row, (target, part_maps) in enumerate(parts.items()):
        info = classes[target]
        pictures = [("map", full.get(target)), *zip(PARTS, part_maps, strict=True)]
        for column, (name, picture) in enumerate(pictures):
            axis = figure.add_subplot(len(parts), columns, row * columns + column + 1)
            axis.axis("off")
            if picture is None:
                continue
            axis.imshow(picture, cmap="jet", vmin=0.0, vmax=max(float(picture.max()), 1e-6))
            flagged = any(r.startswith(f"{name}:") for r in info["reasons"]) or (
                name == "map" and {"off_object", "on_border"} & set(info["reasons"])
            )
            label = "full map" if name == "map" else PART_LABELS[name]
            axis.set_title(
                f"{info['name']}: {label}" if column == 0 else label,
                fontsize=7,
                color="crimson" if flagged else "black",
            )
    figure.tight_layout()
    return _figure_base64(figure)


def _histograms_figure(audit: Mapping[str, Any]) -> str | None:
    from matplotlib.figure import Figure

    classes = audit["classes"]
    if not classes:
        return None
    settings = audit["settings"]
    thresholds = {
        "mask_lift": settings["image_mask_lift_min"],
        "border_lift": settings["image_border_lift_max"],
    }
    figure = Figure(figsize=(13, 3.2))
    for index, (name, label) in enumerate(_STAT_LABELS.items()):
        axis = figure.add_subplot(1, len(_STAT_LABELS), index + 1)
        for info in classes.values():
            counts = np.asarray(info["statistics"][name]["histogram"], float)
            if counts.sum() == 0:
                continue
            edges = np.linspace(*statistic_range(name), len(counts) + 1)
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
            "(share - chance) / (1 - chance)" if name != "concentration" else "share of the mass"
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
        "<tr><th rowspan=2>class</th><th rowspan=2>images</th><th rowspan=2>label = class</th>"
        "<th colspan=3>mask energy</th><th colspan=3>border energy</th>"
        "<th rowspan=2>pointing game</th><th rowspan=2>concentration</th>"
        f"<th colspan={len(PARTS)}>part: border lift / mask lift</th>"
        "<th rowspan=2>flagged images</th><th rowspan=2>residual (max)</th>"
        "<th rowspan=2>verdict</th></tr><tr><th>raw</th><th>chance</th><th>lift</th>"
        "<th>raw</th><th>chance</th><th>lift</th>"
        + "".join(f"<th>{html.escape(PART_LABELS[p])}</th>" for p in PARTS)
        + "</tr>"
    )
    rows = []
    for info in audit["classes"].values():
        verdict = (
            "<b>flagged</b>: " + "; ".join(html.escape(reason_text(r)) for r in info["reasons"])
            if info["flagged"]
            else "ok"
        )
        parts = info.get("parts", {})
        part_cells = "".join(
            f"<td>{_fmt(parts.get(p, {}).get('border_lift'), 2)} / "
            f"{_fmt(parts.get(p, {}).get('mask_lift'), 2)}</td>"
            for p in PARTS
        )
        rows.append(
            f'<tr class="{"flagged" if info["flagged"] else ""}">'
            f"<td>{html.escape(info['name'])}</td><td>{info['count']}</td>"
            f"<td>{_fmt(info['accuracy'])}</td><td>{_fmt(info['mask_energy'])}</td>"
            f"<td>{_fmt(info['mask_chance'])}</td><td><b>{_fmt(info['mask_lift'])}</b></td>"
            f"<td>{_fmt(info['border_energy'])}</td><td>{_fmt(info['border_chance'])}</td>"
            f"<td><b>{_fmt(info['border_lift'])}</b></td><td>{_fmt(info['pointing_game'])}</td>"
            f"<td>{_fmt(info['concentration'])}</td>{part_cells}"
            f"<td>{info['flagged_images']['any']}</td>"
            f"<td>{_sci(info['residual']['max']) if info['residual']['count'] else '&ndash;'}"
            f"</td><td>{verdict}</td></tr>"
        )
    return f"<table>{head}{''.join(rows)}</table>"


def _how_to_read(settings: Mapping[str, Any]) -> str:
    """The formulas behind the table, in the report's words."""
    return (
        "<h2>How to read this</h2><ul>"
        f"<li><b>Salient part</b> <code>s' = max(s - q, 0)</code>, <code>q</code> the map's "
        f"{settings['floor_quantile']:.0%} quantile: the brightest pixels, as an overlay shows "
        "them.</li>"
        "<li><b>Mask energy</b> <code>e = sum(s'[mask]) / sum(s')</code>; its <b>chance</b> "
        "level <code>c = mean(mask)</code> is the mask's area share, what a map with no "
        "preference scores. <b>Border energy</b> likewise over the outer band "
        f"({settings['border_fraction']:.0%} of the side), chance the band's area share.</li>"
        "<li><b>Lift</b> <code>(e - c) / (1 - c)</code>: 0 at chance, 1 with all the salient "
        "mass in the region, negative below chance. Flags read the lifts, so that a class of "
        "small or thin objects is not called off-object for its size.</li>"
        f"<li>An image is <i>off the object</i> when its mask lift is below "
        f"{settings['image_mask_lift_min']:g}, <i>on the border</i> when its border lift is "
        f"above {settings['image_border_lift_max']:g}. A class is flagged when its mean mask "
        f"lift is below {settings['class_mask_lift_min']:g}, its mean border lift above "
        f"{settings['class_border_lift_max']:g} (or above chance and "
        f"{settings['class_border_lift_margin']:g} above the other classes' median), or more "
        f"than {settings['class_flagged_share']:.0%} of its images are flagged.</li>"
        "<li><b>Parts.</b> FullGrad's map sums an input term (<code>x * grad x</code>) and one "
        "bias term per layer; the parts are the input term and the bias terms grouped by "
        "resolution (fine: at least 1/4 of the input side, mid: 1/8 to 1/4, coarse: below), "
        "each post-processed as FullGrad does and min-max normalised. A part flags a class "
        "when its lift stands "
        f"{settings['part_lift_margin']:g} away from the other classes' median for that part "
        "(on the border: above chance; off the object: also below the class threshold). A "
        "shortcut can show in one part and be washed out of the sum.</li></ul>"
    )


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
            f"mask lift {_fmt(record.get('mask_lift'), 2)} &middot; "
            f"border lift {_fmt(record.get('border_lift'), 2)}"
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
    "least_on_object": "Least on the object (lowest mask lift)",
    "most_on_object": "Most on the object (highest mask lift)",
    "most_on_border": "Most on the border (highest border lift)",
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
            f"<b>{html.escape(classes[t]['name'])}</b> "
            f"({html.escape('; '.join(reason_text(r) for r in classes[t]['reasons']))})"
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
        _how_to_read(settings),
        "<h2>Classes</h2>",
        _class_table(audit),
        "<h2>Mean saliency map per class</h2>",
        _img(_mean_maps_figure(audit), "mean maps"),
        "<h2>Mean maps of the map's parts, per class</h2>",
        _img(_part_maps_figure(audit), "mean part maps (the job explains parts with --audit)"),
        "<h2>Distributions per class</h2>",
        (
            "<p>Flagged classes are drawn with thick solid lines; the black lines are the "
            "image thresholds; lifts span [-1, 1] (0 is chance).</p>"
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


def write_bytes(path: str, data: bytes) -> None:
    """Writes ``data`` to a local path (folders made) or a Beam URI (``gs://``, ``s3://``).

    Example:
        >>> write_bytes("out/report.html", page.encode("utf-8"))
    """
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
    write_bytes(paths["json"], text.encode("utf-8"))
    write_bytes(paths["html"], render_html(audit).encode("utf-8"))
    return paths

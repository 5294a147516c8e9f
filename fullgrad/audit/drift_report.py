"""The report's sections on drift (against a baseline run) and on strategies (SpRAy clusters).

:func:`report_sections` returns HTML fragments that ``fullgrad.audit.report.render_html``
places after the per-class distributions:

- **Drift** (when the audit has a ``drift`` section): the verdict, a table per class (map
  distance, the shifts whose interval excludes 0, the predicted mix distance, the reasons), and
  the baseline's and this run's coarse mean maps side by side per class, with the distance.
- **Strategies** (when the audit has a ``strategies`` section): the verdicts, then per class
  every cluster's size and share, its mean (downsampled) map, its mean statistics and exemplar
  overlays (the sampled images nearest the cluster's mean map).

Example:
    >>> html = "".join(report_sections(audit))
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from typing import Any

import numpy as np

from fullgrad.audit.report import _figure_base64, _fmt, _gallery, _img
from fullgrad.audit.sampling import strategy_example_name

__all__ = ["report_sections"]

#: Statistics shown per cluster (where the audit has them).
_CLUSTER_STATISTICS = ("border_energy", "concentration", "entropy", "mask_energy")


def _class_name(audit: Mapping[str, Any], key: str) -> str:
    info = audit.get("classes", {}).get(key)
    return str(info["name"]) if info else key


def _maps_figure(audit: Mapping[str, Any]) -> str | None:
    """Old and new coarse mean maps per class, side by side, with the map distance."""
    from matplotlib.figure import Figure

    drift, maps = audit["drift"], audit.get("drift_maps", {})
    keys = [k for k in drift["classes"] if k in maps]
    if not keys:
        return None
    figure = Figure(figsize=(2.2 * len(keys), 4.6))
    for column, key in enumerate(keys):
        entry = drift["classes"][key]
        for row, name in enumerate(("baseline", "current")):
            axis = figure.add_subplot(2, len(keys), row * len(keys) + column + 1)
            mean_map = maps[key][name]
            axis.axis("off")
            if mean_map is None:
                axis.set_title(f"class {key}: no {name}", fontsize=8)
                continue
            mean_map = np.asarray(mean_map, np.float64)
            axis.imshow(mean_map, cmap="jet", vmin=0.0, vmax=max(float(mean_map.max()), 1e-6))
            title = f"class {_class_name(audit, key)}\n{name}"
            if row == 1:
                distance = entry["map_distance"]
                title = f"{name}: 1 - r = {_plain(distance)}"
            axis.set_title(title, fontsize=8, color="crimson" if entry["drifted"] else "black")
    return _figure_base64(figure)


def _plain(value: Any) -> str:
    return "n/a" if value is None else f"{float(value):.2f}"


def _drift_table(audit: Mapping[str, Any]) -> str:
    head = ("<tr><th>class</th><th>images (baseline &rarr; now)</th><th>map distance "
            "(1 - r)</th><th>shifts (interval excludes 0)</th><th>predicted mix (TV)</th>"
            "<th>verdict</th></tr>")
    rows = []
    for key, entry in audit["drift"]["classes"].items():
        shifts = [
            f"{html.escape(name)} {s['shift']:+.3f} [{s['low']:+.3f}, {s['high']:+.3f}]"
            for name, s in entry["shifts"].items()
            if s.get("low") is not None and s.get("high") is not None
            and np.isfinite(s["low"]) and np.isfinite(s["high"])
            and (s["low"] > 0 or s["high"] < 0)
        ]
        verdict = ("<b>drifted</b>: " + "; ".join(html.escape(r) for r in entry["reasons"])
                   if entry["drifted"] else "no drift")
        count = entry["count"]
        rows.append(
            f'<tr class="{"flagged" if entry["drifted"] else ""}">'
            f"<td>{html.escape(_class_name(audit, key))}</td>"
            f"<td>{count['baseline']} &rarr; {count['current']}</td>"
            f"<td>{_fmt(entry['map_distance'], 2)}</td><td>{'<br>'.join(shifts) or '&ndash;'}"
            f"</td><td>{_fmt(entry['mix_distance'], 2)}</td><td>{verdict}</td></tr>"
        )
    return f"<table>{head}{''.join(rows)}</table>"


def _drift_section(audit: Mapping[str, Any]) -> list[str]:
    drift = audit["drift"]
    settings = audit.get("settings", {})
    drifted = drift["drifted_classes"]
    verdict = ("Drifted classes: " + ", ".join(
        f"<b>{html.escape(_class_name(audit, k))}</b>" for k in drifted)
        if drifted else "No class drifted.")
    return [
        "<h2>Drift against the baseline</h2>",
        f"<p>Baseline: <code>{html.escape(str(drift['baseline']))}</code></p>",
        f'<p class="{"verdict" if drifted else "verdict ok"}">{verdict}</p>',
        (
            "<p>A class drifts when its mean map, on a "
            f"{settings.get('drift_grid', 8)}&times;{settings.get('drift_grid', 8)} grid, "
            "correlates less than "
            f"{1 - settings.get('drift_map_distance_max', 0.3):.2f} with the baseline's; when a "
            "statistic's mean moves by at least "
            f"{settings.get('drift_shift_min', 0.1)} with a "
            f"{settings.get('drift_confidence', 0.95):.0%} bootstrap interval excluding 0; when "
            "its share of the predictions moves; or when the predicted classes of its labelled "
            "images move (total variation).</p>"
        ),
        _drift_table(audit),
        "<h3>Mean maps: baseline (top) and this run (bottom)</h3>",
        _img(_maps_figure(audit), "baseline and current mean maps"),
    ]


def _clusters_figure(target: str, entry: Mapping[str, Any]) -> str | None:
    from matplotlib.figure import Figure

    clusters = entry["clusters"]
    if not clusters:
        return None
    figure = Figure(figsize=(2.2 * len(clusters), 2.5))
    for index, cluster in enumerate(clusters):
        axis = figure.add_subplot(1, len(clusters), index + 1)
        mean_map = np.asarray(cluster["mean_map"], np.float64)
        axis.imshow(mean_map, cmap="jet", vmin=0.0, vmax=max(float(mean_map.max()), 1e-6))
        axis.axis("off")
        axis.set_title(
            f"cluster {cluster['cluster']}: {cluster['share']:.0%}\nexcess "
            f"{cluster['excess']:.2f}{' FLAGGED' if cluster['flagged'] else ''}",
            fontsize=8, color="crimson" if cluster["flagged"] else "black",
        )
    return _figure_base64(figure)


def _strategy_section(audit: Mapping[str, Any]) -> list[str]:
    strategies = audit["strategies"]
    verdicts = strategies["verdicts"]
    examples = audit.get("examples", {})
    settings = audit.get("settings", {})
    parts = [
        "<h2>Strategies (SpRAy clusters)</h2>",
        (
            '<p class="verdict">' + "<br>".join(html.escape(v) for v in verdicts) + "</p>"
            if verdicts else '<p class="verdict ok">No class has a strategy of its own.</p>'
        ),
        (
            "<p>Per class, a uniform sample of the downsampled maps is clustered (k-means, k by "
            "the best silhouette; one cluster below 0.25). A cluster is flagged when it holds at "
            f"least {settings.get('strategy_min_share', 0.15):.0%} of its class and at least "
            f"{settings.get('strategy_excess_min', 0.25):.0%} of its mean saliency lies where "
            "the class's other clusters and the other classes' maps do not look (the "
            "<em>excess</em>). No object masks are needed.</p>"
        ),
    ]
    for key, entry in strategies["classes"].items():
        parts.append(f"<h3>Class {html.escape(_class_name(audit, key))}: {entry['sample']} "
                     f"sampled maps, {len(entry['clusters'])} cluster(s)</h3>")
        names = [n for n in _CLUSTER_STATISTICS
                 if any(np.isfinite(c["statistics"].get(n, np.nan)) for c in entry["clusters"])]
        head = ("<tr><th>cluster</th><th>images</th><th>share</th><th>excess</th><th>where</th>"
                + "".join(f"<th>{html.escape(n.replace('_', ' '))}</th>" for n in names)
                + "<th>flag</th></tr>")
        rows = [
            f'<tr class="{"flagged" if c["flagged"] else ""}"><td>{c["cluster"]}</td>'
            f"<td>{c['size']}</td><td>{c['share']:.0%}</td><td>{c['excess']:.2f}</td>"
            f"<td>{html.escape(c['region'])}</td>"
            + "".join(f"<td>{_fmt(c['statistics'].get(n))}</td>" for n in names)
            + f"<td>{'<b>flagged</b>' if c['flagged'] else ''}</td></tr>"
            for c in entry["clusters"]
        ]
        parts += [f"<table>{head}{''.join(rows)}</table>",
                  _img(_clusters_figure(key, entry), f"class {key} cluster mean maps")]
        for cluster in entry["clusters"]:
            records = examples.get(strategy_example_name(key, cluster["cluster"]), [])
            if records:
                parts += [f"<p>Cluster {cluster['cluster']}: exemplars</p>",
                          _gallery(records, settings)]
    return parts


def report_sections(audit: Mapping[str, Any]) -> list[str]:
    """The drift and strategy sections' HTML fragments (empty when the audit has neither).

    Example:
        >>> "".join(report_sections(audit)).count("<h2>")
        2
    """
    parts: list[str] = []
    if audit.get("drift"):
        parts += _drift_section(audit)
    if audit.get("strategies"):
        parts += _strategy_section(audit)
    return parts

"""``evaluation.json`` and ``evaluation.html``: the faithfulness evaluation a reviewer reads.

The job's ``--evaluate`` branch hands :func:`write_evaluation` the summary of
``fullgrad.evaluation.EvaluationTotals``; it writes the JSON as it is and a page of its own
(not a section of ``report.html``, so that it exists with or without ``--audit``): one figure
with the mean deletion and insertion curves per method, next to the chance curve, and a table
of the AUCs overall and per class.

Reading it. Deletion: lower is better (the probability falls fast when the most salient
pixels go first); insertion: higher is better. A method should beat ``blurred_random``, not
only ``random``: perturbation metrics reward smooth maps for being smooth (Song et al.,
arXiv:2304.13836).

Example:
    >>> paths = write_evaluation(summary, "gs://bucket/run/")
    >>> paths["html"]
    'gs://bucket/run/evaluation.html'
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Mapping
from typing import Any

from fullgrad.audit.report import write_bytes

__all__ = ["render_evaluation_html", "write_evaluation"]

#: Controls are drawn dashed, after the methods.
_CONTROLS = ("random", "blurred_random")


def _jsonable(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _ordered(methods: Mapping[str, Any]) -> list[str]:
    return [m for m in methods if m not in _CONTROLS] + [m for m in _CONTROLS if m in methods]


def _curves_png(summary: Mapping[str, Any]) -> str | None:
    from matplotlib.figure import Figure

    methods = summary.get("methods") or {}
    if not methods:
        return None
    fractions = summary["fractions"]
    figure = Figure(figsize=(9, 3.4))
    for index, (curve, title) in enumerate(
        (("deletion_curve", "deletion (lower is better)"),
         ("insertion_curve", "insertion (higher is better)"))
    ):
        axis = figure.add_subplot(1, 2, index + 1)
        for name in _ordered(methods):
            style = "--" if name in _CONTROLS else "-"
            axis.plot(fractions, methods[name][curve], style, marker=".", label=name)
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("fraction of pixels perturbed, most salient first")
        axis.set_ylabel("probability of the explained class")
        axis.set_xlim(0, 1)
        axis.grid(alpha=0.3)
    figure.axes[-1].legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _number(value: Any) -> str:
    return "&ndash;" if value is None or not math.isfinite(value) else f"{value:.3f}"


def _auc_table(methods: Mapping[str, Any], caption: str) -> str:
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{methods[name]['images']}</td>"
        f"<td>{_number(methods[name]['deletion_auc'])}</td>"
        f"<td>{_number(methods[name]['insertion_auc'])}</td></tr>"
        for name in _ordered(methods)
    )
    return (
        f"<table><caption>{html.escape(caption)}</caption><tr><th>method</th><th>images</th>"
        f"<th>deletion AUC &darr;</th><th>insertion AUC &uarr;</th></tr>{rows}</table>"
    )


def render_evaluation_html(summary: Mapping[str, Any]) -> str:
    """The evaluation page: the curves per method and the AUCs overall and per class.

    Args:
        summary: The ``evaluation.json`` dictionary (``EvaluationTotals.summary``), optionally
            with ``"map"`` (the job's map kind).

    Returns:
        A self-contained HTML document (the figure is embedded).

    Example:
        >>> page = render_evaluation_html(evaluation.evaluate(model, images, methods))
    """
    png = _curves_png(summary)
    figure = (
        f'<img alt="deletion and insertion curves" src="data:image/png;base64,{png}">'
        if png else "<p><em>No image was evaluated.</em></p>"
    )
    classes = summary.get("classes") or {}
    per_class = "".join(
        _auc_table(methods, f"explained class {key}") for key, methods in classes.items()
    )
    blur = summary.get("blur_sigma")
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>fullgrad evaluation</title>"
        "<style>body{font-family:sans-serif;max-width:60em;margin:auto}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;"
        "padding:2px 8px;text-align:right}caption{text-align:left;font-weight:bold}</style>"
        "</head><body><h1>Faithfulness: deletion and insertion</h1>"
        f"<p>{summary.get('images', 0)} images (a class-stratified sample), the map the job "
        f"wrote: <b>{html.escape(str(summary.get('map', 'fullgrad')))}</b>. Pixels are "
        "replaced by (deletion) or restored from (insertion) a Gaussian-blurred copy"
        f"{f' (sigma {blur:g} px)' if blur else ''}, most salient first, in steps of "
        "10%. A method should beat <b>blurred_random</b>, which is smooth but knows nothing "
        "of the model (Song et al., arXiv:2304.13836), not only <b>random</b>, which follows "
        "the chance curve.</p>"
        f"{figure}{_auc_table(summary.get('methods') or {}, 'all images')}"
        f"<h2>Per explained class</h2>{per_class}</body></html>"
    )


def write_evaluation(summary: Mapping[str, Any], output_dir: str) -> dict[str, str]:
    """Writes ``evaluation.json`` and ``evaluation.html`` into ``output_dir`` (local or a URI).

    Args:
        summary: The ``evaluation.json`` dictionary.
        output_dir: The job's output folder.

    Returns:
        ``{"json": path, "html": path}``.

    Example:
        >>> write_evaluation(summary, "out")["json"]
        'out/evaluation.json'
    """
    base = output_dir.rstrip("/")
    paths = {"json": f"{base}/evaluation.json", "html": f"{base}/evaluation.html"}
    write_bytes(paths["json"], json.dumps(_jsonable(summary), indent=1, allow_nan=False).encode())
    write_bytes(paths["html"], render_evaluation_html(summary).encode("utf-8"))
    return paths

"""The written audit: strict JSON with the contract's keys, and an HTML file with its pictures."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import numpy as np
from PIL import Image

from fullgrad.audit.report import write_audit
from fullgrad.audit.transforms import AuditSettings

from .conftest import planted_records, run_audit


def test_write_audit_json_and_html(tmp_path):
    records = planted_records(80, off_class=1, seed=4)
    for record in records:
        record["id"] = f"<i>{record['id']}"  # ids are data: the page must escape them
    records[0]["mask"] = None  # a record without a mask still reports (NaN -> null)
    settings = AuditSettings(examples=4, class_names=("cat", "dog", "fox", "owl"))
    audit = run_audit(records, settings)
    paths = write_audit(audit, str(tmp_path / "audit"))

    text = Path(paths["json"]).read_text()
    assert "NaN" not in text
    data = json.loads(text)
    assert data["flagged_classes"] == ["1"]
    assert set(data["classes"]) == {"0", "1", "2", "3"}
    one = data["classes"]["1"]
    for key in ("count", "mask_energy", "border_energy", "concentration", "flagged", "reasons",
                "mask_chance", "mask_lift", "border_chance", "border_lift", "verdict"):
        assert key in one
    # Each statistic beside its chance level and lift: the lift is the mean of the images'.
    assert 0.0 < one["border_chance"] < 1.0
    assert set(one["parts"]) == {"input", "bias_fine", "bias_mid", "bias_coarse"}
    assert one["parts"]["input"]["border_lift"] > 0.3
    assert one["statistics"]["mask_lift"]["range"] == [-1.0, 1.0]
    assert "mean_part_maps" not in data
    assert one["flagged"] is True and one["count"] == 20
    assert data["classes"]["0"]["flagged"] is False
    assert data["settings"]["image_mask_lift_min"] == settings.image_mask_lift_min
    assert data["settings"]["class_names"] == ["cat", "dog", "fox", "owl"]
    assert data["flagged_images"] and all(r["target"] == 1 for r in data["flagged_images"])
    assert len(data["examples"]["least_on_object"]) == 4

    page = Path(paths["html"]).read_text()
    assert "<i>img" not in page
    assert "&lt;i&gt;img" in page
    assert 'src="http' not in page  # self-contained
    pictures = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    # mean maps + part maps + histograms + residuals + 4 galleries of up to 4 overlays
    assert len(pictures) >= 4 + 4 * 3
    sizes = [Image.open(io.BytesIO(base64.b64decode(p))).size for p in pictures]
    assert max(w for w, _ in sizes) > 600  # the mean-map and histogram figures
    overlays = [np.asarray(Image.open(io.BytesIO(base64.b64decode(p)))) for p in pictures]
    overlays = [o for o in overlays if o.shape == (48, 48, 3)]  # 24-pixel maps, shown 2x
    assert len(overlays) >= 12 and all(o.std() > 10 for o in overlays)
    assert "1 (dog)" in page and "flagged" in page
    assert "How to read this" in page and "(e - c) / (1 - c)" in page
    assert "input term on the border" in page


def test_empty_audit_still_writes(tmp_path):
    audit = run_audit([], AuditSettings())
    paths = write_audit(audit, str(tmp_path))
    data = json.loads(Path(paths["json"]).read_text())
    assert data["images"] == 0 and data["flagged_classes"] == [] and data["classes"] == {}
    assert "No class is flagged" in Path(paths["html"]).read_text()


def test_class_names_are_escaped_wherever_the_page_shows_them(tmp_path):
    """Class names come from the user (``--class-names``): the page shows them as text."""
    hostile = "<script>alert(1)</script>"
    records = planted_records(40, off_class=0, seed=5)  # the hostile name is the flagged class
    settings = AuditSettings(examples=2, class_names=(hostile, "a&b", "fox", "owl"))
    audit = run_audit(records, settings)
    assert audit["flagged_classes"] == ["0"]
    page = Path(write_audit(audit, str(tmp_path))["html"]).read_text()

    assert "<script" not in page.lower()
    assert "a&b" not in page
    escaped = "&lt;script&gt;alert(1)&lt;/script&gt;"
    # In the class table, the flagged-classes verdict and the galleries' captions.
    assert f"<td>0 ({escaped})</td>" in page
    assert f"<b>0 ({escaped})</b>" in page
    assert f"explained class 0 ({escaped})" in page
    assert "<td>1 (a&amp;b)</td>" in page

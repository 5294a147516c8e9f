"""Baselines and the run history of scheduled audits (fullgrad.beam.history)."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import pytest

from fullgrad.beam.config import JobConfig
from fullgrad.beam.history import load_baseline, record_run, resolve_baseline


def _run(folder, images):
    folder.mkdir(parents=True)
    (folder / "audit.json").write_text(json.dumps({"images": images}))
    (folder / "report.html").write_text(f"<html>{images}</html>")
    return str(folder)


def test_the_history_points_at_the_latest_run_and_keeps_the_older(tmp_path):
    history = str(tmp_path / "history")
    assert resolve_baseline(None, history) == (None, "")  # a first run: nothing to compare
    when = datetime.datetime(2026, 12, 1, 22, 45, tzinfo=datetime.UTC)
    first = record_run(history, _run(tmp_path / "a", 1), now=when)
    assert first["audit"] == f"{history}/run-20261201T224500Z/audit.json"
    assert resolve_baseline(None, history) == ({"images": 1}, first["audit"])
    second = record_run(history, _run(tmp_path / "b", 2), now=when)  # the same second
    assert second["run"] == f"{history}/run-20261201T224500Z-2"
    assert resolve_baseline(None, history) == ({"images": 2}, second["audit"])
    assert json.loads(Path(first["audit"]).read_text()) == {"images": 1}
    assert Path(second["report"]).read_text() == "<html>2</html>"
    # An explicit baseline wins over the history.
    assert resolve_baseline(str(tmp_path / "a"), history)[0] == {"images": 1}


def test_a_baseline_is_a_folder_or_its_audit_json(tmp_path):
    folder = _run(tmp_path / "old", 3)
    assert load_baseline(folder) == ({"images": 3}, f"{folder}/audit.json")
    assert load_baseline(f"{folder}/audit.json")[0] == {"images": 3}
    with pytest.raises(FileNotFoundError, match="no audit.json"):
        load_baseline(str(tmp_path / "nowhere"))


def test_baseline_and_history_need_the_audit():
    with pytest.raises(ValueError, match="need --audit"):
        JobConfig(input="a.parquet", model="m.keras", output="o", baseline="old/")
    JobConfig(input="a.parquet", model="m.keras", output="o", audit=True, history="h/")

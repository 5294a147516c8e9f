"""``fullgrad audit`` over a maps folder written with the job's own writer schema."""

from __future__ import annotations

import json

import pyarrow.parquet as pq

from fullgrad import record
from fullgrad.audit.transforms import AuditSettings, with_statistics
from fullgrad.cli import main as cli_main

from .conftest import SIZE, planted_records


def write_maps(folder, records, dtype="float16", part_maps=True):
    settings = AuditSettings()
    enriched = [with_statistics(r, settings) for r in records]
    schema = record.schema(SIZE, dtype, part_maps=part_maps)
    for shard, start in enumerate(range(0, len(enriched), 50)):
        table = record.to_table(enriched[start : start + 50], schema)
        pq.write_table(table, folder / f"maps-{shard:05d}-of-00003.parquet")
    return enriched


def test_fullgrad_audit_rereads_maps_and_flags_from_them(tmp_path):
    maps = tmp_path / "maps"
    maps.mkdir()
    enriched = write_maps(maps, planted_records(140, off_class=3, seed=8))
    table = pq.read_table(maps)
    assert table.num_rows == 140 and table.column("mask_energy").null_count == 0

    out = tmp_path / "report"
    argv = [
        "audit",
        "--maps",
        str(maps),
        "--output",
        str(out),
        "--examples",
        "3",
        "--class-names",
        "a,b,c,d",
    ]
    assert cli_main(argv) == 0
    audit = json.loads((out / "audit.json").read_text())
    assert audit["flagged_classes"] == ["3"]
    assert audit["images"] == 140
    assert audit["settings"]["examples"] == 3 and audit["classes"]["3"]["name"] == "3 (d)"
    # float16 storage moves the statistics a little, not the verdict.
    direct = [r["mask_energy"] for r in enriched if r["target"] == 3]
    assert abs(audit["classes"]["3"]["mask_energy"] - sum(direct) / len(direct)) < 0.02
    assert (out / "report.html").stat().st_size > 10_000

    # No image threshold can fire; the class comparison with the others still does.
    stricter = tmp_path / "lenient"
    argv = [
        "audit",
        "--maps",
        str(maps),
        "--output",
        str(stricter),
        "--image-mask-lift-min",
        "-1",
        "--image-border-lift-max",
        "1",
    ]
    assert cli_main(argv) == 0
    strict = json.loads((stricter / "audit.json").read_text())
    assert strict["settings"]["image_mask_lift_min"] == -1.0
    assert audit["flagged_images_total"] > 20 and strict["flagged_images_total"] == 0
    assert strict["flagged_classes"] == ["3"]
    assert strict["classes"]["3"]["reasons"] == [
        "off_object", "on_border", "input:off_object", "input:on_border"
    ]


def test_fullgrad_audit_keeps_stored_part_columns_without_part_maps(tmp_path):
    maps = tmp_path / "maps"
    maps.mkdir()
    records = planted_records(120, off_class=2, where="object", input_where="corner", seed=3)
    # The job measured the parts (records with part maps), then stored no part maps.
    write_maps(maps, records, part_maps=False)
    assert "part_maps" not in pq.read_table(maps).column_names

    assert cli_main(["audit", "--maps", str(maps), "--output", str(tmp_path / "a")]) == 0
    audit = json.loads((tmp_path / "a" / "audit.json").read_text())
    assert audit["flagged_classes"] == ["2"]
    assert audit["classes"]["2"]["reasons"] == ["input:off_object", "input:on_border"]


def test_fullgrad_audit_without_maps_fails_cleanly(tmp_path, capsys):
    assert cli_main(["audit", "--maps", str(tmp_path)]) == 2
    assert "no maps-*.parquet" in capsys.readouterr().out


def test_fullgrad_run_audit_flags_reach_the_audit_settings():
    import argparse

    from fullgrad.audit.transforms import AuditSettings
    from fullgrad.beam.job import add_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        [
            "--input",
            "a.parquet",
            "--model",
            "m.keras",
            "--output",
            "o",
            "--audit",
            "--audit-class-mask-lift-min",
            "0.3",
            "--audit-class-names",
            "cat,dog",
        ]
    )
    settings = AuditSettings.from_config(config_from_args(args))
    assert settings.class_mask_lift_min == 0.3
    assert settings.class_names == ("cat", "dog")
    assert settings.border_fraction == AuditSettings().border_fraction

"""fullgrad.record: one declaration of the explained record, and its two stored forms."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pytest

from fullgrad import record
from fullgrad.images import decode_image, encode_jpeg
from fullgrad.parts import PARTS


def make_record(index: int, rng: np.random.Generator, with_mask: bool) -> dict:
    saliency = rng.uniform(size=(12, 12)).astype(np.float32)
    mask = np.zeros((12, 12), bool)
    mask[2:7, 3:9] = True
    values = {
        "id": f"img-{index}",
        "target": np.int32(index % 3),
        "logit": np.float32(1.5 + index),
        "label": None if index == 1 else np.int64(index % 3),
        "topk_classes": np.array([index % 3, 2], np.int32),
        "topk_logits": np.array([1.5 + index, 0.25], np.float32),
        "residual": np.float32(1e-7),
        "map": saliency,
        "thumbnail": rng.integers(0, 256, (12, 12, 3), dtype=np.uint8),
        "mask": mask if with_mask else None,
        "concentration": 0.3,
        "entropy": 0.9,
        "border_energy": 0.1,
        "mask_energy": 0.6 if with_mask else math.nan,
        "pointing_hit": 1.0 if with_mask else math.nan,
        "mask_area": float(mask.mean()) if with_mask else math.nan,
        "border_lift": -0.05,
        "mask_lift": 0.4 if with_mask else math.nan,
        "part_maps": rng.uniform(size=(len(PARTS), 12, 12)).astype(np.float32),
        **{
            name: (0.1 * position if with_mask or "mask" not in name else math.nan)
            for position, name in enumerate(record.PART_STATISTIC_COLUMNS)
        },
    }
    assert set(record.STATISTIC_COLUMNS) <= set(values)
    return values


@pytest.fixture
def records():
    rng = np.random.default_rng(0)
    return [make_record(i, rng, with_mask=i != 2) for i in range(4)]


def test_fields_name_every_column_once():
    names = [field.name for field in record.FIELDS]
    assert len(names) == len(set(names))
    assert record.schema(12, "float16", part_maps=True).names == names
    assert record.schema(12, "float16").names == [n for n in names if n != "part_maps"]
    assert set(record.STATISTIC_COLUMNS) <= set(names)
    assert set(record.STATISTICS) < set(record.STATISTIC_COLUMNS)
    assert record.schema(12, "uint8", True).field("part_maps").type.shape == [len(PARTS), 12, 12]


def test_part_columns_are_generated_from_parts_and_statistics():
    assert len(record.PART_STATISTIC_COLUMNS) == len(PARTS) * len(record.PART_STATISTICS)
    assert record.part_column("input", "border_lift") == "input_border_lift"
    assert "bias_coarse_mask_lift" in record.PART_STATISTIC_COLUMNS
    with pytest.raises(ValueError):
        record.part_column("input", "entropy")


def check_same(back: dict, original: dict, map_atol: float, stored_parts: bool = True) -> None:
    assert set(back) == {field.name for field in record.FIELDS}
    for name in ("id", "target", "label", "topk_classes"):
        expected = original[name]
        expected = expected.tolist() if isinstance(expected, np.ndarray) else expected
        assert back[name] == (None if expected is None else expected), name
    for name in ("logit", "residual", *record.STATISTIC_COLUMNS, *record.PART_STATISTIC_COLUMNS):
        np.testing.assert_allclose(back[name], original[name], rtol=1e-6, err_msg=name)
    if original["part_maps"] is None or not stored_parts:
        assert back["part_maps"] is None
    else:
        np.testing.assert_allclose(back["part_maps"], original["part_maps"], atol=map_atol)
    np.testing.assert_allclose(back["topk_logits"], original["topk_logits"], rtol=1e-6)
    np.testing.assert_allclose(back["map"], original["map"], atol=map_atol)
    # The thumbnail is stored as JPEG: it comes back as the JPEG decodes.
    np.testing.assert_array_equal(
        back["thumbnail"], decode_image(encode_jpeg(original["thumbnail"]), (12, 12))
    )
    if original["mask"] is None:
        assert back["mask"] is None
    else:
        np.testing.assert_array_equal(back["mask"], original["mask"])


@pytest.mark.parametrize(("dtype", "atol"), [("float32", 0), ("float16", 1e-3), ("uint8", 0.5 / 255)])
@pytest.mark.parametrize("parts", [True, False])
def test_arrow_round_trip(records, dtype, atol, parts):
    table = record.to_table(records, record.schema(12, dtype, part_maps=parts))
    assert table.schema.field("map").type.value_type == pa.type_for_alias(dtype)
    # Non-finite statistics are stored as nulls, not NaN.
    assert table.column("mask_energy").null_count == table.column("mask_lift").null_count == 1
    back = list(record.from_table(table))
    assert len(back) == len(records)
    for restored, original in zip(back, records, strict=True):
        check_same(restored, original, atol, stored_parts=parts)
    np.testing.assert_allclose(record.read_maps(table), [r["map"] for r in records], atol=atol)


@pytest.mark.parametrize(("dtype", "atol"), [("float32", 0), ("uint8", 0.5 / 255)])
def test_example_round_trip(records, dtype, atol):
    for original in [*records, {**records[0], "part_maps": None}]:
        check_same(record.from_example(record.to_example(original, dtype)), original, atol)


def test_part_maps_are_stored_in_every_row_or_not_at_all(records, tmp_path):
    import pyarrow.parquet as pq

    table = record.to_table(records, record.schema(12, "uint8", part_maps=True))
    pq.write_table(table, tmp_path / "maps.parquet")
    back = list(record.from_table(pq.read_table(tmp_path / "maps.parquet")))
    np.testing.assert_allclose(back[3]["part_maps"], records[3]["part_maps"], atol=0.5 / 255)
    with pytest.raises(ValueError, match="no part maps"):
        record.to_table([{**records[0], "part_maps": None}],
                        record.schema(12, "uint8", part_maps=True))


def test_example_leaves_null_fields_out(records):
    from tensorflow.core.example import example_pb2

    no_mask = example_pb2.Example.FromString(record.to_example(records[2], "float16"))
    keys = set(no_mask.features.feature)
    assert {"mask", "mask_energy", "pointing_hit", "mask_area", "mask_lift"}.isdisjoint(keys)
    assert {"id", "map", "map/shape", "map/dtype", "thumbnail", "concentration"} <= keys
    unlabelled = example_pb2.Example.FromString(record.to_example(records[1], "float16"))
    assert "label" not in unlabelled.features.feature


def test_a_table_without_statistic_columns_reads_as_unmeasured(records):
    table = record.to_table(records, record.schema(12, "float32"))
    older = table.drop_columns(list(record.STATISTIC_COLUMNS))
    back = next(record.from_table(older))
    assert all(math.isnan(back[name]) for name in record.STATISTIC_COLUMNS)
    assert back["id"] == "img-0"


def test_explained_takes_inference_then_request_and_is_json_ready():
    request = {"id": "a", "label": np.int64(4), "mask": None, "thumbnail": "rgb", "image": "x"}
    inference = {"map": "m", "target": np.int32(4), "logit": np.float32(2.5),
                 "residual": np.float32(0.0), "topk_classes": np.array([4, 1]),
                 "topk_logits": np.array([2.5, 1.0], np.float32)}
    out = record.explained(request, inference)
    assert set(out) == {field.name for field in record.FIELDS}  # "image" is not a field
    assert out["map"] == "m" and out["thumbnail"] == "rgb" and out["label"] == 4
    assert out["concentration"] is None  # measured later by the audit
    json.dumps({k: out[k] for k in ("id", "target", "logit", "label", "topk_classes",
                                    "topk_logits", "residual")})


def test_dead_letters_table():
    table = record.dead_letters_to_table([record.dead_letter("a", "decode", ValueError("bad"))])
    assert table.schema == record.DEAD_LETTER_SCHEMA
    assert table.to_pylist() == [{"id": "a", "stage": "decode", "error": "bad"}]

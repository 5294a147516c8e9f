"""The explained record and the dead letter: what the job writes per image, declared once.

An *explained record* is one image's FullGrad result as a dict whose keys are the names in
:data:`FIELDS`. Every writer and reader of the job (the Beam writers, ``fullgrad audit``, the
Kubeflow tasks, the tests) goes through this module, so adding a column is one new
:class:`Field` here.

In Python, ``map`` is float32 ``[h, w]`` in [0, 1], ``thumbnail`` uint8 ``[h, w, 3]``, ``mask``
bool ``[h, w]`` or None, ``part_maps`` float32 ``[P, h, w]`` in [0, 1] or None (the map's parts,
:data:`fullgrad.parts.PARTS`; stored only when the job is asked to), the statistics floats (NaN
when unknown). Two stored forms:

- Arrow (``maps-*.parquet``): :func:`schema`, :func:`to_table`, :func:`from_table`,
  :func:`read_maps`. ``map`` is a ``fixed_shape_tensor`` column of the chosen dtype; ``uint8``
  maps hold ``round(map * 255)`` and the schema metadata (``fullgrad.map_scale``) says how to
  undo it. ``part_maps`` is a ``fixed_shape_tensor`` ``[P, h, w]`` of the same dtype and scale,
  a column only of a schema asked for it (``schema(..., part_maps=True)``), and then in every
  row: Arrow's Parquet reader cannot read null fixed-size lists (apache/arrow#35692), so an
  absent column, not null rows, says "no part maps". Thumbnails are JPEG, masks PNG (lossless: they are measured); non-finite statistics
  are null.
- ``tf.train.Example`` (``maps-*.tfrecord``): :func:`to_example`, :func:`from_example`. The map
  is raw bytes of its dtype with ``map/shape`` and ``map/dtype`` (``part_maps`` likewise, with
  ``part_maps/shape``); a null field is left out.

A *dead letter* (:func:`dead_letter`, :data:`DEAD_LETTER_SCHEMA`) is an input that failed, with
the stage and the reason.

Example:
    >>> table = to_table(records, schema(map_size=56, map_dtype="uint8"))
    >>> back = list(from_table(table))          # the same records, maps at 1/255 precision
    >>> maps = read_maps(table)                 # float32 [N, 56, 56] in [0, 1]
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from fullgrad.images import decode_image, decode_mask, encode_jpeg, encode_png
from fullgrad.parts import PARTS

__all__ = [
    "DEAD_LETTER_SCHEMA",
    "FIELDS",
    "MAP_DTYPES",
    "PART_STATISTICS",
    "PART_STATISTIC_COLUMNS",
    "STATISTICS",
    "STATISTIC_COLUMNS",
    "Field",
    "dead_letter",
    "dead_letters_to_table",
    "explained",
    "from_example",
    "from_table",
    "part_column",
    "read_maps",
    "schema",
    "to_example",
    "to_table",
]

#: Per-image statistics of a map (``fullgrad.audit.stats`` computes them), in report order.
STATISTICS = (
    "concentration",
    "entropy",
    "border_energy",
    "mask_energy",
    "pointing_hit",
    "border_lift",
    "mask_lift",
)
#: Every statistic stored as a column: the map's statistics and the object mask's area share.
STATISTIC_COLUMNS = (*STATISTICS, "mask_area")
#: The statistics measured on each part of the map (:data:`fullgrad.parts.PARTS`).
PART_STATISTICS = ("border_energy", "border_lift", "mask_energy", "mask_lift")
#: Their columns, ``{part}_{statistic}``, part by part (see :func:`part_column`).
PART_STATISTIC_COLUMNS = tuple(f"{part}_{name}" for part in PARTS for name in PART_STATISTICS)
#: Storage types of the ``map`` column.
MAP_DTYPES = ("float32", "float16", "uint8")

_MAP_ARROW = {"float32": pa.float32(), "float16": pa.float16(), "uint8": pa.uint8()}


@dataclasses.dataclass(frozen=True)
class _Kind:
    """How one kind of value is stored: Arrow type, and the conversions both ways."""

    arrow: pa.DataType | None  # None: depends on the map's size and dtype
    to_arrow: Callable[[Any], Any]
    from_arrow: Callable[[Any, tuple[int, int]], Any]
    to_feature: Callable[[Any], tuple[str, list]]  # (Example list kind, values)
    from_feature: Callable[[list, tuple[int, int]], Any]


def _finite_or_none(value: Any) -> float | None:
    if value is None or not math.isfinite(float(value)):
        return None
    return float(value)


def _nan_if_none(value: Any, _size: Any = None) -> float:
    return math.nan if value is None else float(value)


_KINDS: dict[str, _Kind] = {
    "string": _Kind(pa.string(), str, lambda v, _: v,
                    lambda v: ("bytes", [str(v).encode()]), lambda v, _: v[0].decode()),
    "int32": _Kind(pa.int32(), int, lambda v, _: v,
                   lambda v: ("int64", [int(v)]), lambda v, _: int(v[0])),
    "int64": _Kind(pa.int64(), lambda v: None if v is None else int(v), lambda v, _: v,
                   lambda v: ("int64", [int(v)]), lambda v, _: int(v[0])),
    "float": _Kind(pa.float32(), float, lambda v, _: v,
                   lambda v: ("float", [float(v)]), lambda v, _: float(v[0])),
    "statistic": _Kind(pa.float32(), _finite_or_none, _nan_if_none,
                       lambda v: ("float", [float(v)]), lambda v, _: float(v[0])),
    "int32s": _Kind(pa.list_(pa.int32()), lambda v: [int(x) for x in v], lambda v, _: v,
                    lambda v: ("int64", [int(x) for x in v]), lambda v, _: [int(x) for x in v]),
    "float32s": _Kind(pa.list_(pa.float32()), lambda v: [float(x) for x in v], lambda v, _: v,
                      lambda v: ("float", [float(x) for x in v]),
                      lambda v, _: [float(x) for x in v]),
    "jpeg": _Kind(pa.binary(), encode_jpeg, lambda v, size: decode_image(v, size),
                  lambda v: ("bytes", [encode_jpeg(v)]), lambda v, size: decode_image(v[0], size)),
    "png": _Kind(pa.binary(), encode_png, lambda v, size: decode_mask(v, size),
                 lambda v: ("bytes", [encode_png(v)]), lambda v, size: decode_mask(v[0], size)),
    "map": _Kind(None, None, None, None, None),  # stored as a batch: see to_table / to_example
    "parts": _Kind(None, None, None, None, None),  # likewise, and nullable
}


def part_column(part: str, statistic: str) -> str:
    """The column of one part's statistic.

    Example:
        >>> part_column("input", "border_lift")
        'input_border_lift'
    """
    if part not in PARTS or statistic not in PART_STATISTICS:
        raise ValueError(f"no column for part {part!r} and statistic {statistic!r}")
    return f"{part}_{statistic}"


@dataclasses.dataclass(frozen=True)
class Field:
    """One field of the explained record.

    Attributes:
        name: The dict key, Parquet column and Example key.
        kind: How it is stored (a key of the module's codecs).
        nullable: Whether it may be None (a null column value, an absent Example key).
        doc: What it holds.
    """

    name: str
    kind: str
    nullable: bool
    doc: str


#: The explained record, in column order.
FIELDS: tuple[Field, ...] = (
    Field("id", "string", False, "the input's id (or FILE#ROW when the data has none)"),
    Field("target", "int32", False, "the explained class"),
    Field("logit", "float", False, "the explained class's pre-activation logit"),
    Field("label", "int64", True, "the input's label, when it has one"),
    Field("topk_classes", "int32s", False, "the top-k predicted classes, best first"),
    Field("topk_logits", "float32s", False, "their logits"),
    Field("residual", "float", False, "relative completeness error of the decomposition"),
    Field("map", "map", False, "the saliency map, [h, w] in [0, 1]"),
    Field("thumbnail", "jpeg", False, "the image at map size, uint8 RGB (JPEG when stored)"),
    Field("mask", "png", True, "the object mask at map size (PNG when stored)"),
    Field("part_maps", "parts", True, "the map's parts [P, h, w] in [0, 1] (fullgrad.parts), "
          "when asked for"),
    *(Field(name, "statistic", True, "per-image audit statistic (fullgrad.audit.stats)")
      for name in STATISTIC_COLUMNS),
    *(Field(name, "statistic", True, "per-image audit statistic of one part of the map")
      for name in PART_STATISTIC_COLUMNS),
)

#: Kinds whose Arrow value is also their plain Python value.
_PLAIN = frozenset({"string", "int32", "int64", "float", "int32s", "float32s"})


def explained(request: Mapping[str, Any], inference: Mapping[str, Any]) -> dict[str, Any]:
    """An explained record from what the job knows of an image and what FullGrad returned.

    Each field is taken from ``inference`` when it holds it, else from ``request`` (the
    decoded input: id, label, mask, thumbnail); statistics not computed yet are None. Numbers
    and ids become plain Python values (numpy scalars do not survive ``json``).

    Example:
        >>> explained({"id": "a", "label": 3, "mask": None, "thumbnail": rgb},
        ...           {"map": m, "target": 3, "logit": 2.5, "residual": 1e-7,
        ...            "topk_classes": [3], "topk_logits": [2.5]})["target"]
        3
    """
    out = {}
    for field in FIELDS:
        value = inference[field.name] if field.name in inference else request.get(field.name)
        if field.kind in _PLAIN and value is not None:
            value = _KINDS[field.kind].to_arrow(value)
        out[field.name] = value
    return out


# -- Arrow -----------------------------------------------------------------------------------


def schema(map_size: int, map_dtype: str, part_maps: bool = False) -> pa.Schema:
    """The Arrow schema of ``maps-*.parquet``: ``map`` is a ``fixed_shape_tensor`` ``[h, w]``.

    Args:
        map_size: The maps' side.
        map_dtype: One of :data:`MAP_DTYPES`.
        part_maps: Include the ``part_maps`` column ``[P, h, w]`` (every row must have them).

    Example:
        >>> schema(56, "uint8").field("map").type.shape
        [56, 56]
        >>> schema(56, "uint8", part_maps=True).field("part_maps").type.shape
        [4, 56, 56]
    """
    if map_dtype not in MAP_DTYPES:
        raise ValueError(f"map dtype must be one of {MAP_DTYPES}, got {map_dtype!r}")
    tensor = pa.fixed_shape_tensor(_MAP_ARROW[map_dtype], [map_size, map_size])
    parts = pa.fixed_shape_tensor(_MAP_ARROW[map_dtype], [len(PARTS), map_size, map_size])
    arrow = {"map": tensor, "parts": parts}
    return pa.schema(
        [
            # Every column is nullable in Arrow, as written since the first version.
            pa.field(f.name, arrow[f.kind] if f.kind in arrow else _KINDS[f.kind].arrow)
            for f in FIELDS
            if part_maps or f.kind != "parts"
        ],
        metadata={
            "fullgrad.map_dtype": map_dtype,
            "fullgrad.map_scale": "255" if map_dtype == "uint8" else "1",
        },
    )


def _cast_maps(maps: np.ndarray, map_dtype: str) -> np.ndarray:
    if map_dtype == "uint8":
        return np.round(np.clip(maps, 0.0, 1.0) * 255.0).astype(np.uint8)
    return np.asarray(maps).astype(map_dtype)


def _map_scale(metadata: Mapping[bytes, bytes] | None) -> float:
    return float((metadata or {}).get(b"fullgrad.map_scale", b"1"))


def to_table(records: Sequence[Mapping[str, Any]], table_schema: pa.Schema) -> pa.Table:
    """Explained records -> a ``pa.Table`` of ``table_schema`` (from :func:`schema`).

    Example:
        >>> table = to_table(records, schema(56, "uint8"))
    """
    columns = {}
    dtype = table_schema.metadata[b"fullgrad.map_dtype"].decode()
    for field in FIELDS:
        if field.name not in table_schema.names:
            continue  # part_maps, unless asked for
        arrow_type = table_schema.field(field.name).type
        if field.kind in ("map", "parts"):
            columns[field.name] = _tensor_column(
                [r.get(field.name) for r in records], arrow_type, dtype
            )
            continue
        convert = _KINDS[field.kind].to_arrow
        values = [record.get(field.name) for record in records]
        columns[field.name] = pa.array(
            [None if v is None and field.nullable else convert(v) for v in values], arrow_type
        )
    return pa.Table.from_pydict(columns, schema=table_schema)


def _tensor_column(arrays: Sequence[Any], arrow_type: Any, dtype: str) -> pa.ExtensionArray:
    """A ``fixed_shape_tensor`` column of one array per row (none may be missing)."""
    if any(a is None for a in arrays):
        raise ValueError(
            "a record has no part maps but the schema stores them: explain with parts=True"
        )
    shape = tuple(arrow_type.shape)
    stacked = np.stack([np.asarray(a) for a in arrays]).reshape(len(arrays), *shape)
    storage = pa.FixedSizeListArray.from_arrays(
        pa.array(_cast_maps(stacked, dtype).reshape(-1), type=arrow_type.value_type),
        int(np.prod(shape)),
    )
    return pa.ExtensionArray.from_storage(arrow_type, storage)


def _read_part_maps(table: pa.Table) -> list[np.ndarray | None]:
    """The ``part_maps`` column as float32 ``[P, h, w]`` arrays; None when there is none."""
    if "part_maps" not in table.column_names:
        return [None] * table.num_rows
    column = table.column("part_maps").combine_chunks()
    stacked = column.to_numpy_ndarray().astype(np.float32) / _map_scale(table.schema.metadata)
    return list(stacked)


def read_maps(table: pa.Table) -> np.ndarray:
    """The ``map`` column of a maps table as float32 ``[N, h, w]`` in [0, 1].

    Example:
        >>> import pyarrow.parquet as pq
        >>> maps = read_maps(pq.read_table("out/maps-00000-of-00001.parquet"))
    """
    column = table.column("map").combine_chunks()
    return column.to_numpy_ndarray().astype(np.float32) / _map_scale(table.schema.metadata)


def from_table(table: pa.Table) -> Iterator[dict[str, Any]]:
    """The explained records of a maps table (thumbnails and masks decoded at map size).

    Columns a table lacks (one written by an older version) come back as None.

    Example:
        >>> records = list(from_table(pq.read_table("out/maps-00000-of-00001.parquet")))
    """
    maps = read_maps(table)
    part_maps = _read_part_maps(table)
    size = tuple(maps.shape[1:3])
    present = set(table.column_names)
    columns = {
        f.name: table.column(f.name).to_pylist()
        for f in FIELDS
        if f.kind not in ("map", "parts") and f.name in present
    }
    for index in range(table.num_rows):
        record = {}
        for field in FIELDS:
            if field.kind == "map":
                record[field.name] = maps[index]
                continue
            if field.kind == "parts":
                record[field.name] = part_maps[index]
                continue
            value = columns[field.name][index] if field.name in columns else None
            if value is None:
                record[field.name] = math.nan if field.kind == "statistic" else None
            else:
                record[field.name] = _KINDS[field.kind].from_arrow(value, size)
        yield record


# -- tf.train.Example ------------------------------------------------------------------------


def to_example(record: Mapping[str, Any], map_dtype: str) -> bytes:
    """An explained record as a serialized ``tf.train.Example``; null fields are left out.

    Example:
        >>> example = tf.train.Example.FromString(to_example(record, "float16"))
        >>> np.frombuffer(example.features.feature["map"].bytes_list.value[0], np.float16)
    """
    from tensorflow.core.example import example_pb2, feature_pb2

    lists = {
        "bytes": lambda v: feature_pb2.Feature(bytes_list=feature_pb2.BytesList(value=v)),
        "int64": lambda v: feature_pb2.Feature(int64_list=feature_pb2.Int64List(value=v)),
        "float": lambda v: feature_pb2.Feature(float_list=feature_pb2.FloatList(value=v)),
    }
    feature = {}
    for field in FIELDS:
        value = record.get(field.name)
        if field.kind == "map":
            saliency = _cast_maps(np.asarray(value), map_dtype)
            feature["map"] = lists["bytes"]([saliency.tobytes()])
            feature["map/shape"] = lists["int64"](list(saliency.shape))
            feature["map/dtype"] = lists["bytes"]([map_dtype.encode()])
            continue
        if field.kind == "parts":
            if value is not None:
                parts = _cast_maps(np.asarray(value), map_dtype)
                feature["part_maps"] = lists["bytes"]([parts.tobytes()])
                feature["part_maps/shape"] = lists["int64"](list(parts.shape))
            continue
        if field.kind == "statistic":
            value = _finite_or_none(value)
        if value is None:
            continue
        kind, values = _KINDS[field.kind].to_feature(value)
        feature[field.name] = lists[kind](values)
    example = example_pb2.Example(features=feature_pb2.Features(feature=feature))
    return example.SerializeToString()


def from_example(serialized: bytes) -> dict[str, Any]:
    """An explained record from :func:`to_example`'s bytes (the map as float32 in [0, 1]).

    Example:
        >>> from_example(to_example(record, "uint8"))["id"] == record["id"]
        True
    """
    from tensorflow.core.example import example_pb2

    features = example_pb2.Example.FromString(serialized).features.feature

    def values(key: str) -> list:
        feature = features[key]
        kind = feature.WhichOneof("kind")
        return list(getattr(feature, kind).value) if kind else []

    dtype = values("map/dtype")[0].decode()
    shape = tuple(values("map/shape"))
    raw = np.frombuffer(values("map")[0], dtype).reshape(shape).astype(np.float32)
    saliency = raw / (255.0 if dtype == "uint8" else 1.0)
    record: dict[str, Any] = {}
    for field in FIELDS:
        if field.kind == "map":
            record[field.name] = saliency
        elif field.kind == "parts":
            record[field.name] = None
            if field.name in features:
                raw = np.frombuffer(values(field.name)[0], dtype)
                parts = raw.reshape(tuple(values("part_maps/shape"))).astype(np.float32)
                record[field.name] = parts / (255.0 if dtype == "uint8" else 1.0)
        elif field.name in features:
            record[field.name] = _KINDS[field.kind].from_feature(values(field.name), shape)
        else:
            record[field.name] = math.nan if field.kind == "statistic" else None
    return record


# -- dead letters ----------------------------------------------------------------------------

#: The schema of ``dead_letter-*.parquet``.
DEAD_LETTER_SCHEMA = pa.schema(
    [("id", pa.string()), ("stage", pa.string()), ("error", pa.string())]
)


def dead_letter(record_id: Any, stage: str, error: Any) -> dict[str, str]:
    """A dead-letter record: the contract shared by every stage of the job.

    Example:
        >>> dead_letter("img-1", "decode", "empty image bytes")
        {'id': 'img-1', 'stage': 'decode', 'error': 'empty image bytes'}
    """
    return {"id": str(record_id), "stage": stage, "error": str(error)}


def dead_letters_to_table(dead: Iterable[Mapping[str, Any]]) -> pa.Table:
    """Dead letters -> a ``pa.Table`` of :data:`DEAD_LETTER_SCHEMA`.

    Example:
        >>> dead_letters_to_table([dead_letter("a", "read", "no image")]).num_rows
        1
    """
    names = DEAD_LETTER_SCHEMA.names
    return pa.Table.from_pylist(
        [{name: str(d[name]) for name in names} for d in dead], schema=DEAD_LETTER_SCHEMA
    )

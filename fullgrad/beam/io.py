"""Readers and writers of the Beam job: Parquet / TFRecord in, maps and dead letters out.

Reading yields *rows*, ``{"id", "image", "label", "mask", "source"}`` (``image`` is encoded
bytes or a pixel array, ``label`` and ``mask`` may be None), and dead letters
``{"id", "stage": "read", "error"}`` for records that miss a required column or key. A missing
column never crashes the job: each of its rows becomes a dead letter naming the column.

- Parquet goes through Beam's ``fileio`` (globs over local paths, ``gs://``, ``s3://``) and
  pyarrow, one row group at a time in small record batches, so memory does not grow with the
  file. Row groups are spread over workers by a reshuffle. (Not ``ReadFromParquet``: asked for
  a column that one file lacks, it fails the whole job; here that file's rows become dead
  letters.)
- TFRecord goes through ``fileio`` and Beam's TFRecord framing (``_ReadTFRecordFile``); each
  record is a ``tf.train.Example``. A file whose framing breaks keeps the records before the
  break; the rest of it is one dead letter.

Written under ``--output``:

- ``maps-SSSSS-of-NNNNN.parquet``: one row per explained image (``maps_schema``); ``map`` is an
  Arrow ``fixed_shape_tensor`` column, read back with ``read_maps``;
- ``dead_letter-SSSSS-of-NNNNN.parquet``: ``id``, ``stage``, ``error``;
- ``maps-SSSSS-of-NNNNN.tfrecord`` with ``--write-tfrecord``;
- ``overlays/<safe id>.png`` with ``--overlays N``; file names come from ``safe_file_name``.

Example:
    >>> rows, dead = pipeline | ReadRows(config)
    >>> table = pyarrow.parquet.read_table("out/maps-00000-of-00001.parquet")
    >>> maps = read_maps(table)                           # numpy [N, h, w] float32 in [0, 1]
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import zlib
from collections.abc import Iterable, Iterator
from typing import Any

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.io import fileio
from apache_beam.io.filesystems import FileSystems

from fullgrad.beam.config import Columns, JobConfig
from fullgrad.images import encode_jpeg, encode_png

__all__ = [
    "AUDIT_COLUMNS",
    "DEAD_LETTER_PREFIX",
    "DEAD_LETTER_SCHEMA",
    "MAPS_PREFIX",
    "ReadRows",
    "WriteDeadLetters",
    "WriteMaps",
    "WriteMapsTFRecord",
    "WriteOverlays",
    "dead_letter",
    "input_patterns",
    "maps_schema",
    "read_maps",
    "record_to_example",
    "records_to_table",
    "safe_file_name",
]

MAPS_PREFIX = "maps"
DEAD_LETTER_PREFIX = "dead_letter"
OVERLAY_DIR = "overlays"
_READ_BATCH_ROWS = 64
_WRITE_BATCH_ROWS = 64

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


def input_patterns(spec: str) -> list[str]:
    """Splits ``--input`` into globs (comma-separated), dropping blanks.

    Example:
        >>> input_patterns("a/*.parquet, b/*.parquet")
        ['a/*.parquet', 'b/*.parquet']
    """
    return [part.strip() for part in spec.split(",") if part.strip()]


def safe_file_name(record_id: str, suffix: str = ".png") -> str:
    """A file name for an id from the data: only ``[A-Za-z0-9_-]``, bounded, collision-free.

    The readable part keeps a person oriented; the hash of the full id keeps two ids that
    sanitise alike (``a/b`` and ``a_b``) apart. No separator or dot survives, so the name can
    never leave its folder (``../../x`` becomes ``______x-<hash>.png``).

    Example:
        >>> safe_file_name("../../x").startswith("______x-")
        True
    """
    text = str(record_id)
    readable = re.sub(r"[^A-Za-z0-9_-]", "_", text)[:60] or "id"
    digest = hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return f"{readable}-{digest}{suffix}"


# -- reading ---------------------------------------------------------------------------------


class _ListParquetRowGroups(beam.DoFn):
    """Per matched file: one ``(path, row_group)`` work item, or a dead letter if unreadable."""

    def process(self, readable: fileio.ReadableFile) -> Iterator[Any]:
        import pyarrow.parquet as pq

        path = readable.metadata.path
        try:
            with readable.open() as handle:
                groups = pq.ParquetFile(handle).metadata.num_row_groups
        except Exception as error:  # noqa: BLE001 -- a broken file is data, not a crash
            yield beam.pvalue.TaggedOutput(
                "dead", dead_letter(path, "read", f"not a readable Parquet file: {error}")
            )
            return
        for group in range(groups):
            yield (path, group)


def _column_values(column: pa.ChunkedArray | pa.Array) -> list[Any]:
    """Python values of a column; tensors and nested lists become numpy pixel arrays."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if isinstance(column.type, pa.FixedShapeTensorType):
        valid = column.is_valid().to_numpy(zero_copy_only=False)
        arrays = column.to_numpy_ndarray()
        return [array if ok else None for array, ok in zip(arrays, valid, strict=True)]
    return column.to_pylist()


class _ReadParquetRowGroup(beam.DoFn):
    """Reads one row group in small batches; rows missing a required column are dead letters."""

    def __init__(self, columns: Columns) -> None:
        self._columns = columns

    def process(self, item: tuple[str, int]) -> Iterator[Any]:
        import pyarrow.parquet as pq

        path, group = item
        names = self._columns
        with FileSystems.open(path) as handle:
            parquet = pq.ParquetFile(handle)
            present = set(parquet.schema_arrow.names)
            missing = [c for c in (names.id, names.image) if c not in present]
            optional = [c for c in (names.label, names.mask) if c in present]
            # With a required column missing, only the ids are read: each row is a dead letter.
            wanted = [names.id] if names.id in present else []
            if not missing:
                wanted += [names.image, *optional]
            row = sum(parquet.metadata.row_group(g).num_rows for g in range(group))
            if not wanted:
                batches = [parquet.metadata.row_group(group).num_rows]
            else:
                batches = parquet.iter_batches(
                    batch_size=_READ_BATCH_ROWS, row_groups=[group], columns=wanted
                )
            for batch in batches:
                size = batch if isinstance(batch, int) else batch.num_rows
                values = {c: _column_values(batch.column(c)) for c in wanted}
                ids = values.get(names.id, [None] * size)
                for offset in range(size):
                    record_id = ids[offset]
                    fallback_id = f"{os.path.basename(path)}#{row + offset}"
                    if missing:
                        yield beam.pvalue.TaggedOutput(
                            "dead",
                            dead_letter(
                                fallback_id if record_id is None else record_id,
                                "read",
                                f"missing column(s) {missing} in {path} "
                                f"(it has {sorted(present)})",
                            ),
                        )
                    elif record_id is None:
                        yield beam.pvalue.TaggedOutput(
                            "dead", dead_letter(fallback_id, "read", f"null {names.id!r}")
                        )
                    else:
                        label = values[names.label][offset] if names.label in values else None
                        yield {
                            "id": str(record_id),
                            "image": values[names.image][offset],
                            "label": None if label is None else int(label),
                            "mask": values[names.mask][offset] if names.mask in values else None,
                            "source": path,
                        }
                row += size


class _ReadTFRecordFile(beam.DoFn):
    """Per matched file: ``(path, serialized record)`` pairs, in order.

    Beam's own framing and CRC checks (``_TFRecordUtil``, what ``ReadFromTFRecord`` uses) read
    each record; gzip is detected from the extension. When the framing breaks (a bad CRC, a
    truncated file), the records before the break have been read; the rest of the file, whose
    record count cannot be known, becomes one dead letter at stage ``read`` saying where it
    broke, and the job goes on.
    """

    def process(self, readable: fileio.ReadableFile) -> Iterator[Any]:
        from apache_beam.io.tfrecordio import _TFRecordUtil

        path = readable.metadata.path
        count = 0
        try:
            with readable.open(mime_type="application/octet-stream") as handle:
                while (record := _TFRecordUtil.read_record(handle)) is not None:
                    yield (path, record)
                    count += 1
        except (ValueError, EOFError, zlib.error) as error:
            # Broken framing or compression is data, not a crash. An I/O error (OSError) is not
            # caught: the runner retries the bundle, and fails the job if it keeps failing.
            yield beam.pvalue.TaggedOutput(
                "dead",
                dead_letter(
                    f"{os.path.basename(path)}#record-{count}-onwards",
                    "read",
                    f"corrupt TFRecord file {path}: {count} records read, the rest is "
                    f"unreadable ({error})"[:2000],
                ),
            )


class _ParseExample(beam.DoFn):
    """``(file, serialized tf.train.Example)`` -> a row, or a dead letter at stage read."""

    def __init__(self, columns: Columns) -> None:
        self._columns = columns

    def process(self, element: tuple[str, bytes]) -> Iterator[Any]:
        from tensorflow.core.example import example_pb2

        path, serialized = element
        names = self._columns
        fallback_id = f"{os.path.basename(path)}#sha1:{hashlib.sha1(serialized).hexdigest()[:16]}"
        try:
            example = example_pb2.Example.FromString(serialized)
        except Exception as error:  # noqa: BLE001
            yield beam.pvalue.TaggedOutput(
                "dead", dead_letter(fallback_id, "read", f"not a tf.train.Example: {error}")
            )
            return
        features = example.features.feature
        missing = [key for key in (names.id, names.image) if key not in features]
        record_id = _first_value(features[names.id]) if names.id in features else None
        if isinstance(record_id, bytes):
            record_id = record_id.decode("utf-8", "replace")
        if missing or record_id is None:
            yield beam.pvalue.TaggedOutput(
                "dead",
                dead_letter(
                    fallback_id if record_id is None else record_id,
                    "read",
                    f"missing key(s) {missing or [names.id]} in a tf.train.Example of {path} "
                    f"(it has {sorted(features)})",
                ),
            )
            return
        label = _first_value(features[names.label]) if names.label in features else None
        yield {
            "id": str(record_id),
            "image": _first_value(features[names.image]) or b"",
            "label": None if label is None else int(label),
            "mask": _first_value(features[names.mask]) if names.mask in features else None,
            "source": path,
        }


def _first_value(feature: Any) -> Any:
    kind = feature.WhichOneof("kind")
    values = getattr(feature, kind).value if kind else []
    return values[0] if len(values) else None


class ReadRows(beam.PTransform):
    """Reads ``config.input`` (Parquet or TFRecord globs) into rows and read dead letters.

    Returns a ``DoOutputsTuple``-like pair ``(rows, dead)``.

    Example Usage:
        >>> rows, dead = pipeline | ReadRows(config)
    """

    def __init__(self, config: JobConfig) -> None:
        super().__init__()
        self._config = config

    def expand(self, pbegin: beam.pvalue.PBegin) -> tuple[beam.PCollection, beam.PCollection]:
        config = self._config
        patterns = pbegin | "Patterns" >> beam.Create(input_patterns(config.input))
        if config.resolved_format() == "parquet":
            listed = (
                patterns
                | "Match" >> fileio.MatchAll()
                | "Open" >> fileio.ReadMatches()
                | "RowGroups" >> beam.ParDo(_ListParquetRowGroups()).with_outputs("dead", main="groups")
            )
            rows = (
                listed.groups
                | "Spread" >> beam.Reshuffle()
                | "ReadGroups"
                >> beam.ParDo(_ReadParquetRowGroup(config.columns())).with_outputs(
                    "dead", main="rows"
                )
            )
            dead = (listed.dead, rows.dead) | "ReadDead" >> beam.Flatten()
            return rows.rows, dead
        records = (
            patterns
            | "MatchRecords" >> fileio.MatchAll()
            | "SpreadFiles" >> beam.Reshuffle()
            | "OpenRecords" >> fileio.ReadMatches()
            | "ReadRecords" >> beam.ParDo(_ReadTFRecordFile()).with_outputs("dead", main="records")
        )
        parsed = records.records | "Parse" >> beam.ParDo(
            _ParseExample(config.columns())
        ).with_outputs("dead", main="rows")
        dead = (records.dead, parsed.dead) | "ReadDead" >> beam.Flatten()
        return parsed.rows, dead


# -- writing ---------------------------------------------------------------------------------

_MAP_TYPES = {"float32": pa.float32(), "float16": pa.float16(), "uint8": pa.uint8()}


def maps_schema(map_size: int, map_dtype: str) -> pa.Schema:
    """The schema of ``maps-*.parquet``; ``map`` is a ``fixed_shape_tensor`` of ``[h, w]``.

    ``uint8`` maps hold ``round(map * 255)``; the schema metadata says how to undo the cast
    (``fullgrad.map_scale``), and ``read_maps`` does it.

    Example:
        >>> maps_schema(56, "uint8").field("map").type.shape
        [56, 56]
    """
    tensor = pa.fixed_shape_tensor(_MAP_TYPES[map_dtype], [map_size, map_size])
    scale = "255" if map_dtype == "uint8" else "1"
    return pa.schema(
        [
            ("id", pa.string()),
            ("target", pa.int32()),
            ("logit", pa.float32()),
            ("label", pa.int64()),
            ("topk_classes", pa.list_(pa.int32())),
            ("topk_logits", pa.list_(pa.float32())),
            ("residual", pa.float32()),
            ("map", tensor),
            ("thumbnail", pa.binary()),
            ("mask", pa.binary()),
            # Per-image audit statistics (fullgrad.audit.stats); null when not computed.
            *((name, pa.float32()) for name in AUDIT_COLUMNS),
        ],
        metadata={"fullgrad.map_dtype": map_dtype, "fullgrad.map_scale": scale},
    )


def _cast_maps(maps: np.ndarray, map_dtype: str) -> np.ndarray:
    if map_dtype == "uint8":
        return np.round(np.clip(maps, 0.0, 1.0) * 255.0).astype(np.uint8)
    return maps.astype(map_dtype)


#: The per-image audit statistics stored as columns of ``maps-*.parquet``.
AUDIT_COLUMNS = ("concentration", "entropy", "border_energy", "mask_energy", "pointing_hit",
                 "mask_area")


def _statistic(value: Any) -> float | None:
    """A statistic as a Parquet value: NaN (no mask) and absent become null."""
    if value is None or not np.isfinite(value):
        return None
    return float(value)


def records_to_table(records: list[dict], schema: pa.Schema) -> pa.Table:
    """Explained records -> a ``pa.Table`` of ``schema`` (from ``maps_schema``).

    The map is cast to the schema's dtype; thumbnails are JPEG-encoded, masks PNG-encoded
    (lossless: they are measured).

    Example:
        >>> table = records_to_table(records, maps_schema(56, "uint8"))
    """
    map_type = schema.field("map").type
    dtype = schema.metadata[b"fullgrad.map_dtype"].decode()
    maps = _cast_maps(np.stack([r["map"] for r in records]), dtype)
    tensor = pa.ExtensionArray.from_storage(
        map_type,
        pa.FixedSizeListArray.from_arrays(
            pa.array(maps.reshape(-1), type=map_type.value_type), int(np.prod(map_type.shape))
        ),
    )
    columns = {
        "id": pa.array([r["id"] for r in records], pa.string()),
        "target": pa.array([int(r["target"]) for r in records], pa.int32()),
        "logit": pa.array([float(r["logit"]) for r in records], pa.float32()),
        "label": pa.array([r.get("label") for r in records], pa.int64()),
        "topk_classes": pa.array([list(map(int, r["topk_classes"])) for r in records],
                                 pa.list_(pa.int32())),
        "topk_logits": pa.array([list(map(float, r["topk_logits"])) for r in records],
                                pa.list_(pa.float32())),
        "residual": pa.array([float(r["residual"]) for r in records], pa.float32()),
        "map": tensor,
        "thumbnail": pa.array([encode_jpeg(r["thumbnail"]) for r in records], pa.binary()),
        "mask": pa.array(
            [None if r.get("mask") is None else encode_png(r["mask"]) for r in records],
            pa.binary(),
        ),
        **{
            name: pa.array([_statistic(r.get(name)) for r in records], pa.float32())
            for name in AUDIT_COLUMNS
        },
    }
    return pa.Table.from_pydict(columns, schema=schema)


def read_maps(table: pa.Table) -> np.ndarray:
    """The ``map`` column of a maps table as float32 ``[N, h, w]`` in [0, 1].

    Example:
        >>> import pyarrow.parquet as pq
        >>> maps = read_maps(pq.read_table("out/maps-00000-of-00001.parquet"))
    """
    column = table.column("map").combine_chunks()
    scale = float((table.schema.metadata or {}).get(b"fullgrad.map_scale", b"1"))
    return column.to_numpy_ndarray().astype(np.float32) / scale


class _ToTables(beam.PTransform):
    def __init__(self, to_table: Any) -> None:
        super().__init__()
        self._to_table = to_table

    def expand(self, records: beam.PCollection) -> beam.PCollection:
        return (
            records
            | "Batch" >> beam.BatchElements(min_batch_size=1, max_batch_size=_WRITE_BATCH_ROWS)
            | "ToTable" >> beam.Map(self._to_table)
        )


class WriteMaps(beam.PTransform):
    """Writes explained records to ``<output>/maps-*.parquet``.

    Example Usage:
        >>> explained | WriteMaps(config)
    """

    def __init__(self, config: JobConfig) -> None:
        super().__init__()
        self._schema = maps_schema(config.resolved_map_size(), config.map_dtype)
        self._output = config.output

    def expand(self, records: beam.PCollection) -> beam.pvalue.PDone:
        schema = self._schema
        return (
            records
            | "Tables" >> _ToTables(lambda batch: records_to_table(batch, schema))
            | "Write"
            >> beam.io.WriteToParquetBatched(
                FileSystems.join(self._output, MAPS_PREFIX),
                schema=schema,
                codec="zstd",
                file_name_suffix=".parquet",
            )
        )


class WriteDeadLetters(beam.PTransform):
    """Writes dead letters to ``<output>/dead_letter-*.parquet`` (an empty file when none).

    Example Usage:
        >>> dead | WriteDeadLetters(config.output)
    """

    def __init__(self, output: str) -> None:
        super().__init__()
        self._output = output

    def expand(self, dead: beam.PCollection) -> beam.pvalue.PDone:
        def to_table(batch: list[dict]) -> pa.Table:
            return pa.Table.from_pylist(
                [{k: str(d[k]) for k in ("id", "stage", "error")} for d in batch],
                schema=DEAD_LETTER_SCHEMA,
            )

        return (
            dead
            | "Tables" >> _ToTables(to_table)
            | "Write"
            >> beam.io.WriteToParquetBatched(
                FileSystems.join(self._output, DEAD_LETTER_PREFIX),
                schema=DEAD_LETTER_SCHEMA,
                codec="zstd",
                file_name_suffix=".parquet",
            )
        )


def record_to_example(record: dict, map_dtype: str) -> bytes:
    """An explained record as a serialized ``tf.train.Example``.

    Keys: ``id``, ``target``, ``logit``, ``label`` (when known), ``topk_classes``,
    ``topk_logits``, ``residual``, ``map`` (raw bytes of ``map_dtype``), ``map/shape``,
    ``map/dtype``, ``thumbnail`` (JPEG), ``mask`` (PNG, when known).

    Example:
        >>> example = tf.train.Example.FromString(record_to_example(record, "float16"))
        >>> np.frombuffer(example.features.feature["map"].bytes_list.value[0], np.float16)
    """
    from tensorflow.core.example import example_pb2, feature_pb2

    def ints(values: Iterable[int]) -> feature_pb2.Feature:
        return feature_pb2.Feature(int64_list=feature_pb2.Int64List(value=list(values)))

    def floats(values: Iterable[float]) -> feature_pb2.Feature:
        return feature_pb2.Feature(float_list=feature_pb2.FloatList(value=list(values)))

    def raw(*values: bytes) -> feature_pb2.Feature:
        return feature_pb2.Feature(bytes_list=feature_pb2.BytesList(value=list(values)))

    saliency = _cast_maps(np.asarray(record["map"]), map_dtype)
    feature = {
        "id": raw(record["id"].encode()),
        "target": ints([int(record["target"])]),
        "logit": floats([float(record["logit"])]),
        "topk_classes": ints(map(int, record["topk_classes"])),
        "topk_logits": floats(map(float, record["topk_logits"])),
        "residual": floats([float(record["residual"])]),
        "map": raw(saliency.tobytes()),
        "map/shape": ints(saliency.shape),
        "map/dtype": raw(map_dtype.encode()),
        "thumbnail": raw(encode_jpeg(record["thumbnail"])),
    }
    if record.get("label") is not None:
        feature["label"] = ints([int(record["label"])])
    if record.get("mask") is not None:
        feature["mask"] = raw(encode_png(record["mask"]))
    example = example_pb2.Example(features=feature_pb2.Features(feature=feature))
    return example.SerializeToString()


class WriteMapsTFRecord(beam.PTransform):
    """Writes explained records to ``<output>/maps-*.tfrecord`` (``record_to_example``)."""

    def __init__(self, config: JobConfig) -> None:
        super().__init__()
        self._output = config.output
        self._dtype = config.map_dtype

    def expand(self, records: beam.PCollection) -> beam.pvalue.PDone:
        dtype = self._dtype
        return (
            records
            | "Serialize" >> beam.Map(lambda record: record_to_example(record, dtype))
            | "Write"
            >> beam.io.WriteToTFRecord(
                FileSystems.join(self._output, MAPS_PREFIX), file_name_suffix=".tfrecord"
            )
        )


def _write_overlay(record: dict, folder: str) -> str:
    from PIL import Image

    from fullgrad.utils import overlay

    path = FileSystems.join(folder, safe_file_name(record["id"]))
    picture = overlay(record["thumbnail"], record["map"])
    with FileSystems.create(path) as handle:
        Image.fromarray(picture).save(handle, format="PNG")
    return path


class WriteOverlays(beam.PTransform):
    """Writes PNG overlays of the ``count`` explained records with the smallest ids.

    The smallest ids (not a random sample) so reruns and runners agree on the pictures.
    ``overlays/index.json`` maps each file name back to its id.

    Example Usage:
        >>> explained | WriteOverlays(config.output, 16)
    """

    def __init__(self, output: str, count: int) -> None:
        super().__init__()
        self._folder = FileSystems.join(output, OVERLAY_DIR)
        self._count = count

    def expand(self, records: beam.PCollection) -> beam.PCollection:
        folder = self._folder

        def write_all(chosen: list[dict]) -> list[str]:
            index = {}
            for record in chosen:
                path = _write_overlay(record, folder)
                index[os.path.basename(path)] = record["id"]
            with FileSystems.create(FileSystems.join(folder, "index.json")) as handle:
                handle.write(json.dumps(index, indent=1, sort_keys=True).encode())
            return sorted(index)

        return (
            records
            | "Light" >> beam.Map(lambda r: {k: r[k] for k in ("id", "map", "thumbnail")})
            | "Smallest" >> beam.combiners.Top.Of(self._count, key=lambda r: r["id"], reverse=True)
            | "Write" >> beam.Map(write_all)
        )

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

- ``maps-SSSSS-of-NNNNN.parquet``: one row per explained image, in the form
  :mod:`fullgrad.record` declares (read back with ``fullgrad.record.from_table``/``read_maps``);
- ``dead_letter-SSSSS-of-NNNNN.parquet``: ``id``, ``stage``, ``error``;
- ``maps-SSSSS-of-NNNNN.tfrecord`` with ``--write-tfrecord`` (``fullgrad.record.to_example``);
- ``overlays/<safe id>.png`` with ``--overlays N``; file names come from ``safe_file_name``.

Example:
    >>> rows, dead = pipeline | ReadRows(config)
    >>> table = pyarrow.parquet.read_table("out/maps-00000-of-00001.parquet")
    >>> maps = fullgrad.record.read_maps(table)           # numpy [N, h, w] float32 in [0, 1]
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import zlib
from collections.abc import Iterator
from typing import Any

import apache_beam as beam
import pyarrow as pa
from apache_beam.io import fileio
from apache_beam.io.filesystems import FileSystems

from fullgrad import record
from fullgrad.beam.config import Columns, JobConfig
from fullgrad.record import dead_letter

__all__ = [
    "DEAD_LETTER_PREFIX",
    "MAPS_PREFIX",
    "ReadRows",
    "WriteDeadLetters",
    "WriteMaps",
    "WriteMapsTFRecord",
    "WriteOverlays",
    "input_patterns",
    "safe_file_name",
]

MAPS_PREFIX = "maps"
DEAD_LETTER_PREFIX = "dead_letter"
OVERLAY_DIR = "overlays"
_READ_BATCH_ROWS = 64
_WRITE_BATCH_ROWS = 64

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
                while (serialized := _TFRecordUtil.read_record(handle)) is not None:
                    yield (path, serialized)
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
        self._schema = record.schema(
            config.resolved_map_size(), config.map_dtype, part_maps=config.part_maps
        )
        self._output = config.output

    def expand(self, records: beam.PCollection) -> beam.pvalue.PDone:
        schema = self._schema
        return (
            records
            | "Tables" >> _ToTables(lambda batch: record.to_table(batch, schema))
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
        return (
            dead
            | "Tables" >> _ToTables(record.dead_letters_to_table)
            | "Write"
            >> beam.io.WriteToParquetBatched(
                FileSystems.join(self._output, DEAD_LETTER_PREFIX),
                schema=record.DEAD_LETTER_SCHEMA,
                codec="zstd",
                file_name_suffix=".parquet",
            )
        )


class WriteMapsTFRecord(beam.PTransform):
    """Writes explained records to ``<output>/maps-*.tfrecord`` (``fullgrad.record.to_example``)."""

    def __init__(self, config: JobConfig) -> None:
        super().__init__()
        self._output = config.output
        self._dtype = config.map_dtype

    def expand(self, records: beam.PCollection) -> beam.pvalue.PDone:
        dtype = self._dtype
        return (
            records
            | "Serialize" >> beam.Map(record.to_example, dtype)
            | "Write"
            >> beam.io.WriteToTFRecord(
                FileSystems.join(self._output, MAPS_PREFIX), file_name_suffix=".tfrecord"
            )
        )


def _write_overlay(explained: dict, folder: str) -> str:
    from PIL import Image

    from fullgrad.utils import overlay

    path = FileSystems.join(folder, safe_file_name(explained["id"]))
    picture = overlay(explained["thumbnail"], explained["map"])
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
            for explained in chosen:
                path = _write_overlay(explained, folder)
                index[os.path.basename(path)] = explained["id"]
            with FileSystems.create(FileSystems.join(folder, "index.json")) as handle:
                handle.write(json.dumps(index, indent=1, sort_keys=True).encode())
            return sorted(index)

        return (
            records
            | "Light" >> beam.Map(lambda r: {k: r[k] for k in ("id", "map", "thumbnail")})
            | "Smallest" >> beam.combiners.Top.Of(self._count, key=lambda r: r["id"], reverse=True)
            | "Write" >> beam.Map(write_all)
        )

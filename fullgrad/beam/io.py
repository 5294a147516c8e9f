"""Readers and writers of the Beam job: datasets in, maps and dead letters out.

Reading yields *rows*, ``{"id", "image", "label", "mask", "source"}`` (``image`` is encoded
bytes, a pixel array, or an ``io_images.ImageFile`` that the decoder reads in its decode-ahead
threads; ``label`` and ``mask`` may be None), and dead letters
``{"id", "stage": "read", "error"}`` for records that miss a required column or key. A missing
column never crashes the job: each of its rows becomes a dead letter naming the column.
Image files by glob and WebDataset shards are read in ``io_images`` and ``io_webdataset``.

- Parquet goes through Beam's ``fileio`` (globs over local paths, ``gs://``, ``s3://``) and
  pyarrow, one row group at a time in small record batches, so memory does not grow with the
  file. Row groups are spread over workers by a reshuffle. (Not ``ReadFromParquet``: asked for
  a column that one file lacks, it fails the whole job; here that file's rows become dead
  letters.) Without an id column (unless ``--id-column`` names one) a row's id is
  ``<file name>#<row>``. An image cell may be encoded bytes, a pixel array, or Hugging Face's
  ``{bytes, path}`` struct: the bytes, else the file at ``path`` (relative to the Parquet
  file's folder, or absolute / a URI), read at stage ``read`` (a missing file is a dead
  letter). Hugging Face ``ClassLabel`` names in the schema become the class names.
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
    >>> rows, dead, class_names = pipeline | ReadRows(config)
    >>> table = pyarrow.parquet.read_table("out/maps-00000-of-00001.parquet")
    >>> maps = fullgrad.record.read_maps(table)           # numpy [N, h, w] float32 in [0, 1]
"""

from __future__ import annotations

import hashlib
import json
import logging
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
    "huggingface_class_names",
    "input_patterns",
    "safe_file_name",
]

MAPS_PREFIX = "maps"
DEAD_LETTER_PREFIX = "dead_letter"
OVERLAY_DIR = "overlays"
_READ_BATCH_ROWS = 64
_LOGGER = logging.getLogger(__name__)
#: Rows per written Parquet row group. Each group has a fixed cost per column: with the maps
#: of ``benchmarks/bench_pipeline.py``, 64-row groups cost 0.05 ms a row to write, 256-row
#: groups 0.023 ms and make the file 12% smaller. Memory: one group's records per writer.
_WRITE_BATCH_ROWS = 256

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


def huggingface_class_names(metadata: dict | None, column: str) -> list[str] | None:
    """The ``ClassLabel`` names of ``column`` in a Parquet schema's ``huggingface`` metadata.

    Hugging Face ``datasets`` stores its features as JSON under the ``huggingface`` key of the
    Arrow schema metadata; a ``ClassLabel`` feature lists its names there.

    Example:
        >>> huggingface_class_names(pq.read_schema("train.parquet").metadata, "label")
        ['ant', 'bee', 'cow']
    """
    raw = (metadata or {}).get(b"huggingface")
    if not raw:
        return None
    try:
        feature = json.loads(raw)["info"]["features"][column]
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(feature, dict) or feature.get("_type") != "ClassLabel":
        return None
    names = feature.get("names")
    return [str(name) for name in names] if isinstance(names, list) and names else None


class _ListParquetRowGroups(beam.DoFn):
    """Per matched file: one ``(path, row_group)`` work item, or a dead letter if unreadable.

    Also ``(path, names)`` on the ``names`` output when the file carries Hugging Face
    ``ClassLabel`` names for the label column.
    """

    def __init__(self, label_column: str) -> None:
        self._label_column = label_column

    def process(self, readable: fileio.ReadableFile) -> Iterator[Any]:
        import pyarrow.parquet as pq

        path = readable.metadata.path
        try:
            with readable.open() as handle:
                parquet = pq.ParquetFile(handle)
                groups = parquet.metadata.num_row_groups
                names = huggingface_class_names(parquet.schema_arrow.metadata,
                                                self._label_column)
        except Exception as error:  # noqa: BLE001 -- a broken file is data, not a crash
            yield beam.pvalue.TaggedOutput(
                "dead", dead_letter(path, "read", f"not a readable Parquet file: {error}")
            )
            return
        if names:
            yield beam.pvalue.TaggedOutput("names", (path, names))
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


def _image_of(value: Any, parquet_path: str) -> Any:
    """The image of a Parquet cell: as stored, or a Hugging Face ``{bytes, path}`` resolved.

    The struct's bytes when present; else its ``path`` read through Beam's ``FileSystems``:
    as given when absolute or a URI (``gs://``, ``s3://``), else relative to the folder of the
    Parquet file.

    Raises:
        ValueError: The struct has neither, or the path cannot be read (the message says why).
    """
    if not isinstance(value, dict) or not ({"bytes", "path"} & set(value)):
        return value
    if value.get("bytes") is not None:
        return value["bytes"]
    target = value.get("path")
    if not target:
        raise ValueError("the image struct has neither bytes nor a path")
    if "://" not in target and not os.path.isabs(target):
        target = FileSystems.join(parquet_path.rsplit("/", 1)[0], target)
    try:
        with FileSystems.open(target, mime_type="application/octet-stream") as handle:
            return handle.read()
    except Exception as error:  # noqa: BLE001 -- the filesystem's own error names the cause
        raise ValueError(
            f"the image path {value['path']!r} ({target}) cannot be read: "
            f"{type(error).__name__}: {error}"
        ) from None


class _ReadParquetRowGroup(beam.DoFn):
    """Reads one row group in small batches; rows missing a required column are dead letters.

    The id column is required only when named (``--id-column``); without it a row's id is
    ``<file name>#<row>``, the same on every rerun. In a Hugging Face ``ClassLabel`` column,
    -1 (no label) becomes None.
    """

    def __init__(self, columns: Columns, id_required: bool) -> None:
        self._columns = columns
        self._id_required = id_required

    def process(self, item: tuple[str, int]) -> Iterator[Any]:
        import pyarrow.parquet as pq

        path, group = item
        names = self._columns
        with FileSystems.open(path) as handle:
            parquet = pq.ParquetFile(handle)
            present = set(parquet.schema_arrow.names)
            required = (names.id, names.image) if self._id_required else (names.image,)
            missing = [c for c in required if c not in present]
            optional = [c for c in (names.label, names.mask) if c in present]
            has_id = names.id in present
            # Hugging Face marks an unlabelled row of a ClassLabel column with -1.
            unlabelled = -1 if huggingface_class_names(
                parquet.schema_arrow.metadata, names.label) else None
            # With a required column missing, only the ids are read: each row is a dead letter.
            wanted = [names.id] if has_id else []
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
                    fallback_id = f"{os.path.basename(path)}#{row + offset}"
                    record_id = ids[offset] if has_id else fallback_id
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
                        continue
                    if record_id is None:
                        yield beam.pvalue.TaggedOutput(
                            "dead", dead_letter(fallback_id, "read", f"null {names.id!r}")
                        )
                        continue
                    try:
                        image = _image_of(values[names.image][offset], path)
                    except ValueError as error:
                        yield beam.pvalue.TaggedOutput(
                            "dead", dead_letter(str(record_id), "read", error)
                        )
                        continue
                    label = values[names.label][offset] if names.label in values else None
                    if label is not None and label == unlabelled:
                        label = None
                    yield {
                        "id": str(record_id),
                        "image": image,
                        "label": None if label is None else int(label),
                        "mask": values[names.mask][offset] if names.mask in values else None,
                        "source": path,
                    }
                row += size


class _ReadTFRecordFile(beam.DoFn):
    """Per matched file: ``(path, index, serialized record)``, in order.

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
                    yield (path, count, serialized)
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
    """``(file, index, serialized tf.train.Example)`` -> a row, or a dead letter at stage read.

    The id key is required only when named (``--id-column``); without it a record's id is
    ``<file name>#<record index>``, the same on every rerun.
    """

    def __init__(self, columns: Columns, id_required: bool) -> None:
        self._columns = columns
        self._id_required = id_required

    def process(self, element: tuple[str, int, bytes]) -> Iterator[Any]:
        from tensorflow.core.example import example_pb2

        path, index, serialized = element
        names = self._columns
        fallback_id = f"{os.path.basename(path)}#{index}"
        try:
            example = example_pb2.Example.FromString(serialized)
        except Exception as error:  # noqa: BLE001
            yield beam.pvalue.TaggedOutput(
                "dead", dead_letter(fallback_id, "read", f"not a tf.train.Example: {error}")
            )
            return
        features = example.features.feature
        required = (names.id, names.image) if self._id_required else (names.image,)
        missing = [key for key in required if key not in features]
        record_id = _first_value(features[names.id]) if names.id in features else None
        if record_id is None and names.id not in features and not self._id_required:
            record_id = fallback_id
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


def _first_file_names(found: list[tuple[str, list[str]]]) -> list[str] | None:
    """The class names of the first file (by path) that has some; files that differ are logged."""
    if not found:
        return None
    found = sorted(found)
    first = found[0][1]
    other = next((path for path, names in found if names != first), None)
    if other is not None:
        _LOGGER.warning("fullgrad: the Hugging Face class names of %s differ from those of %s; "
                        "the first file's are used", other, found[0][0])
    return first


def _parquet_class_names(_: Any, config_names: list[str] | None, found: list) -> dict:
    if config_names:
        return {"class_names": list(config_names), "source": "--class-names"}
    names = _first_file_names(found)
    return {"class_names": names, "source": "huggingface" if names else None}


class ReadRows(beam.PTransform):
    """Reads ``config.input`` into ``(rows, read dead letters, class names)``.

    Parquet and TFRecord here; image files by glob (:mod:`fullgrad.beam.io_images`) and
    WebDataset shards (:mod:`fullgrad.beam.io_webdataset`) in their modules. ``class names``
    is a singleton ``{"class_names": [...] | None, "source": ...}`` from the data's own
    metadata, in this order: ``--class-names``; Hugging Face ``ClassLabel`` names in a
    Parquet file's schema; the class folders' names (``--format images``).

    Example Usage:
        >>> rows, dead, names = pipeline | ReadRows(config)
    """

    def __init__(self, config: JobConfig) -> None:
        super().__init__()
        self._config = config

    def expand(self, pbegin: beam.pvalue.PBegin) -> tuple[Any, Any, Any]:
        config = self._config
        fmt = config.resolved_format()
        patterns = input_patterns(config.input)
        if fmt == "images":
            from fullgrad.beam.io_images import ReadImageFiles

            return pbegin | "Images" >> ReadImageFiles(config, patterns)
        config_names = config.class_name_list()
        if fmt == "parquet":
            listed = (
                pbegin
                | "Patterns" >> beam.Create(patterns)
                | "Match" >> fileio.MatchAll()
                | "Open" >> fileio.ReadMatches()
                | "RowGroups"
                >> beam.ParDo(_ListParquetRowGroups(config.columns().label)).with_outputs(
                    "dead", "names", main="groups"
                )
            )
            rows = (
                listed.groups
                | "Spread" >> beam.Reshuffle()
                | "ReadGroups"
                >> beam.ParDo(
                    _ReadParquetRowGroup(config.columns(), config.id_column is not None)
                ).with_outputs("dead", main="rows")
            )
            dead = (listed.dead, rows.dead) | "ReadDead" >> beam.Flatten()
            names = (
                pbegin
                | "NamesTrigger" >> beam.Create([None])
                | "ClassNames"
                >> beam.Map(_parquet_class_names, config_names,
                            beam.pvalue.AsList(listed.names))
            )
            return rows.rows, dead, names
        names = pbegin | "ClassNames" >> beam.Create(
            [{"class_names": config_names, "source": "--class-names" if config_names else None}]
        )
        if fmt == "webdataset":
            from fullgrad.beam.io_webdataset import ReadWebDataset

            rows, dead = pbegin | "Shards" >> ReadWebDataset(patterns)
            return rows, dead, names
        records = (
            pbegin
            | "Patterns" >> beam.Create(patterns)
            | "MatchRecords" >> fileio.MatchAll()
            | "SpreadFiles" >> beam.Reshuffle()
            | "OpenRecords" >> fileio.ReadMatches()
            | "ReadRecords" >> beam.ParDo(_ReadTFRecordFile()).with_outputs("dead", main="records")
        )
        parsed = records.records | "Parse" >> beam.ParDo(
            _ParseExample(config.columns(), config.id_column is not None)
        ).with_outputs("dead", main="rows")
        dead = (records.dead, parsed.dead) | "ReadDead" >> beam.Flatten()
        return parsed.rows, dead, names


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

"""The Beam job's settings as one picklable dataclass, shared by the job, the audit, Dask and KFP.

``JobConfig`` is what ``fullgrad run``'s flags parse into and what ``build_pipeline`` reads, so
other entry points (the Kubeflow component, the Dask runner, tests) build the same pipeline
without going through argparse.

Example:
    >>> config = JobConfig(input="data/*.parquet", model="model.keras", output="out",
    ...                    image_size=224, preprocess="torch")
    >>> config.columns().image
    'image'
"""

from __future__ import annotations

import dataclasses
import os

from fullgrad.images import DEFAULT_MAX_PIXELS, PREPROCESS_MODES
from fullgrad.targets import TARGET_PREDICTED

__all__ = [
    "FORMATS",
    "MAP_DTYPES",
    "PARQUET_COLUMNS",
    "TARGET_PREDICTED",
    "TFRECORD_KEYS",
    "Columns",
    "JobConfig",
]

FORMATS = ("parquet", "tfrecord")
MAP_DTYPES = ("float32", "float16", "uint8")


@dataclasses.dataclass(frozen=True)
class Columns:
    """Where each field lives in a record: Parquet column names or tf.train.Example keys.

    ``id`` and ``image`` are required (a record without them is a dead letter at stage
    ``read``); ``label`` and ``mask`` are optional (None when absent).
    """

    id: str
    image: str
    label: str
    mask: str


PARQUET_COLUMNS = Columns(id="id", image="image", label="label", mask="mask")
TFRECORD_KEYS = Columns(
    id="image/id", image="image/encoded", label="image/class/label", mask="image/mask"
)


@dataclasses.dataclass
class JobConfig:
    """Everything the pipeline needs; validated by ``validate()``.

    Attributes:
        input: A file glob (local, ``gs://``, ``s3://``), or several separated by commas.
        model: The ``.keras`` / ``.h5`` classifier (local or remote).
        output: The output folder.
        image_size: Images are resized to ``image_size x image_size``.
        preprocess: ``none|unit|tf|caffe|torch`` (see ``fullgrad.images.preprocess``).
        batch_size: The largest batch handed to the model (Beam's ``BatchElements``).
        min_batch_size: The smallest batch; equal to ``batch_size`` when None so batches are
            full except at bundle ends.
        format: ``parquet`` or ``tfrecord``; taken from the input's extension when None.
        target: ``"predicted"`` (top-1), ``"label"`` (the record's label) or a class index.
        top_k: How many top predictions each output row keeps.
        map_size: Side of the stored map and thumbnail; ``image_size`` when None.
        map_dtype: Storage type of the map column: float32, float16, or uint8 (``map * 255``).
        overlays: How many PNG overlays to write (the smallest ids), 0 for none.
        write_tfrecord: Also write the explained records as ``maps-*.tfrecord``.
        audit: Run the attribution audit on the explained records.
        overwrite: Replace earlier outputs in ``output``; without it a rerun is refused.
        max_pixels: Largest decoded image, in pixels (decompression-bomb guard).
        id_column, image_column, label_column, mask_column: Column names / Example keys;
            the format's defaults when None.
        safe_mode: Keras' safe_mode when loading the model.
        progress_every: Log a progress line every this many images per worker (0: never).
        decode_threads: Threads per worker that decode images ahead of the model, so decoding
            overlaps the model's compute instead of waiting for it; 0 decodes inline.
        model_copies: Load this many copies per machine and share them across processes
            (Beam's ``model_copies``); one per process when None.
        large_model: Share one model across the processes of a machine (Beam's ``large_model``).
        num_classes: The model's class count, filled in by the job's model check.
        audit_options: Keyword arguments of ``fullgrad.audit.transforms.AuditSettings`` (the
            audit's thresholds and the per-image statistics written as map columns).
    """

    input: str
    model: str
    output: str
    image_size: int = 224
    preprocess: str = "none"
    batch_size: int = 32
    min_batch_size: int | None = None
    format: str | None = None
    target: str | int = "predicted"
    top_k: int = 5
    map_size: int | None = None
    map_dtype: str = "float16"
    overlays: int = 0
    write_tfrecord: bool = False
    audit: bool = False
    overwrite: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    id_column: str | None = None
    image_column: str | None = None
    label_column: str | None = None
    mask_column: str | None = None
    safe_mode: bool = True
    progress_every: int = 1000
    decode_threads: int = 2
    model_copies: int | None = None
    large_model: bool = False
    num_classes: int | None = None
    audit_options: dict = dataclasses.field(default_factory=dict)

    def resolved_format(self) -> str:
        """``parquet`` or ``tfrecord``: the ``format`` field, else the input's extension.

        Raises:
            ValueError: No format given and the extension says nothing.
        """
        if self.format:
            if self.format not in FORMATS:
                raise ValueError(f"unknown --format {self.format!r}; choose from {FORMATS}")
            return self.format
        first = self.input.split(",")[0].strip().lower()
        stem = first.removesuffix(".gz")
        if stem.endswith((".parquet", ".pq")):
            return "parquet"
        if stem.endswith((".tfrecord", ".tfrecords", ".tfr")) or ".tfrecord" in os.path.basename(
            stem
        ):
            return "tfrecord"
        raise ValueError(
            f"cannot tell the format of {self.input!r} from its extension; "
            "pass --format parquet|tfrecord"
        )

    def columns(self) -> Columns:
        """The column names (Parquet) or Example keys (TFRecord), defaults filled in."""
        base = PARQUET_COLUMNS if self.resolved_format() == "parquet" else TFRECORD_KEYS
        return Columns(
            id=self.id_column or base.id,
            image=self.image_column or base.image,
            label=self.label_column or base.label,
            mask=self.mask_column or base.mask,
        )

    def resolved_map_size(self) -> int:
        """The side of stored maps and thumbnails."""
        return int(self.map_size or self.image_size)

    def target_index(self) -> int | None:
        """The fixed class to explain, or None for ``predicted`` / ``label``."""
        if isinstance(self.target, int):
            return self.target
        if self.target in ("predicted", "label"):
            return None
        return int(self.target)

    def validate(self) -> None:
        """Checks the settings that do not need the model or the data.

        Raises:
            ValueError: A setting out of range, with the flag's name.
        """
        self.resolved_format()
        if self.preprocess not in PREPROCESS_MODES:
            raise ValueError(f"--preprocess must be one of {PREPROCESS_MODES}")
        if self.map_dtype not in MAP_DTYPES:
            raise ValueError(f"--map-dtype must be one of {MAP_DTYPES}")
        for name in ("image_size", "batch_size", "top_k", "max_pixels"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        if self.map_size is not None and self.map_size < 1:
            raise ValueError("--map-size must be at least 1")
        if self.min_batch_size is not None and not 1 <= self.min_batch_size <= self.batch_size:
            raise ValueError("--min-batch-size must be between 1 and --batch-size")
        if self.overlays < 0:
            raise ValueError("--overlays must be >= 0")
        if self.decode_threads < 0:
            raise ValueError("--decode-threads must be >= 0")
        if not isinstance(self.target, int) and self.target not in ("predicted", "label"):
            try:
                int(self.target)
            except ValueError:
                raise ValueError(
                    f"--target must be 'predicted', 'label' or a class index, not {self.target!r}"
                ) from None
        index = self.target_index()
        if index is not None and index < 0:
            raise ValueError("--target class index must be >= 0")

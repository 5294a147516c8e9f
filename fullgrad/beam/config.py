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

import argparse
import dataclasses
from typing import Any

from fullgrad.images import DEFAULT_MAX_PIXELS, PREPROCESS_MODES
from fullgrad.methods import PRECISIONS
from fullgrad.record import MAP_DTYPES
from fullgrad.variants import (
    DEFAULT_SMOOTH_NOISE,
    DEFAULT_SMOOTH_SAMPLES,
    MAP_KINDS,
    PART_MAP_KINDS,
)

__all__ = [
    "FORMATS",
    "IMAGE_EXTENSIONS",
    "LABEL_SOURCES",
    "PARQUET_COLUMNS",
    "TFRECORD_KEYS",
    "Columns",
    "JobConfig",
    "KfpParameter",
    "Setting",
    "add_arguments",
    "config_from_args",
    "config_values",
    "format_glob",
    "format_of",
    "kfp_parameters",
    "settings_fields",
]

FORMATS = ("parquet", "tfrecord", "images", "webdataset")
#: Image file extensions read by ``--format images`` (and inside WebDataset shards).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
#: Extensions (after an optional ``.gz``) that tell an input's format.
_EXTENSIONS = {".parquet": "parquet", ".pq": "parquet", ".tfrecord": "tfrecord",
               ".tfrecords": "tfrecord", ".tfr": "tfrecord", ".tar": "webdataset",
               **dict.fromkeys(IMAGE_EXTENSIONS, "images")}
#: ``--labels`` values: labels from class folders, or none.
LABEL_SOURCES = ("folders", "none")


def format_of(path: str) -> str | None:
    """The input format a file name or glob implies, or None.

    ``.parquet``/``.pq`` are Parquet; ``.tfrecord``/``.tfrecords``/``.tfr``, also gzipped
    (``.gz``) or sharded (``data.tfrecord-00000-of-00008``), are TFRecord; ``.tar`` (also
    ``.tar.gz``) is WebDataset; an image extension (:data:`IMAGE_EXTENSIONS`, any case) is
    ``images``, one file per image.

    Example:
        >>> format_of("gs://b/train-*.tfrecords.gz"), format_of("a/part-0.parquet")
        ('tfrecord', 'parquet')
        >>> format_of("gs://b/train/*/*.JPG"), format_of("shards/train-{0..9}.tar")
        ('images', 'webdataset')
    """
    found = _extension_of(path)
    return _EXTENSIONS[found[1]] if found else None


def _extension_of(path: str) -> tuple[int, str] | None:
    """``(where the extension starts in the file name, the extension)``, or None."""
    name = path.rstrip("/").rsplit("/", 1)[-1].lower()
    stem = name.removesuffix(".gz")
    for extension in _EXTENSIONS:
        if stem.endswith(extension):
            return len(stem) - len(extension), extension
    if ".tfrecord" in stem:  # sharded: data.tfrecord-00000-of-00008
        return stem.rindex(".tfrecord"), ".tfrecord"
    return None


def format_glob(name: str) -> str | None:
    """A glob that matches files named like ``name`` in its folder, or None if no format.

    Example:
        >>> format_glob("part-0.parquet"), format_glob("train.tfrecord-00000-of-00002")
        ('*.parquet', '*.tfrecord*')
    """
    found = _extension_of(name)
    if found is None:
        return None
    start, extension = found
    base = name.rstrip("/").rsplit("/", 1)[-1]
    suffix = base[start:]
    return "*" + (suffix if suffix.lower().removesuffix(".gz") == extension else extension + "*")


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


@dataclasses.dataclass(frozen=True)
class Setting:
    """How a ``JobConfig`` field is offered: its flag, help, and whether Kubeflow exposes it.

    Attributes:
        help: The flag's help, and the Kubeflow parameter's description.
        group: The ``--help`` section.
        type: The parsing type (``int``, ``str``); a bool field is a switch.
        choices: Allowed values.
        flag: The flag's spelling when it is not ``--field-name`` (e.g. ``--unsafe-model``).
        kfp: Exposed as a Kubeflow component / pipeline parameter.
        kfp_name: The parameter's name there, when it is not the field's name.
    """

    help: str
    group: str
    type: type = str
    choices: tuple[str, ...] | None = None
    flag: str | None = None
    kfp: bool = True
    kfp_name: str | None = None


def _setting(default: Any = dataclasses.MISSING, **options: Any) -> Any:
    """A dataclass field carrying its :class:`Setting` (``required`` when no default)."""
    return dataclasses.field(default=default, metadata={"setting": Setting(**options)})


@dataclasses.dataclass
class JobConfig:
    """Everything the pipeline needs, declared once: each field's flag and Kubeflow parameter.

    ``fullgrad run``'s flags (:func:`add_arguments`), this dataclass and the Kubeflow
    ``explain`` component's parameters (:func:`kfp_parameters`) all come from these fields, so a
    new setting is one field here. A config is validated when it is built.

    Example:
        >>> JobConfig(input="data/*.parquet", model="model.keras", output="out",
        ...           image_size=224, preprocess="torch").columns().image
        'image'
    """

    input: str = _setting(
        help="file glob(s), comma-separated; local, gs:// or s3://", group="data", kfp=False
    )
    model: str = _setting(
        help=".keras/.h5 classifier file or gs:// s3:// URI", group="model", kfp=False
    )
    output: str = _setting(
        help="output folder (local, gs://, s3://)", group="output", kfp=False
    )
    image_size: int = _setting(
        224, help="images are resized to this side (the model's input)", group="model", type=int
    )
    preprocess: str = _setting(
        "none", help="pixel scaling: 0..255, 0..1, or keras.applications' modes",
        group="model", choices=PREPROCESS_MODES,
    )
    batch_size: int = _setting(32, help="the model's largest batch", group="model", type=int)
    min_batch_size: int | None = _setting(
        None, help="the smallest batch (default: --batch-size)", group="model", type=int
    )
    format: str | None = _setting(
        None, help="input format (default: from the input's extension)", group="data",
        choices=FORMATS, kfp_name="input_format",
    )
    target: str | int = _setting(
        "predicted", help="the class explained: predicted | label | a class index",
        group="model",
    )
    top_k: int = _setting(5, help="top predictions kept per image", group="model", type=int)
    map_size: int | None = _setting(
        None, help="side of stored maps and thumbnails (default: --image-size)", group="output",
        type=int,
    )
    map_dtype: str = _setting(
        "float16", help="storage type of the map column (uint8 holds map * 255)",
        group="output", choices=MAP_DTYPES,
    )
    overlays: int = _setting(0, help="PNG overlays of N images", group="output", type=int)
    write_tfrecord: bool = _setting(
        False, help="also write the maps as maps-*.tfrecord", group="output"
    )
    audit: bool = _setting(False, help="run the attribution audit in the same pass",
                           group="output")
    baseline: str | None = _setting(
        None, help="with --audit: an earlier run (its output folder or audit.json) to compare "
        "with; the audit gets a drift section", group="output", kfp=False,
    )
    history: str | None = _setting(
        None, help="with --audit: a history folder for scheduled runs; the baseline is its "
        "latest run (unless --baseline), and this run is added to it", group="output",
        kfp=False,
    )
    part_maps: bool = _setting(
        False, help="store the map's parts [P, h, w] (input term, bias terms by resolution) "
        "as the part_maps column; explained in the same pass, as with --audit", group="output",
    )
    overwrite: bool = _setting(
        False, help="replace an earlier run's outputs (default: refuse)", group="output",
        kfp=False,  # a Kubeflow task always owns its output folder
    )
    max_pixels: int = _setting(
        DEFAULT_MAX_PIXELS, help="largest decoded image (decompression-bomb guard)",
        group="data", type=int,
    )
    id_column: str | None = _setting(
        None, help="id column / Example key (default id | image/id)", group="data"
    )
    image_column: str | None = _setting(
        None, help="image column / key (default image | image/encoded)", group="data"
    )
    label_column: str | None = _setting(
        None, help="label column / key (default label | image/class/label)", group="data"
    )
    mask_column: str | None = _setting(
        None, help="object-mask PNG column / key (default mask | image/mask)", group="data"
    )
    class_names: str | None = _setting(
        None, help="comma-separated class names in label order; with --format images the "
        "class folders' names, fixing their labels (default: the sorted folder names)",
        group="data",
    )
    labels: str | None = _setting(
        None, help="--format images: label each image by its class folder, or not (default: "
        "folders when the glob has a wildcard folder level)", group="data",
        choices=LABEL_SOURCES,
    )
    safe_mode: bool = _setting(
        True, help="load the model in Keras safe_mode; the flag --unsafe-model turns it off "
        "(only for files you trust)", group="model", flag="--unsafe-model",
    )
    progress_every: int = _setting(
        1000, help="log a progress line every N images per worker (0: never)", group="output",
        type=int,
    )
    decode_threads: int = _setting(
        2, help="threads per worker decoding ahead of the model (0: inline)", group="data",
        type=int,
    )
    model_copies: int | None = _setting(
        None, help="share this many model copies across a machine's processes (GPU)",
        group="model", type=int,
    )
    large_model: bool = _setting(
        False, help="share one model across a machine's processes", group="model"
    )
    precision: str = _setting(
        "float32", help="the Keras dtype policy the model runs under (gradients and sums stay "
        "float32); mixed precision is the speed setting on GPUs", group="model",
        choices=PRECISIONS,
    )
    logits_layer: str | None = _setting(
        None, help="the layer whose output is the class logits (default: found through the "
        "model's head)", group="model",
    )
    map: str = _setting(
        "fullgrad", help="the saliency map: FullGrad, its simple or smooth variant, or a "
        "baseline (fullgrad.variants)", group="model", choices=MAP_KINDS,
    )
    smooth_samples: int = _setting(
        DEFAULT_SMOOTH_SAMPLES, help="noisy copies per image of --map smooth", group="model",
        type=int,
    )
    smooth_noise: float = _setting(
        DEFAULT_SMOOTH_NOISE, help="--map smooth's noise std, as a share of each image's "
        "value range", group="model", type=float,
    )
    evaluate: bool = _setting(
        False, help="also write evaluation.json: deletion/insertion faithfulness of every map "
        "kind and the random controls on a class-stratified sample", group="evaluation",
    )
    evaluate_images: int = _setting(
        256, help="images in --evaluate's sample, balanced over the explained classes",
        group="evaluation", type=int,
    )
    evaluate_batch_size: int = _setting(
        32, help="images per batch of --evaluate (each perturbation step is one forward pass)",
        group="evaluation", type=int,
    )
    #: The model's class count and input channels, filled in by the job's model check.
    num_classes: int | None = None
    channels: int | None = None
    #: ``fullgrad.audit.settings.AuditSettings`` keywords (the ``--audit-*`` flags).
    audit_options: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def resolved_format(self) -> str:
        """One of :data:`FORMATS`: the ``format`` field, else the input's extension.

        Raises:
            ValueError: No format given and the extension says nothing.
        """
        if self.format:
            if self.format not in FORMATS:
                raise ValueError(f"unknown --format {self.format!r}; choose from {FORMATS}")
            return self.format
        found = format_of(self.input.split(",")[0].strip())
        if found:
            return found
        raise ValueError(
            f"cannot tell the format of {self.input!r} from its extension; "
            f"pass --format {'|'.join(FORMATS)}"
        )

    def class_name_list(self) -> list[str] | None:
        """``--class-names`` as a list (blanks dropped), or None when not given."""
        if not self.class_names:
            return None
        return [name.strip() for name in self.class_names.split(",") if name.strip()]

    def folder_labels(self) -> bool:
        """Whether ``--format images`` labels images by their class folder.

        ``--labels`` when given; else True when a glob of ``--input`` has a wildcard in a
        folder level (``train/*/*.jpg``), as each image's folder then names its class.

        Example:
            >>> JobConfig(input="train/*/*.jpg", model="m.keras", output="o").folder_labels()
            True
        """
        if self.labels:
            return self.labels == "folders"
        return any(
            any(char in "*?[" for char in pattern.strip().rsplit("/", 1)[0])
            for pattern in self.input.split(",") if "/" in pattern.strip()
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
        if (self.baseline or self.history) and not self.audit:
            raise ValueError("--baseline and --history compare audits: they need --audit")
        if self.overlays < 0:
            raise ValueError("--overlays must be >= 0")
        if self.decode_threads < 0:
            raise ValueError("--decode-threads must be >= 0")
        if self.map not in MAP_KINDS:
            raise ValueError(f"--map must be one of {MAP_KINDS}, not {self.map!r}")
        if self.part_maps and self.map not in PART_MAP_KINDS:
            raise ValueError(f"--part-maps needs a --map with parts: one of {PART_MAP_KINDS}")
        if self.smooth_samples < 1:
            raise ValueError("--smooth-samples must be at least 1")
        if self.smooth_noise < 0:
            raise ValueError("--smooth-noise must be >= 0")
        if self.evaluate_images < 1 or self.evaluate_batch_size < 1:
            raise ValueError("--evaluate-images and --evaluate-batch-size must be at least 1")
        if self.labels is not None and self.labels not in LABEL_SOURCES:
            raise ValueError(f"--labels must be one of {LABEL_SOURCES}, not {self.labels!r}")
        names = self.class_name_list()
        if names is not None and len(set(names)) != len(names):
            raise ValueError(f"--class-names repeats a name: {self.class_names!r}")
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


# -- what the declaration generates --------------------------------------------------------------


def settings_fields() -> list[dataclasses.Field]:
    """The ``JobConfig`` fields that are settings (each has a flag), in declaration order."""
    return [f for f in dataclasses.fields(JobConfig) if "setting" in f.metadata]


def _flag(field: dataclasses.Field) -> str:
    return field.metadata["setting"].flag or "--" + field.name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser, defaults: JobConfig | None = None) -> None:
    """Adds one flag per setting of :class:`JobConfig`, grouped, with its help and default.

    A bool setting is a switch: ``--audit`` turns ``audit`` on; a setting that defaults to True
    has a flag that turns it off (``--unsafe-model`` sets ``safe_mode=False``).

    Args:
        parser: The parser (or group) to add to.
        defaults: A config whose values become the defaults; then no flag is required (the
            Kubeflow task parses its ``extra_args`` over the config it built).

    Example:
        >>> parser = argparse.ArgumentParser(); add_arguments(parser)
        >>> parser.parse_args(["--input", "a.parquet", "--model", "m.keras",
        ...                    "--output", "o", "--batch-size", "8"]).batch_size
        8
    """
    groups: dict[str, Any] = {}
    for field in settings_fields():
        setting: Setting = field.metadata["setting"]
        group = groups.get(setting.group)
        if group is None:
            group = groups[setting.group] = parser.add_argument_group(setting.group)
        kwargs: dict[str, Any] = {"dest": field.name, "help": setting.help}
        default = field.default if defaults is None else getattr(defaults, field.name)
        if default is dataclasses.MISSING:
            kwargs["required"] = True
        elif isinstance(field.default, bool):
            # The switch flips the declared default; a given config's value is kept unflipped.
            kwargs["action"] = "store_false" if field.default else "store_true"
            kwargs["default"] = default
        else:
            kwargs.update(type=setting.type, default=default)
            if setting.choices:
                kwargs["choices"] = setting.choices
        group.add_argument(_flag(field), **kwargs)


def config_from_args(args: argparse.Namespace, **extra: Any) -> JobConfig:
    """The :class:`JobConfig` of flags added by :func:`add_arguments`.

    Args:
        args: Parsed flags.
        extra: Fields that are not flags (``audit_options``, ``num_classes``).

    Example:
        >>> config_from_args(parser.parse_args(["--input", "a.parquet", "--model", "m.keras",
        ...                                     "--output", "o"])).image_size
        224
    """
    return JobConfig(**{f.name: getattr(args, f.name) for f in settings_fields()}, **extra)


@dataclasses.dataclass(frozen=True)
class KfpParameter:
    """A Kubeflow parameter generated from a setting.

    kfp parameters cannot be None: an unset optional setting is ``""`` (text) or ``0``
    (numbers), which :func:`config_values` turns back into None.

    Attributes:
        name: The parameter's name.
        field: The ``JobConfig`` field it sets.
        annotation: ``int``, ``str`` or ``bool``.
        default: Its default in the component and the pipeline.
        help: Its description.
    """

    name: str
    field: str
    annotation: type
    default: Any
    help: str


def kfp_parameters() -> list[KfpParameter]:
    """The settings the Kubeflow ``explain`` component and the pipeline take, typed.

    Example:
        >>> [p.name for p in kfp_parameters()][:3]
        ['image_size', 'preprocess', 'batch_size']
    """
    parameters = []
    for field in settings_fields():
        setting: Setting = field.metadata["setting"]
        if not setting.kfp:
            continue
        annotation = bool if isinstance(field.default, bool) else setting.type
        default = field.default
        if default is None:
            default = annotation()
        elif annotation is str:
            default = str(default)
        parameters.append(
            KfpParameter(setting.kfp_name or field.name, field.name, annotation, default,
                         setting.help)
        )
    return parameters


def config_values(parameters: dict[str, Any]) -> dict[str, Any]:
    """``JobConfig`` keywords from Kubeflow parameter values (``""``/``0`` -> None if optional).

    Example:
        >>> config_values({"input_format": "", "image_size": 32})
        {'format': None, 'image_size': 32}
    """
    defaults = {f.name: f.default for f in settings_fields()}
    values = {}
    for parameter in kfp_parameters():
        if parameter.name not in parameters:
            continue
        value = parameters[parameter.name]
        if defaults[parameter.field] is None and value in ("", 0):
            value = None
        values[parameter.field] = value
    return values

"""Reading image files by glob (``--format images``): one file is one image.

``--input 'gs://b/train/*/*.jpg'`` reads every matched JPEG, PNG, WebP, BMP or TIFF file
(``fullgrad.beam.config.IMAGE_EXTENSIONS``, any case; other files the glob matches are not
inputs). Each row's id is the file's path relative to the glob's fixed prefix (the folders
before the first wildcard: ``cat/001.jpg``), so ids are stable across reruns and buckets.

Labels, when ``JobConfig.folder_labels()`` (``--labels folders``, the default when a folder
level of the glob is a wildcard), are the index of the image's parent folder name among the
class names: ``--class-names`` when given (its order is the label order; an image in another
folder is a dead letter at stage ``read``), else the sorted names of the folders the glob
matched, as ``keras.utils.image_dataset_from_directory`` sorts them. Unlike Keras, a class
folder with no matched file is not a class (object stores have no empty folders): pass
``--class-names`` to keep such a class's index.

Scaling: ``fileio.MatchAll`` yields one element per file, a reshuffle spreads them over
workers, and each worker reads one file at a time. The only collection every worker sees is
the side input of distinct folder names.

Example:
    >>> rows, dead, names = pipeline | ReadImageFiles(config)
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from typing import Any

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.io.filesystems import FileSystems

from fullgrad.beam.config import IMAGE_EXTENSIONS, JobConfig
from fullgrad.record import dead_letter

__all__ = ["ReadImageFiles", "fixed_prefix", "is_image_file", "relative_id"]

_WILDCARDS = "*?["


def fixed_prefix(pattern: str) -> str:
    """The folders of a glob before its first wildcard, with a trailing ``/``.

    Example:
        >>> fixed_prefix("gs://b/train/*/*.jpg"), fixed_prefix("data/cat/*.png")
        ('gs://b/train/', 'data/cat/')
    """
    parts = pattern.split("/")
    fixed = []
    for part in parts[:-1]:
        if any(char in part for char in _WILDCARDS):
            break
        fixed.append(part)
    return "/".join(fixed) + "/" if fixed else ""


def relative_id(path: str, prefix: str) -> str:
    """``path`` relative to ``prefix`` (a glob's fixed prefix), ``/``-separated.

    A local glob may be relative while the matched path is absolute: both are compared
    absolute then.

    Example:
        >>> relative_id("gs://b/train/cat/001.jpg", "gs://b/train/")
        'cat/001.jpg'
    """
    if prefix and path.startswith(prefix):
        return path[len(prefix):]
    if "://" not in path:
        absolute = os.path.abspath(path)
        base = os.path.abspath(prefix or ".")
        if absolute.startswith(base.rstrip(os.sep) + os.sep):
            return os.path.relpath(absolute, base).replace(os.sep, "/")
    return path


def is_image_file(path: str) -> bool:
    """Whether a file name has an image extension (``IMAGE_EXTENSIONS``, any case).

    Example:
        >>> is_image_file("a/B.JPG"), is_image_file("a/labels.txt")
        (True, False)
    """
    return path.lower().endswith(IMAGE_EXTENSIONS)


def _folder_of(path: str) -> str:
    """The name of a file's parent folder ("" for a file at a bucket's top)."""
    parts = path.rstrip("/").split("/")
    return parts[-2] if len(parts) > 1 else ""


@dataclasses.dataclass(frozen=True)
class ImageFile:
    """An image still in its file: ``DecodeRows`` reads it in its decode-ahead threads, so the
    read overlaps the model's compute instead of running before it, in the reader.

    Example:
        >>> ImageFile("gs://b/train/cat/001.jpg").read()[:4]
        b'\xff\xd8\xff\xe0'
    """

    path: str

    def read(self) -> bytes:
        """The file's bytes, through Beam's FileSystems (local, gs://, s3://)."""
        with FileSystems.open(self.path, mime_type="application/octet-stream") as handle:
            return handle.read()


class _ReadImageFile(beam.DoFn):
    """``(path, id)`` -> a row with the file (read later) and its folder's label, or a dead
    letter."""

    def __init__(self, folder_labels: bool) -> None:
        self._folder_labels = folder_labels

    def process(self, item: tuple[str, str], class_names: list[str] | None) -> Iterator[Any]:
        path, record_id = item
        label = None
        if self._folder_labels:
            folder = _folder_of(path)
            names = class_names or []
            if folder not in names:
                yield beam.pvalue.TaggedOutput(
                    "dead",
                    dead_letter(record_id, "read", f"the folder {folder!r} of {path} is not "
                                f"among the class names {names}"),
                )
                return
            label = names.index(folder)
        yield {"id": record_id, "image": ImageFile(path), "label": label, "mask": None,
               "source": path}


def _class_names(_: Any, config_names: list[str] | None, folders: list[str],
                 folder_labels: bool) -> dict:
    if config_names:
        return {"class_names": list(config_names), "source": "--class-names"}
    if folder_labels and folders:
        return {"class_names": sorted(folders), "source": "folders"}
    return {"class_names": None, "source": None}


class ReadImageFiles(beam.PTransform):
    """Image files by glob -> ``(rows, read dead letters, class names)``.

    ``class names`` is a singleton ``{"class_names": [...] | None, "source": ...}``:
    ``--class-names``, else the sorted folder names when labels come from folders.

    Example Usage:
        >>> rows, dead, names = pipeline | ReadImageFiles(config)
    """

    def __init__(self, config: JobConfig, patterns: list[str]) -> None:
        super().__init__()
        self._patterns = patterns
        self._folder_labels = config.folder_labels()
        self._class_names = config.class_name_list()

    def expand(self, pbegin: beam.pvalue.PBegin) -> tuple[Any, Any, Any]:
        matched = []
        for index, pattern in enumerate(self._patterns):
            prefix = fixed_prefix(pattern)
            matched.append(
                pbegin
                | f"Glob{index}" >> beam.Create([pattern])
                | f"Match{index}" >> fileio.MatchAll()
                | f"Ids{index}" >> beam.Map(lambda m, p=prefix: (m.path, relative_id(m.path, p)))
            )
        files = (
            matched
            | "AllFiles" >> beam.Flatten()
            | "Images" >> beam.Filter(lambda item: is_image_file(item[0]))
        )
        folders = (
            files
            | "Folders" >> beam.Map(lambda item: _folder_of(item[0]))
            | "DistinctFolders" >> beam.Distinct()
        )
        names = (
            pbegin
            | "NamesTrigger" >> beam.Create([None])
            | "ClassNames"
            >> beam.Map(_class_names, self._class_names, beam.pvalue.AsList(folders),
                        self._folder_labels)
        )
        read = (
            files
            | "SpreadFiles" >> beam.Reshuffle()
            | "ReadFiles"
            >> beam.ParDo(
                _ReadImageFile(self._folder_labels),
                beam.pvalue.AsSingleton(names | "NameList" >> beam.Map(lambda n: n["class_names"])),
            ).with_outputs("dead", main="rows")
        )
        return read.rows, read.dead, names

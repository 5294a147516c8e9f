"""Reading WebDataset tar shards (``*.tar``, ``*.tar.gz``, or ``--format webdataset``).

A shard is a tar file whose members are grouped into samples by key: the member name up to
the first dot of its file name (``train/0001.jpg`` and ``train/0001.cls`` are sample
``train/0001``); a sample's members are adjacent, as WebDataset writes them. Per sample:

- the image is the first member whose extension is an image's (``jpg``, ``png``, ``webp`` ...;
  not ``mask.png``);
- the label is ``<key>.cls``, an integer as text (optional);
- the object mask is ``<key>.mask.png`` (optional);
- the id is ``<shard file name>#<key>``.

A sample without an image, or with a ``.cls`` that is not an integer, is a dead letter at
stage ``read``. A truncated or corrupt shard keeps the samples read before the break; the
rest of it, whose sample count cannot be known, is one dead letter at stage ``read``
(``<shard>#<key>-onwards``), as for a broken TFRecord file. Shards are spread over workers
by a reshuffle and streamed one member at a time.

Example:
    >>> rows, dead = pipeline | ReadWebDataset(patterns)
"""

from __future__ import annotations

import gzip
import os
import tarfile
import zlib
from collections.abc import Iterator
from typing import Any

import apache_beam as beam
from apache_beam.io import fileio

from fullgrad.beam.config import IMAGE_EXTENSIONS
from fullgrad.record import dead_letter

__all__ = ["ReadWebDataset", "sample_key"]

_IMAGE_SUFFIXES = tuple(extension.lstrip(".") for extension in IMAGE_EXTENSIONS)
_MASK_SUFFIX = "mask.png"


def sample_key(name: str) -> tuple[str, str]:
    """``(key, extension)`` of a shard member: its name split at the file name's first dot.

    Example:
        >>> sample_key("train/0001.mask.png")
        ('train/0001', 'mask.png')
    """
    folder, _, base = name.rpartition("/")
    stem, _, extension = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension


class _ReadShard(beam.DoFn):
    """One shard -> its samples as rows, and dead letters for bad samples or a broken rest."""

    def process(self, readable: fileio.ReadableFile) -> Iterator[Any]:
        path = readable.metadata.path
        shard = os.path.basename(path)
        count = 0
        key = None
        members: dict[str, bytes] = {}
        try:
            with readable.open(mime_type="application/octet-stream") as handle, tarfile.open(
                fileobj=handle, mode="r|*"
            ) as archive:
                for member in archive:
                    if not member.isfile():
                        continue
                    member_key, extension = sample_key(member.name)
                    if member_key != key:
                        if key is not None:
                            yield self._sample(shard, path, key, members)
                            count += 1
                        key, members = member_key, {}
                    data = archive.extractfile(member).read()
                    members.setdefault(extension.lower(), data)
            if key is not None:
                yield self._sample(shard, path, key, members)
                count += 1
        except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as error:
            # The sample being read when the shard broke may miss members: it goes with the rest.
            # An I/O error (OSError) is not caught: the runner retries the bundle.
            where = f"{key}-onwards" if key is not None else "start-onwards"
            yield beam.pvalue.TaggedOutput(
                "dead",
                dead_letter(
                    f"{shard}#{where}",
                    "read",
                    f"corrupt WebDataset shard {path}: {count} samples read, the rest is "
                    f"unreadable ({type(error).__name__}: {error})"[:2000],
                ),
            )

    @staticmethod
    def _sample(shard: str, path: str, key: str, members: dict[str, bytes]) -> Any:
        record_id = f"{shard}#{key}"
        image = next(
            (
                data
                for extension, data in members.items()
                if extension != _MASK_SUFFIX and extension.rsplit(".", 1)[-1] in _IMAGE_SUFFIXES
            ),
            None,
        )
        if image is None:
            return beam.pvalue.TaggedOutput(
                "dead",
                dead_letter(record_id, "read", f"sample {key!r} of {path} has no image member "
                            f"(it has {sorted(members)})"),
            )
        label = None
        if "cls" in members:
            text = members["cls"].decode("utf-8", "replace").strip()
            try:
                label = int(text)
            except ValueError:
                return beam.pvalue.TaggedOutput(
                    "dead",
                    dead_letter(record_id, "read",
                                f"{key}.cls of {path} is not an integer: {text[:40]!r}"),
                )
        return {"id": record_id, "image": image, "label": label,
                "mask": members.get(_MASK_SUFFIX), "source": path}


class ReadWebDataset(beam.PTransform):
    """WebDataset shards by glob -> ``(rows, read dead letters)``.

    Example Usage:
        >>> rows, dead = pipeline | ReadWebDataset(["gs://b/shards/train-*.tar"])
    """

    def __init__(self, patterns: list[str]) -> None:
        super().__init__()
        self._patterns = patterns

    def expand(self, pbegin: beam.pvalue.PBegin) -> tuple[Any, Any]:
        read = (
            pbegin
            | "Patterns" >> beam.Create(self._patterns)
            | "MatchShards" >> fileio.MatchAll()
            | "SpreadShards" >> beam.Reshuffle()
            | "OpenShards" >> fileio.ReadMatches()
            | "ReadShards" >> beam.ParDo(_ReadShard()).with_outputs("dead", main="rows")
        )
        return read.rows, read.dead

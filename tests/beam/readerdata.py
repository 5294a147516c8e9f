"""Datasets laid out as users store them (issue 12), and what the job must make of each.

- class folders of image files, written here with Pillow: one corrupt file, an empty class
  folder and a file that is not an image;
- Hugging Face Parquet (``tests/data/hf``, written by ``datasets``; see ``make_data.py``):
  embedded bytes with a corrupt image, and paths with one missing target; no id column;
- WebDataset shards (``tests/data/webdataset``, written by ``webdataset.TarWriter``) with a
  corrupt image, plus a copy of a shard truncated inside a sample.

Each ``*_EXPECTED`` maps id -> label for the explained rows; ``*_DEAD`` maps id -> (stage,
words of the error) for the dead letters.
"""

from __future__ import annotations

import os
import shutil
import tarfile

from beamdata import encode, random_image

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data")
HF_NAMES = ["ant", "bee", "cow"]

FOLDER_FILES = {  # relative path -> (Pillow format, label)
    "ant/0.png": ("PNG", 0),
    "ant/1.png": ("PNG", 0),
    "bee/0.jpg": ("JPEG", 1),
    "bee/1.webp": ("WEBP", 1),
    "cow/0.bmp": ("BMP", 2),
    "cow/1.tiff": ("TIFF", 2),
}
FOLDERS_EXPECTED = {path: label for path, (_, label) in FOLDER_FILES.items()}
FOLDERS_DEAD = {"cow/2.png": ("decode", "corrupt")}

HF_EXPECTED = {
    **{f"embedded.parquet#{i}": i % 3 for i in range(6) if i != 3},
    **{f"by_path.parquet#{i}": (i + 1) % 3 for i in range(5) if i != 2},
}
HF_DEAD = {
    "embedded.parquet#3": ("decode", "corrupt"),
    "by_path.parquet#2": ("read", "images/002.png"),
}

WDS_EXPECTED = {
    **{f"shard-00000.tar#a{i:04d}": i % 3 for i in range(4)},
    **{f"shard-00001.tar#b{i:04d}": (1 + i) % 3 for i in range(4) if i != 2},
    # The truncated copy of shard 0 keeps the samples before the break.
    **{f"shard-00002.tar#a{i:04d}": i % 3 for i in range(2)},
}
WDS_DEAD = {
    "shard-00001.tar#b0002": ("decode", "corrupt"),
    "shard-00002.tar#a0002-onwards": ("read", "2 samples read"),
}


def write_class_folders(folder: str, keras_check: bool = True) -> dict[str, int] | None:
    """Writes ``FOLDER_FILES`` under ``folder``, then the corrupt file, the empty folder and a
    text file; returns Keras' labels of the good files (by relative path) when asked.

    Keras' ``image_dataset_from_directory`` reads the folder before the corrupt file exists
    (it would fail on it) and before the empty class folder, which Keras counts as a class and
    a glob cannot see. It lists only PNG, JPEG, BMP and GIF: the WebP and TIFF files have their
    folder's label.
    """
    for path, (fmt, _) in FOLDER_FILES.items():
        os.makedirs(os.path.join(folder, os.path.dirname(path)), exist_ok=True)
        seed = sum(map(ord, path))
        options = {"lossless": True} if fmt == "WEBP" else {}
        random_image(seed).save(os.path.join(folder, path), format=fmt, **options)
    labels = None
    if keras_check:
        import keras

        dataset = keras.utils.image_dataset_from_directory(
            folder, labels="inferred", shuffle=False, batch_size=None, image_size=(8, 8)
        )
        found = [int(label) for _, label in dataset.as_numpy_iterator()]
        labels = {
            os.path.relpath(path, folder).replace(os.sep, "/"): label
            for path, label in zip(dataset.file_paths, found, strict=True)
        }
        assert dataset.class_names == HF_NAMES
    with open(os.path.join(folder, "cow", "2.png"), "wb") as handle:
        handle.write(encode(random_image(9))[:80])
    os.makedirs(os.path.join(folder, "bat"))  # empty: sorts between ant and bee
    with open(os.path.join(folder, "ant", "notes.txt"), "w") as handle:
        handle.write("not an image, not an input")
    return labels


def copy_hf(folder: str) -> str:
    """Copies the Hugging Face files (and the images their paths point at) into ``folder``."""
    shutil.copytree(os.path.join(DATA, "hf"), folder, dirs_exist_ok=True)
    return folder


def copy_shards(folder: str) -> str:
    """Copies both shards into ``folder``, and shard 0 truncated inside ``a0002.png``."""
    os.makedirs(folder, exist_ok=True)
    for name in ("shard-00000.tar", "shard-00001.tar"):
        shutil.copy(os.path.join(DATA, "webdataset", name), folder)
    source = os.path.join(DATA, "webdataset", "shard-00000.tar")
    with tarfile.open(source) as archive:
        member = archive.getmember("a0002.png")
    with open(source, "rb") as handle:
        data = handle.read()[: member.offset_data + member.size // 2]
    with open(os.path.join(folder, "shard-00002.tar"), "wb") as handle:
        handle.write(data)
    return folder


def check_outputs(maps, dead, expected: dict[str, int], failed: dict[str, tuple]) -> None:
    """Every expected id explained with its label (as target too), every failure dead."""
    rows = maps.to_pylist()
    assert {r["id"]: r["label"] for r in rows} == expected
    assert all(r["target"] == r["label"] for r in rows)  # --target label
    letters = {d["id"]: (d["stage"], d["error"]) for d in dead.to_pylist()}
    assert set(letters) == set(failed), letters
    for record_id, (stage, words) in failed.items():
        assert letters[record_id][0] == stage and words in letters[record_id][1], letters

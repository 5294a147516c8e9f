"""Class folders, Hugging Face Parquet and WebDataset shards on a real Dask LocalCluster.

The same files and bad inputs as ``tests/beam/test_beam_readers.py``; ids, labels, dead
letters, class names and the counts must be what the local runner gives.
"""

from __future__ import annotations

import json
import os

import pytest
from beamdata import SIZE, read_output
from readerdata import (
    FOLDERS_DEAD,
    FOLDERS_EXPECTED,
    HF_DEAD,
    HF_EXPECTED,
    HF_NAMES,
    WDS_DEAD,
    WDS_EXPECTED,
    check_outputs,
    copy_hf,
    copy_shards,
    write_class_folders,
)

from fullgrad.beam import job
from fullgrad.beam.config import JobConfig


def _layout(name: str, folder: str) -> tuple[str, str | None, dict, dict, list | None]:
    """``(glob, format, expected, dead, class names)`` of a layout written into ``folder``."""
    if name == "folders":
        write_class_folders(folder, keras_check=False)
        return f"{folder}/*/*", "images", FOLDERS_EXPECTED, FOLDERS_DEAD, HF_NAMES
    if name == "huggingface":
        copy_hf(folder)
        return f"{folder}/*.parquet", None, HF_EXPECTED, HF_DEAD, HF_NAMES
    copy_shards(folder)
    return f"{folder}/*.tar", None, WDS_EXPECTED, WDS_DEAD, None


@pytest.mark.parametrize("layout", ["folders", "huggingface", "webdataset"])
def test_layout_on_dask(layout, cluster, client, model_path, tmp_path):
    pattern, fmt, expected, dead, names = _layout(layout, str(tmp_path / "data"))
    output = str(tmp_path / "out")
    config = JobConfig(input=pattern, format=fmt, model=model_path, output=output,
                       image_size=SIZE, preprocess="unit", batch_size=4, target="label",
                       progress_every=0)
    summary = job.run(config, ["--runner", "dask", f"--dask_client_address={cluster.address}"])
    check_outputs(*read_output(output), expected, dead)
    assert (summary["input"], summary["explained"], summary["failed"]) == (
        len(expected) + len(dead), len(expected), len(dead)
    )
    with open(os.path.join(output, "summary.json")) as handle:
        assert json.load(handle)["class_names"] == names

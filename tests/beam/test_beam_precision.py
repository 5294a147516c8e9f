"""--precision reaches the engine: the job under mixed_bfloat16 gives float32-close maps."""

from __future__ import annotations

import numpy as np
from beamdata import good_rows, read_output, write_parquet

from fullgrad.beam import job
from fullgrad.beam.config import JobConfig
from fullgrad.record import read_maps


def test_mixed_bfloat16_job_matches_float32(tmp_path, model_path):
    (tmp_path / "in").mkdir()
    write_parquet(str(tmp_path / "in" / "a.parquet"), good_rows(8))
    maps = {}
    for precision in ("float32", "mixed_bfloat16"):
        out = tmp_path / precision
        summary = job.run(JobConfig(input=str(tmp_path / "in" / "*.parquet"), model=model_path,
                                    output=str(out), image_size=32, preprocess="unit",
                                    map_dtype="float32", precision=precision))
        assert summary["explained"] == 8 and summary["config"]["precision"] == precision
        maps[precision], _ = read_output(str(out))
    exact, mixed = read_maps(maps["float32"]), read_maps(maps["mixed_bfloat16"])
    assert not np.array_equal(exact, mixed)  # it really ran in bfloat16
    for a, b in zip(exact, mixed, strict=True):
        assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.98
    # Residuals are reported as they are: bfloat16 breaks completeness in the third digit.
    assert max(maps["mixed_bfloat16"].column("residual").to_pylist()) > 1e-6

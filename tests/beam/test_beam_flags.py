"""Strict flags: a flag that is neither fullgrad's nor a Beam pipeline option stops the command.

Beam alone only logs "Discarding unparseable args" and runs on with the defaults, so a
mistyped ``--batchsize 4`` would explain with batch size 32 and exit 0.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from fullgrad import cli
from fullgrad.beam import job
from fullgrad.beam.audit_job import settings_from_flags
from fullgrad.beam.config import JobConfig
from fullgrad.beam.options import parse_flags


def run_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fullgrad run", allow_abbrev=False)
    job.add_arguments(parser)
    return parser


REQUIRED = ["--input", "a.parquet", "--model", "m.keras", "--output", "o"]


def test_a_mistyped_flag_exits_2_naming_the_flag_and_nothing_runs(tmp_path):
    output = tmp_path / "out"
    process = subprocess.run(
        [sys.executable, "-c", "import sys; from fullgrad.cli import main; sys.exit(main())",
         "run", "--input", str(tmp_path / "missing.parquet"), "--model", "m.keras",
         "--output", str(output), "--batchsize", "4"],
        check=False, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert process.returncode == 2
    assert "unknown flag --batchsize (did you mean --batch-size?)" in process.stderr
    assert not output.exists()  # refused before the checks, the model, or any read


@pytest.mark.parametrize(
    ("flag", "closest"),
    [("--batchsize", "--batch-size"), ("--image_size", "--image-size"),
     ("--temp-location", "--temp_location"), ("--dask_client_adress", "--dask_client_address"),
     ("--audit-min-class-cout", "--audit-min-class-count")],
)  # fmt: skip
def test_the_error_names_the_closest_flag_of_either_kind(flag, closest, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_flags(run_parser(), [*REQUIRED, flag, "1"])
    assert exit_info.value.code == 2
    assert f"did you mean {closest}?" in capsys.readouterr().err


def test_beam_options_pass_through_in_order():
    beam = ["--runner", "FlinkRunner", "--flink_master=localhost:8081", "--parallelism", "4",
            "--temp_location", "gs://b/tmp", "--experiments", "use_runner_v2",
            "--runner", "dask", "--dask_client_address", "tcp://127.0.0.1:8786"]  # fmt: skip
    args, extra = parse_flags(run_parser(), [*REQUIRED, "--batch-size", "4", *beam])
    assert extra == beam
    assert job.config_from_args(args).batch_size == 4


def test_a_stray_value_is_refused(capsys):
    with pytest.raises(SystemExit):
        parse_flags(run_parser(), [*REQUIRED, "--batch-size", "4", "8"])
    assert "unexpected value '8'" in capsys.readouterr().err


def test_audit_and_the_kubeflow_task_refuse_unknown_flags_too(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["audit", "--maps", "m", "--min-clas-count", "1"])
    assert exit_info.value.code == 2
    assert "did you mean --min-class-count?" in capsys.readouterr().err
    assert settings_from_flags(["--min-class-count", "1"])[0].min_class_count == 1
    base = JobConfig(input="a.parquet", model="m.keras", output="o", overwrite=True)
    with pytest.raises(SystemExit):
        job.config_with_flags(base, ["--topk", "3"])
    assert "did you mean --top-k?" in capsys.readouterr().err


def test_flags_apply_over_a_config_built_in_code():
    base = JobConfig(input="a.tfrecord", model="m.keras", output="o", overwrite=True,
                     image_size=32, safe_mode=False, audit_options={"examples": 2})
    config, dask, beam = job.config_with_flags(
        base, ["--top-k", "3", "--audit", "--dask-workers", "3", "--runner", "dask"]
    )
    assert (config.top_k, config.audit, config.image_size) == (3, True, 32)
    assert config.overwrite and not config.safe_mode  # kept from the base, not reset
    assert config.audit_options == {"examples": 2} and dask.workers == 3
    assert beam == ["--runner", "dask"]
    again, _, _ = job.config_with_flags(base, ["--audit-examples", "5"])
    assert again.audit_options["examples"] == 5

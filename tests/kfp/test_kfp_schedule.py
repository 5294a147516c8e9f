"""``fullgrad schedule`` with the real kfp.Client against a local KFP API server."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fullgrad import cli
from fullgrad.kfp.schedule import CronError, parse_params, validate_cron

REPO = Path(__file__).resolve().parents[2]
PIPELINE = REPO / "pipelines" / "fullgrad_explain_audit.yaml"
CPU_PIPELINE = REPO / "pipelines" / "fullgrad_explain_audit_cpu.yaml"

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

PARAMS = [
    "dataset_uri=gs://bucket/images/",
    "model_uri=gs://bucket/models/prod.keras",
    "image_size=64",
    "target=label",
    "runner=local",
    'explain_args=["--top-k", "3"]',
]


@pytest.fixture()
def server(kfp_server):
    return kfp_server


def schedule(server, *args: str) -> int:
    return cli.main(["schedule", "--host", server.url, *args])


def add_foreign_schedule(server) -> None:
    """Puts another team's recurring run ``someone-elses`` (another pipeline) on the server."""
    server.recurring_runs["someone-elses"] = {
        "recurring_run_id": "someone-elses",
        "display_name": "other team",
        "experiment_id": next(iter(server.experiments)),
        "pipeline_version_reference": {"pipeline_id": "other", "pipeline_version_id": "v"},
        "trigger": {"cron_schedule": {"cron": "0 0 4 * * *"}},
        "status": "ENABLED",
    }


@pytest.mark.parametrize(
    "expression",
    ["0 0 2 * * *", "0 */15 * * * ?", "30 0 9 ? * MON-FRI", "0 0 0 1,15 JAN-JUN *", "0  0 2 * * *"],
)
def test_six_field_cron_is_accepted_and_normalised(expression):
    assert validate_cron(expression) == " ".join(expression.split())


def test_five_field_cron_is_refused_with_the_six_field_spelling():
    with pytest.raises(CronError) as error:
        validate_cron("0 2 * * *")
    message = str(error.value)
    assert "5 fields" in message and "6" in message
    assert "'0 0 2 * * *'" in message  # the same schedule, seconds first


@pytest.mark.parametrize(
    ("expression", "fragment"),
    [
        ("0 0 2 * *  * 2026", "7 fields"),
        ("60 0 2 * * *", "second field '60': 60 is outside 0-59"),
        ("0 0 24 * * *", "hour field '24'"),
        ("0 0 2 0 * *", "day of month field '0'"),
        ("0 0 2 * 13 *", "month field '13'"),
        ("0 0 2 * * FUNDAY", "day of week field 'FUNDAY'"),
        ("? 0 2 * * *", "'?' is only allowed"),
        ("0 0 5-2 * * *", "range start is after its end"),
        ("0 0 2 * * */0", "step must be >= 1"),
        ("@daily", "1 fields"),
    ],
)
def test_bad_cron_names_the_field(expression, fragment):
    with pytest.raises(CronError) as error:
        validate_cron(expression)
    assert fragment in str(error.value)


def test_params_are_typed_by_the_pipeline_definitions():
    params = parse_params(PARAMS, str(PIPELINE))
    assert params == {
        "dataset_uri": "gs://bucket/images/",
        "model_uri": "gs://bucket/models/prod.keras",
        "image_size": 64,
        "target": "label",
        "runner": "local",
        "explain_args": ["--top-k", "3"],
    }
    with pytest.raises(ValueError, match="unknown pipeline parameter 'imagesize'"):
        parse_params([*PARAMS, "imagesize=3"], str(PIPELINE))
    with pytest.raises(ValueError, match="image_size='big': not a valid NUMBER_INTEGER"):
        parse_params([*PARAMS, "image_size=big"], str(PIPELINE))
    with pytest.raises(ValueError, match=r"missing: \['model_uri'\]"):
        parse_params(["dataset_uri=gs://b/d/"], str(PIPELINE))


def test_cron_schedule_sends_the_pipeline_the_cron_and_the_parameters(server, capsys):
    status = schedule(
        server, "--cron", "0 0 2 * * *", "--experiment", "nightly-audit",
        "--name", "audit-prod", "--pipeline", str(PIPELINE),
        *[arg for p in PARAMS for arg in ("--param", p)],
    )  # fmt: skip
    assert status == 0, capsys.readouterr().err

    # The pipeline went up once, byte for byte the committed YAML, then a version of it.
    (upload,) = server.calls("POST", "/pipelines/upload")
    assert upload.query["name"] == "fullgrad-explain-audit"
    assert upload.files["uploadfile"] == PIPELINE.read_bytes()
    (version_upload,) = server.calls("POST", "/pipelines/upload_version")
    assert version_upload.files["uploadfile"] == PIPELINE.read_bytes()
    assert version_upload.query["name"].startswith("0.1.0-")

    (experiment,) = server.calls("POST", "/experiments")
    assert experiment.body["display_name"] == "nightly-audit"

    (create,) = server.calls("POST", "/recurringruns")
    body = create.body
    assert body["trigger"] == {"cron_schedule": {"cron": "0 0 2 * * *"}}
    assert body["display_name"] == "audit-prod"
    assert body["mode"] == "ENABLE"
    assert body["no_catchup"] is True
    assert body["max_concurrency"] == 1
    assert body["experiment_id"] == next(iter(server.experiments))
    assert body["runtime_config"]["parameters"] == {
        "dataset_uri": "gs://bucket/images/",
        "model_uri": "gs://bucket/models/prod.keras",
        "image_size": 64,
        "target": "label",
        "runner": "local",
        "explain_args": ["--top-k", "3"],
    }
    # The schedule runs the version holding exactly this spec, GPU request included.
    reference = body["pipeline_version_reference"]
    version = server.versions[reference["pipeline_version_id"]]
    assert version["display_name"] == version_upload.query["name"]
    assert reference["pipeline_id"] == version["pipeline_id"]
    assert version["pipeline_spec"] == yaml.safe_load(PIPELINE.read_text())
    explain = version["pipeline_spec"]["deploymentSpec"]["executors"]["exec-explain"]
    assert explain["container"]["resources"]["accelerator"]["resourceType"] == "nvidia.com/gpu"
    assert "pipeline_spec" not in body  # by reference, not inlined
    assert "created recurring run" in capsys.readouterr().out


def test_interval_schedule_reuses_the_uploaded_version(server, capsys):
    common = ["--experiment", "nightly-audit", "--pipeline", str(PIPELINE)]
    params = [arg for p in PARAMS[:2] for arg in ("--param", p)]
    assert schedule(server, "--cron", "0 30 1 * * *", *common, *params) == 0
    assert schedule(server, "--interval", "3600", *common, *params) == 0

    assert len(server.calls("POST", "/pipelines/upload")) == 1
    assert len(server.calls("POST", "/pipelines/upload_version")) == 1
    assert len(server.calls("POST", "/experiments")) == 1  # found by name the second time
    first, second = (r.body for r in server.calls("POST", "/recurringruns"))
    assert second["trigger"] == {"periodic_schedule": {"interval_second": 3600}}
    assert first["pipeline_version_reference"] == second["pipeline_version_reference"]


def test_a_changed_pipeline_gets_a_new_version(server):
    params = [arg for p in PARAMS[:2] for arg in ("--param", p)]
    for pipeline in (PIPELINE, CPU_PIPELINE):
        assert schedule(server, "--cron", "0 0 2 * * *", "--experiment", "e",
                        "--pipeline", str(pipeline), *params) == 0  # fmt: skip
    assert len(server.calls("POST", "/pipelines/upload")) == 1
    uploads = server.calls("POST", "/pipelines/upload_version")
    assert [u.files["uploadfile"] for u in uploads] == [
        PIPELINE.read_bytes(),
        CPU_PIPELINE.read_bytes(),
    ]
    refs = [r.body["pipeline_version_reference"] for r in server.calls("POST", "/recurringruns")]
    assert refs[0]["pipeline_id"] == refs[1]["pipeline_id"]
    assert refs[0]["pipeline_version_id"] != refs[1]["pipeline_version_id"]


def test_list_and_delete_touch_only_this_pipelines_schedules(server, capsys):
    params = [arg for p in PARAMS[:2] for arg in ("--param", p)]
    for cron in ("0 0 1 * * *", "0 0 2 * * *", "0 0 3 * * *"):
        assert schedule(server, "--cron", cron, "--experiment", "e", "--name", f"at {cron}",
                        "--pipeline", str(PIPELINE), *params) == 0  # fmt: skip
    add_foreign_schedule(server)
    capsys.readouterr()

    # Three of ours and one foreign: more than one page (the server pages by two).
    assert schedule(server, "--list", "--experiment", "e") == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[2] for line in lines] == [
        "cron '0 0 1 * * *'",
        "cron '0 0 2 * * *'",
        "cron '0 0 3 * * *'",
    ]
    assert len(server.calls("GET", "/recurringruns")) == 2

    ours = lines[1].split("\t")[0]
    assert schedule(server, "--delete", ours) == 0
    assert ours not in server.recurring_runs
    assert len(server.calls("DELETE", f"/recurringruns/{ours}")) == 1

    assert schedule(server, "--delete", "someone-elses") == 2
    assert "is not a schedule of 'fullgrad-explain-audit'" in capsys.readouterr().err
    assert "someone-elses" in server.recurring_runs
    assert not server.calls("DELETE", "/recurringruns/someone-elses")


def test_server_errors_are_reported_not_raised(server, capsys):
    assert schedule(server, "--delete", "no-such-run") == 2
    err = capsys.readouterr().err
    assert f"{server.url} answered 404" in err and "recurring run no-such-run not found" in err


def test_five_field_cron_fails_before_any_request(server, capsys):
    status = schedule(server, "--cron", "0 2 * * *", "--experiment", "e",
                      "--pipeline", str(PIPELINE), *[a for p in PARAMS for a in ("--param", p)])  # fmt: skip
    assert status == 2
    assert "use '0 0 2 * * *'" in capsys.readouterr().err
    assert server.requests == []


def test_default_pipeline_is_compiled_and_equals_the_committed_yaml(server, monkeypatch):
    monkeypatch.delenv("FULLGRAD_IMAGE", raising=False)
    params = [arg for p in PARAMS[:2] for arg in ("--param", p)]
    assert schedule(server, "--interval", "86400", "--experiment", "e", *params) == 0
    (upload,) = server.calls("POST", "/pipelines/upload")
    assert upload.files["uploadfile"] == PIPELINE.read_bytes()


def test_list_without_experiment_lists_this_pipelines_schedules_in_every_experiment(
    server, capsys
):
    params = [arg for p in PARAMS[:2] for arg in ("--param", p)]
    for experiment, cron in (("e1", "0 0 1 * * *"), ("e2", "0 0 2 * * *"), ("e1", "0 0 3 * * *")):
        assert schedule(server, "--cron", cron, "--experiment", experiment,
                        "--name", f"{experiment} at {cron}", "--pipeline", str(PIPELINE),
                        *params) == 0  # fmt: skip
    add_foreign_schedule(server)
    capsys.readouterr()
    before = len(server.calls("GET", "/recurringruns"))

    assert schedule(server, "--list", "--pipeline", str(PIPELINE)) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert sorted(line.split("\t")[1] for line in lines) == [
        "e1 at 0 0 1 * * *",
        "e1 at 0 0 3 * * *",
        "e2 at 0 0 2 * * *",
    ]
    listing = server.calls("GET", "/recurringruns")[before:]
    assert len(listing) == 2  # four runs, two per page: the client followed the token
    assert all("experiment_id" not in request.query for request in listing)

    assert schedule(server, "--list", "--experiment", "e2", "--pipeline", str(PIPELINE)) == 0
    (line,) = capsys.readouterr().out.strip().splitlines()
    assert line.split("\t")[1:3] == ["e2 at 0 0 2 * * *", "cron '0 0 2 * * *'"]

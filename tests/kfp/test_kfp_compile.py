"""``fullgrad compile``: the committed YAML is exactly its output, and holds what it should."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fullgrad import cli
from fullgrad.kfp.components import DEFAULT_IMAGE, IMAGE_ENV

REPO = Path(__file__).resolve().parents[2]
COMMITTED = sorted(
    p.relative_to(REPO)
    for folder in ("components", "pipelines")
    for p in (REPO / folder).glob("*.yaml")
)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("compiled")
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv(IMAGE_ENV, raising=False)
        assert cli.main(["compile", "--output", str(out)]) == 0
    return out


def test_committed_yaml_is_the_compile_output(compiled):
    produced = sorted(p.relative_to(compiled) for p in compiled.rglob("*") if p.is_file())
    assert produced == COMMITTED, "run `make compile` and commit components/ and pipelines/"
    stale = [str(p) for p in produced if (compiled / p).read_bytes() != (REPO / p).read_bytes()]
    assert not stale, f"stale compiled YAML {stale}: run `make compile` and commit the result"


def _spec(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_components_run_the_library_on_the_project_image(compiled):
    for name in ("explain", "audit"):
        spec = _spec(compiled / "components" / f"{name}.yaml")
        container = spec["deploymentSpec"]["executors"][f"exec-{name}"]["container"]
        assert container["image"] == DEFAULT_IMAGE == "fullgrad:0.1.0"
        program = container["command"][-1]
        # The body imports the library; nothing is pip-installed at start-up.
        assert f"from fullgrad.kfp.tasks import run_{name}" in program
        assert "pip install" not in " ".join(container["command"])


def test_component_interfaces(compiled):
    explain = _spec(compiled / "components" / "explain.yaml")["root"]
    inputs = explain["inputDefinitions"]
    assert {k: v["artifactType"]["schemaTitle"] for k, v in inputs["artifacts"].items()} == {
        "images": "system.Dataset",
        "model": "system.Model",
    }
    assert {k: v["parameterType"] for k, v in inputs["parameters"].items()}.items() >= {
        "image_size": "NUMBER_INTEGER",
        "preprocess": "STRING",
        "target": "STRING",
        "batch_size": "NUMBER_INTEGER",
        "runner": "STRING",
        "project": "STRING",
        "region": "STRING",
        "worker_accelerator": "STRING",
        "extra_args": "LIST",
    }.items()
    outputs = explain["outputDefinitions"]["artifacts"]
    assert {k: v["artifactType"]["schemaTitle"] for k, v in outputs.items()} == {
        "maps": "system.Dataset",
        "dead_letters": "system.Dataset",
        "counts": "system.Metrics",
    }
    audit = _spec(compiled / "components" / "audit.yaml")["root"]
    assert audit["inputDefinitions"]["artifacts"]["maps"]["artifactType"]["schemaTitle"] == (
        "system.Dataset"
    )
    outputs = audit["outputDefinitions"]["artifacts"]
    assert {k: v["artifactType"]["schemaTitle"] for k, v in outputs.items()} == {
        "report": "system.HTML",
        "summary": "system.Markdown",
        "metrics": "system.Metrics",
    }


def test_pipeline_gpu_settings_parameters_and_wiring(compiled):
    gpu = _spec(compiled / "pipelines" / "fullgrad_explain_audit.yaml")
    cpu = _spec(compiled / "pipelines" / "fullgrad_explain_audit_cpu.yaml")
    resources = gpu["deploymentSpec"]["executors"]["exec-explain"]["container"]["resources"]
    assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu"
    assert resources["accelerator"]["resourceCount"] == "1"
    assert "resources" not in cpu["deploymentSpec"]["executors"]["exec-explain"]["container"]
    assert "resources" not in gpu["deploymentSpec"]["executors"]["exec-audit"]["container"]

    params = gpu["root"]["inputDefinitions"]["parameters"]
    assert {"dataset_uri", "model_uri", "image_size", "target", "runner"} <= set(params)
    assert "defaultValue" not in params["dataset_uri"] and "defaultValue" not in params["model_uri"]
    assert params["sdk_container_image"]["defaultValue"] == DEFAULT_IMAGE

    tasks = gpu["root"]["dag"]["tasks"]
    assert tasks["importer"]["inputs"]["parameters"]["uri"]["componentInputParameter"] == (
        "dataset_uri"
    )
    assert tasks["importer-2"]["inputs"]["parameters"]["uri"]["componentInputParameter"] == (
        "model_uri"
    )
    maps_in = tasks["audit"]["inputs"]["artifacts"]["maps"]["taskOutputArtifact"]
    assert maps_in == {"outputArtifactKey": "maps", "producerTask": "explain"}
    # Scheduled runs must recompute: the same URIs hold new data or a new model each night.
    assert tasks["explain"]["cachingOptions"] == {}
    assert tasks["audit"]["cachingOptions"] == {}


def test_image_and_gpu_are_configurable(tmp_path, monkeypatch):
    monkeypatch.setenv(IMAGE_ENV, "europe-docker.pkg.dev/p/ml/fullgrad:1")
    assert (
        cli.main(["compile", "--output", str(tmp_path), "--accelerator-type", "nvidia.com/mig-1g.10gb",
                  "--accelerator-limit", "2"])
        == 0
    )  # fmt: skip
    spec = _spec(tmp_path / "pipelines" / "fullgrad_explain_audit.yaml")
    container = spec["deploymentSpec"]["executors"]["exec-explain"]["container"]
    assert container["image"] == "europe-docker.pkg.dev/p/ml/fullgrad:1"
    assert container["resources"]["accelerator"] == {
        "count": "2",
        "resourceCount": "2",
        "resourceType": "nvidia.com/mig-1g.10gb",
        "type": "nvidia.com/mig-1g.10gb",
    }
    with pytest.raises(SystemExit, match="--accelerator-limit must be >= 1"):
        cli.main(["compile", "--output", str(tmp_path), "--accelerator-limit", "0"])

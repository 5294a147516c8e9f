"""containers/Dockerfile, checked without Docker: structure, lint rules, and pins == pyproject.

Docker cannot run on these machines, so the build itself is untested here; what is checked is
what makes or breaks it: base tags matching the pinned TensorFlow/Beam/Python, Beam's boot as
the entrypoint, the extras installed, and that .dockerignore lets in every file COPY needs.
"""

from __future__ import annotations

import fnmatch
import json
import re
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "containers" / "Dockerfile"


def instructions(text: str) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` per instruction: comments dropped, continuations joined."""
    result, pending = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):  # a comment inside a continued instruction
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = pending + stripped
        pending = ""
        keyword, _, rest = full.partition(" ")
        result.append((keyword, rest.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return result


@pytest.fixture(scope="module")
def steps() -> list[tuple[str, str]]:
    return instructions(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def pins() -> dict[str, str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    specs = [*project["dependencies"]]
    for extra in project["optional-dependencies"].values():
        specs += extra
    found = {}
    for spec in specs:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==([0-9.]+)", spec.strip())
        if match:
            name = match[1].lower()
            assert found.get(name, match[2]) == match[2], f"{name} pinned twice, differently"
            found[name] = match[2]
    python = re.fullmatch(r">=(\d+\.\d+),<\d+\.\d+", project["requires-python"])
    assert python, project["requires-python"]
    return {**found, "python": python[1], "extras": ",".join(project["optional-dependencies"])}


def test_instructions_are_known_and_uppercase(steps):
    known = {"FROM", "RUN", "COPY", "ENV", "WORKDIR", "ENTRYPOINT", "SHELL", "ARG", "LABEL"}
    assert {keyword for keyword, _ in steps} <= known


def test_base_images_match_the_pins(steps, pins):
    froms = [args for keyword, args in steps if keyword == "FROM"]
    assert froms == [
        f"apache/beam_python{pins['python']}_sdk:{pins['apache-beam']} AS beam_sdk",
        f"tensorflow/tensorflow:{pins['tensorflow']}-gpu",
    ]
    assert pins["tensorflow"] == "2.21.0" and pins["apache-beam"] == "2.77.0"
    assert pins["python"] == "3.11"


def test_the_interpreter_is_checked_before_anything_is_installed(steps, pins):
    runs = [args for keyword, args in steps if keyword == "RUN"]
    major, minor = pins["python"].split(".")
    assert f"== ({major}, {minor})" in runs[0]
    assert "python3 -c" in runs[0] and "python -c" in runs[0]  # Beam's boot runs `python`


def test_fullgrad_is_installed_from_the_repo_with_the_worker_extras(steps, pins):
    copies = [args for keyword, args in steps if keyword == "COPY" and "--from" not in args]
    assert copies == ["pyproject.toml README.md ./", "fullgrad ./fullgrad"]
    (install,) = [a for k, a in steps if k == "RUN" and "pip install" in a]
    assert 'python3 -m pip install ".[beam,gcp,aws,kfp]"' in install
    assert {"beam", "gcp", "aws", "kfp"} <= set(pins["extras"].split(","))
    assert "pip check" in install
    # The smoke import asserts the very versions pyproject pins.
    assert f"apache_beam.__version__ == '{pins['apache-beam']}'" in install
    assert f"tf.__version__ == '{pins['tensorflow']}'" in install


def test_beam_boot_is_the_entrypoint(steps):
    copy_boot = ("COPY", "--from=beam_sdk /opt/apache/beam /opt/apache/beam")
    assert copy_boot in steps
    assert steps.index(copy_boot) > max(i for i, (k, _) in enumerate(steps) if k == "FROM")
    entrypoints = [args for keyword, args in steps if keyword == "ENTRYPOINT"]
    assert entrypoints == ['["/opt/apache/beam/boot"]']
    assert json.loads(entrypoints[0]) == ["/opt/apache/beam/boot"]  # exec form
    assert steps[-1][0] == "ENTRYPOINT"
    envs = " ".join(args for keyword, args in steps if keyword == "ENV")
    # Installed globally, so the workers must not start in a fresh venv without them.
    assert "RUN_PYTHON_SDK_IN_DEFAULT_ENVIRONMENT=1" in envs


def test_lint_rules(steps):
    """The hadolint rules that apply to this file, as hadolint is not installable here."""
    froms = [args for keyword, args in steps if keyword == "FROM"]
    for image in froms:
        tag = image.split()[0].rpartition(":")[2]
        assert tag and tag != "latest" and "/" not in tag, (
            f"unpinned base image {image}"
        )  # DL3006/7
    runs = [args for keyword, args in steps if keyword == "RUN"]
    for run in runs:
        assert not re.search(r"(^|&&|;)\s*cd\s", run), "use WORKDIR, not cd (DL3003)"
        assert "sudo " not in run, "no sudo (DL3004)"
        assert "apt-get upgrade" not in run and "apt-get dist-upgrade" not in run  # DL3005
    envs = " ".join(args for keyword, args in steps if keyword == "ENV")
    assert "PIP_NO_CACHE_DIR=1" in envs, "pip must not keep its cache in the image (DL3042)"
    assert not any(keyword == "ADD" for keyword, _ in steps), "COPY, not ADD (DL3020)"
    shell = [args for keyword, args in steps if keyword == "SHELL"]
    assert shell and "pipefail" in shell[0] and json.loads(shell[0])  # DL4006
    workdirs = [args for keyword, args in steps if keyword == "WORKDIR"]
    assert all(w.startswith("/") for w in workdirs), "WORKDIR must be absolute (DL3000)"


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: the last matching pattern wins, ``!`` re-includes."""
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        regex = fnmatch.translate(pattern).replace(".*", "[^/]*").replace("[^/]*[^/]*", ".*")
        if pattern == "**" or re.match(regex, path) or path.startswith(pattern + "/"):
            ignored = not negate
    return ignored


def test_dockerignore_lets_in_exactly_what_is_copied(steps):
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    sources = []
    for keyword, args in steps:
        if keyword == "COPY" and "--from" not in args:
            sources += args.split()[:-1]
    for source in sources:
        assert (REPO / source).exists(), f"COPY source {source} missing from the repo"
        assert not _ignored(source, patterns), f".dockerignore excludes {source}"
        if (REPO / source).is_dir():
            inner = next((REPO / source).glob("*.py")).relative_to(REPO).as_posix()
            assert not _ignored(inner, patterns), f".dockerignore excludes {inner}"
    for kept_out in (".venv/bin/python", "tests/kfp/conftest.py", ".git/HEAD", "demo-output/x"):
        assert _ignored(kept_out, patterns), f"{kept_out} would be sent to the build"
    assert _ignored("fullgrad/__pycache__/cli.cpython-311.pyc", patterns)

"""Demo runs shared by the demo tests: ``fullgrad demo`` itself, through the CLI, at 32 px.

The default demo (64 px, 2400 training images, 5 epochs) takes minutes on 2 CPU cores; the tests
run the same code path, flags and all, on a reduced size. Three runs per session: the shortcut
demo, the same command again (the numbers must come back), and the control
(``--shortcut-fraction 0``).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

SIZE = 32
TRAIN_IMAGES = 2000
EXPLAIN_IMAGES = 120
EPOCHS = 4
SEED = 0

#: ``fullgrad demo`` flags of the reduced run (the output folder is added per run).
DEMO_FLAGS = [
    "--size", str(SIZE), "--train-images", str(TRAIN_IMAGES),
    "--explain-images", str(EXPLAIN_IMAGES), "--epochs", str(EPOCHS), "--seed", str(SEED),
]  # fmt: skip


def run_demo_cli(output: str, *flags: str) -> dict:
    """Runs ``fullgrad demo --output OUTPUT FLAGS...`` in this process; returns its exit status,
    what it printed, its held-out accuracy and the files it wrote (parsed)."""
    from fullgrad.cli import main as cli_main

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        status = cli_main(["demo", "--output", output, *DEMO_FLAGS, *flags])
    text = printed.getvalue()
    accuracy = re.search(r"held-out accuracy (\d\.\d+)", text)
    files = {}
    for name in ("audit.json", "summary.json", "demo.json"):
        with open(os.path.join(output, name)) as handle:
            files[name] = json.load(handle)
    return {
        "status": status,
        "stdout": text,
        "accuracy": float(accuracy[1]) if accuracy else None,
        "output": output,
        "report": os.path.join(output, "report.html"),
        "audit": files["audit.json"],
        "summary": files["summary.json"],
        "demo": files["demo.json"],
    }


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> dict:
    return run_demo_cli(str(tmp_path_factory.mktemp("demo")))


@pytest.fixture(scope="session")
def demo_rerun(tmp_path_factory) -> dict:
    """The same command again, into another folder."""
    return run_demo_cli(str(tmp_path_factory.mktemp("demo-again")))


@pytest.fixture(scope="session")
def control_run(tmp_path_factory) -> dict:
    """The control: the same command with no mark planted anywhere."""
    return run_demo_cli(str(tmp_path_factory.mktemp("control")), "--shortcut-fraction", "0")


@pytest.fixture(scope="session")
def demo_model(demo_run):
    import fullgrad

    return fullgrad.load_model(os.path.join(demo_run["output"], "model.keras"))


@pytest.fixture(scope="session")
def held_out() -> tuple[np.ndarray, ...]:
    """The images the demo explained (same seed): images, masks, labels, marked."""
    from fullgrad.demo import data

    return data.make_images(EXPLAIN_IMAGES, SIZE, SEED + 1)

"""One small demo run shared by the demo tests: the real ``fullgrad demo`` path at 32 px.

The shortcut model is trained and explained once per session by ``run_demo`` (data, training,
the Beam job with the audit); the control model (no mark anywhere) is trained once too.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

SIZE = 32
TRAIN_IMAGES = 2000
EXPLAIN_IMAGES = 120
EPOCHS = 4
SEED = 0


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> dict:
    from fullgrad.demo.command import run_demo

    output = str(tmp_path_factory.mktemp("demo"))
    result = run_demo(
        output,
        size=SIZE,
        train_images=TRAIN_IMAGES,
        explain_images=EXPLAIN_IMAGES,
        epochs=EPOCHS,
        seed=SEED,
    )
    return {**result, "output": output}


@pytest.fixture(scope="session")
def demo_model(demo_run):
    import fullgrad

    return fullgrad.load_model(os.path.join(demo_run["output"], "model.keras"))


@pytest.fixture(scope="session")
def held_out() -> tuple[np.ndarray, ...]:
    """The images ``run_demo`` explained (same seed): images, masks, labels, marked."""
    from fullgrad.demo import data

    return data.make_images(EXPLAIN_IMAGES, SIZE, SEED + 1)


@pytest.fixture(scope="session")
def control() -> tuple:
    """A model trained on the same data without any mark, and its held-out set."""
    from fullgrad.demo import data
    from fullgrad.demo import model as demo_model

    images, _, labels, _ = data.make_images(TRAIN_IMAGES, SIZE, SEED, shortcut_fraction=0.0)
    model = demo_model.build_model(SIZE, len(data.CLASS_NAMES), seed=SEED)
    demo_model.train(model, images, labels, epochs=EPOCHS, seed=SEED)
    return model, data.make_images(EXPLAIN_IMAGES, SIZE, SEED + 1, shortcut_fraction=0.0)

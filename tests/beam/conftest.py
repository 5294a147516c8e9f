"""Fixtures for the Beam job's tests (helpers live in ``beamdata``)."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest
from beamdata import build_model


@pytest.fixture(scope="session")
def model_path(tmp_path_factory) -> str:
    """A tiny saved CNN (32x32 RGB, 5 classes, softmax, BatchNorm)."""
    path = str(tmp_path_factory.mktemp("model") / "tiny.keras")
    build_model().save(path)
    return path

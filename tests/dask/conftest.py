"""Fixtures for the Dask tests: one real 2-process LocalCluster shared by the whole session.

Starting a cluster costs seconds (each worker process imports Beam and TensorFlow), so the
tests share one; the killed-worker test leaves it whole again (the nanny restarts the worker).
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# The Beam job's test data helpers (beamdata) live with the Beam tests.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "beam"))

import pytest
from beamdata import build_model

from fullgrad.beam.dask import connect_client, local_cluster

WORKERS = 2


@pytest.fixture(scope="session")
def cluster():
    """A LocalCluster of 2 worker processes x 1 thread on 127.0.0.1.

    Its scheduler (in this process) keeps a transition log long enough for a whole session,
    so a test can read what happened to its tasks (Dask keeps the last 1000 by default).
    """
    import dask

    with dask.config.set({"distributed.admin.low-level-log-length": 1_000_000}), \
            local_cluster(workers=WORKERS, threads_per_worker=1) as info:
        yield info


@pytest.fixture()
def client(cluster):
    """A client of the shared cluster, with both workers up (a test may have killed one)."""
    client = connect_client(cluster.address)
    client.wait_for_workers(WORKERS, timeout=120)
    yield client
    client.close()


@pytest.fixture(scope="session")
def model_path(tmp_path_factory) -> str:
    """A tiny saved CNN (32x32 RGB, 5 classes, softmax, BatchNorm)."""
    path = str(tmp_path_factory.mktemp("model") / "tiny.keras")
    build_model().save(path)
    return path

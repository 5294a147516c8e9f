"""The FullGrad ModelHandler on its own: Beam's protocol, a real model, numpy out."""

from __future__ import annotations

import keras
import numpy as np
from apache_beam.ml.inference.base import PredictionResult
from beamdata import SIZE

import fullgrad as ke
from fullgrad import cli
from fullgrad.beam.handler import METRICS_NAMESPACE, FullGradModelHandler


def requests(count: int, targets: list[int]) -> list[dict]:
    images = np.random.default_rng(7).uniform(0, 1, [count, SIZE, SIZE, 3]).astype(np.float32)
    return [{"id": f"r{i}", "image": images[i], "target": targets[i], "extra": i}
            for i in range(count)]


def test_handler_protocol_and_options(model_path):
    handler = FullGradModelHandler(model_path, SIZE, min_batch_size=2, max_batch_size=8)
    assert handler.batch_elements_kwargs() == {"min_batch_size": 2, "max_batch_size": 8}
    assert handler.get_metrics_namespace() == METRICS_NAMESPACE == "fullgrad"
    assert not handler.share_model_across_processes()
    shared = FullGradModelHandler(model_path, SIZE, model_copies=2)
    assert shared.share_model_across_processes() and shared.model_copies() == 2
    assert FullGradModelHandler(model_path, SIZE, large_model=True).share_model_across_processes()
    batch = requests(3, [-1, -1, -1])
    assert handler.get_num_bytes(batch) == 3 * SIZE * SIZE * 3 * 4


def test_run_inference_returns_numpy_equal_to_the_engine(model_path):
    handler = FullGradModelHandler(model_path, SIZE, top_k=2)
    explainer = handler.load_model()
    assert len(explainer.engine._steps) == 1  # traced at load time, once
    batch = requests(4, [-1, 3, -1, 0])
    results = list(handler.run_inference(batch, explainer))
    assert len(explainer.engine._steps) == 1  # no new trace for another batch size
    assert all(isinstance(r, PredictionResult) for r in results)
    assert [r.example["extra"] for r in results] == [0, 1, 2, 3]  # requests ride along
    model = keras.saving.load_model(model_path, compile=False)
    images = np.stack([r["image"] for r in batch])
    engine = ke.FullGrad(model)
    top1 = engine.compute(images)
    fixed = engine.compute(images, np.array([[0], [3], [0], [0]]))
    for index, result in enumerate(results):
        inference = result.inference
        assert all(isinstance(v, np.ndarray | np.generic) for v in inference.values())
        assert inference["map"].shape == (SIZE, SIZE)
        reference = fixed if batch[index]["target"] >= 0 else top1
        np.testing.assert_allclose(inference["map"], reference.maps[index, ..., 0], atol=1e-5)
        assert int(inference["target"]) == int(reference.targets[index, 0])
        assert len(inference["topk_classes"]) == 2
        assert int(inference["topk_classes"][0]) == int(top1.targets[index, 0])


def test_a_failing_image_costs_only_itself(model_path):
    handler = FullGradModelHandler(model_path, SIZE)
    explainer = handler.load_model()
    batch = requests(3, [-1, 99, -1])  # class 99 does not exist: the batch as a whole fails
    results = list(handler.run_inference(batch, explainer))
    assert "error" in results[1].inference and "error" not in results[0].inference
    assert "error" not in results[2].inference
    alone = next(iter(handler.run_inference([batch[2]], explainer)))
    np.testing.assert_allclose(results[2].inference["map"], alone.inference["map"], atol=1e-6)


def test_the_cli_dispatches_run_and_reports_a_bad_model(tmp_path, capsys):
    status = cli.main(["run", "--input", str(tmp_path / "*.parquet"), "--model",
                       str(tmp_path / "none.keras"), "--output", str(tmp_path / "o"),
                       "--runner", "DirectRunner"])
    assert status == 2
    assert "model file not found" in capsys.readouterr().err

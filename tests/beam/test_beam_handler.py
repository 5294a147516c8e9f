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


def test_runinference_batch_failures_become_one_dead_letter_per_image():
    from fullgrad.beam.transforms import _batch_failures

    batch = requests(2, [-1, -1])
    failure = (batch, (MemoryError, "MemoryError('OOM')", ["traceback"]))
    assert list(_batch_failures(failure)) == [
        {"id": "r0", "stage": "explain", "error": "MemoryError: MemoryError('OOM')"},
        {"id": "r1", "stage": "explain", "error": "MemoryError: MemoryError('OOM')"},
    ]


def test_pixel_columns_read_as_arrays_from_tensor_and_nested_list_types():
    import pyarrow as pa

    from fullgrad.beam.io import _column_values

    pixels = np.arange(2 * 4 * 4 * 3, dtype=np.float32).reshape(2, 4, 4, 3)
    pixels[1, 0, 0, 0] = np.nan
    tensor = pa.FixedShapeTensorArray.from_numpy_ndarray(pixels)
    values = _column_values(tensor)
    np.testing.assert_array_equal(values[0], pixels[0])
    assert values[0].shape == (4, 4, 3) and np.isnan(values[1][0, 0, 0])
    nested = _column_values(pa.array([pixels[0].tolist(), None]))
    np.testing.assert_array_equal(np.asarray(nested[0], np.float32), pixels[0])
    assert nested[1] is None


def test_decode_rows_resolves_targets_and_keeps_the_contract():
    from beamdata import CLASSES, good_rows

    from fullgrad.beam.config import JobConfig
    from fullgrad.beam.transforms import DecodeRows

    row = {**good_rows(1)[0], "source": "x.parquet"}

    def decode(target):
        config = JobConfig(input="x.parquet", model="m.keras", output="o", image_size=SIZE,
                           map_size=8, preprocess="tf", target=target, num_classes=CLASSES,
                           decode_threads=0)
        fn = DecodeRows(config)
        fn.setup()
        return list(fn.process(row))

    (fixed,) = decode("3")
    assert fixed["target"] == 3 and fixed["image"].shape == (SIZE, SIZE, 3)
    assert -1.0 <= fixed["image"].min() and fixed["image"].max() <= 1.0  # the "tf" mode
    assert fixed["thumbnail"].shape == (8, 8, 3) and fixed["thumbnail"].dtype == np.uint8
    assert fixed["mask"].shape == (8, 8) and fixed["mask"].dtype == bool
    assert decode("predicted")[0]["target"] == -1
    assert decode("label")[0]["target"] == row["label"]
    (dead,) = decode(str(CLASSES))
    assert dead.tag == "dead" and dead.value["stage"] == "preprocess"


def test_decode_ahead_keeps_order_windows_and_dead_letters():
    """With decode threads, outputs trail the input by the look-ahead and keep each row's order,
    timestamp and window; the rest comes out at the end of the bundle."""
    import apache_beam as beam
    from apache_beam.transforms.window import IntervalWindow
    from apache_beam.utils.timestamp import Timestamp
    from apache_beam.utils.windowed_value import WindowedValue
    from beamdata import good_rows

    from fullgrad.beam.config import JobConfig
    from fullgrad.beam.transforms import DecodeRows

    rows = [{**row, "source": "x.parquet"} for row in good_rows(7, with_mask=False)]
    rows[3] = {**rows[3], "image": b"not an image"}
    config = JobConfig(input="x.parquet", model="m.keras", output="o", image_size=SIZE,
                       preprocess="unit", batch_size=2, decode_threads=2)
    inline = DecodeRows(JobConfig(**{**config.__dict__, "decode_threads": 0}))
    inline.setup()
    expected = [out for row in rows for out in inline.process(row)]
    ahead = DecodeRows(config)
    ahead.setup()
    ahead.start_bundle()
    windows = [IntervalWindow(i, i + 1) for i in range(len(rows))]
    outputs = []
    for index, row in enumerate(rows):
        emitted = list(ahead.process(row, Timestamp(index), windows[index]))
        assert len(emitted) == (1 if index >= 4 else 0)  # look-ahead: batch 2 + 2 threads
        outputs += emitted
    outputs += list(ahead.finish_bundle())
    ahead.teardown()
    assert len(outputs) == len(rows)
    for index, (got, want) in enumerate(zip(outputs, expected, strict=True)):
        tagged = isinstance(got, beam.pvalue.TaggedOutput)
        assert tagged == isinstance(want, beam.pvalue.TaggedOutput) == (index == 3)
        value = got.value if tagged else got
        assert isinstance(value, WindowedValue)
        assert value.timestamp == Timestamp(index) and value.windows == (windows[index],)
        if tagged:
            assert got.tag == "dead" and value.value == want.value
        else:
            assert value.value["id"] == want["id"]
            np.testing.assert_array_equal(value.value["image"], want["image"])
            np.testing.assert_array_equal(value.value["thumbnail"], want["thumbnail"])


def test_parts_come_with_the_maps_only_when_asked(model_path):
    from fullgrad.parts import PARTS

    batch = requests(3, [-1, 1, -1])
    plain = FullGradModelHandler(model_path, SIZE)
    with_parts = FullGradModelHandler(model_path, SIZE, parts=True)
    without = list(plain.run_inference(batch, plain.load_model()))
    explainer = with_parts.load_model()
    results = list(with_parts.run_inference(batch, explainer))
    assert len(explainer.engine._steps) == 1  # the parts step is the only one traced
    for a, b in zip(without, results, strict=True):
        assert "part_maps" not in a.inference
        assert b.inference["part_maps"].shape == (len(PARTS), SIZE, SIZE)
        np.testing.assert_array_equal(a.inference["map"], b.inference["map"])

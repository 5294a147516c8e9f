"""The FullGrad ModelHandler on its own: Beam's protocol, a real model, numpy out."""

from __future__ import annotations

import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from apache_beam.ml.inference.base import PredictionResult
from beamdata import SIZE

import fullgrad as ke
from fullgrad import cli
from fullgrad.beam.batches import BatchBuffers
from fullgrad.beam.handler import (
    METRICS_NAMESPACE,
    FullGradModelHandler,
    error_reason,
)


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


def test_batch_buffers_are_aligned_copies_lent_per_call_and_reused():
    pool = BatchBuffers()
    images = [np.full([3, 5, 2], value, np.float32) for value in range(4)]
    with pool.stacked(images) as first:
        assert first.ctypes.data % 64 == 0 and first.dtype == np.float32
        np.testing.assert_array_equal(first, np.stack(images))
        images[0][:] = 9  # a copy, not a view of the request's image
        assert first[0, 0, 0, 0] == 0
        with pool.stacked(images[::-1]) as concurrent:  # in flight together: another buffer
            assert not np.shares_memory(first, concurrent)
            np.testing.assert_array_equal(concurrent, np.stack(images[::-1]))
            addresses = {first.ctypes.data, concurrent.ctypes.data}
        np.testing.assert_array_equal(first, np.stack([np.zeros_like(images[0]), *images[1:]]))
    assert pool.free_buffers((3, 5, 2)) == 2  # as many as were in flight at once
    with pool.stacked(images[1:]) as again:  # a returned buffer, a shorter view
        assert again.ctypes.data in addresses
        np.testing.assert_array_equal(again, np.stack(images[1:]))
    with pool.stacked(images + images) as larger:  # outgrows them: a new one
        np.testing.assert_array_equal(larger, np.stack(images + images))
        assert larger.ctypes.data % 64 == 0
    assert pool.free_buffers((3, 5, 2)) == 1  # the outgrown ones are dropped


def test_error_reasons_drop_tensorflow_source_frames():
    @tf.function
    def check(x):
        tf.debugging.assert_greater(x, 1.0, message="too small")
        return x

    with pytest.raises(tf.errors.InvalidArgumentError) as raised:
        check(tf.constant([0.5]))
    assert 'File "' in str(raised.value)  # what TensorFlow says: the frames that built the op
    reason = error_reason(raised.value)
    assert reason.startswith("InvalidArgumentError: ") and "too small" in reason
    assert 'File "' not in reason and "(at node " in reason, reason
    assert error_reason(str(raised.value), "InvalidArgumentError") == reason  # text form alike
    assert error_reason(ValueError("bad\nshape")) == "ValueError: bad shape"


def test_consecutive_batches_of_other_sizes_equal_fresh_ones(model_path):
    handler = FullGradModelHandler(model_path, SIZE)
    explainer = handler.load_model()
    batch = requests(5, [-1] * 5)
    engine = ke.FullGrad(keras.saving.load_model(model_path, compile=False))
    expected = engine.compute(np.stack([r["image"] for r in batch])).maps[..., 0]
    for group in (batch[:4], batch[4:], batch[1:4], batch):  # the buffer is reused each time
        results = handler.run_inference(group, explainer)
        start = batch.index(group[0])
        for offset, result in enumerate(results):
            np.testing.assert_allclose(result.inference["map"], expected[start + offset], atol=1e-5)


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


@keras.saving.register_keras_serializable(package="fullgrad_tests")
class FailOnDarkImages(keras.layers.Layer):
    """Passes its input through, but the model run fails for a batch holding an almost black
    image (mean in (0, 0.01]), as a real model fails at run time (a TF op raising).

    An all-zero image passes, so the handler's load-time warm-up on a blank image works.
    """

    def call(self, x):
        import tensorflow as tf

        mean = tf.reduce_mean(x, axis=[1, 2, 3])
        check = tf.debugging.Assert(
            tf.reduce_all(tf.logical_or(mean == 0.0, mean > 0.01)), ["an almost black image"]
        )
        with tf.control_dependencies([check]):
            return tf.identity(x)


def test_a_model_failing_on_one_image_costs_only_that_image_in_the_job(tmp_path):
    from beamdata import encode, good_rows, read_output, stored_maps, write_parquet
    from PIL import Image

    from fullgrad.beam import job
    from fullgrad.beam.config import JobConfig
    from fullgrad.images import decode_image, preprocess

    keras.utils.set_random_seed(1)
    inputs = keras.Input([SIZE, SIZE, 3])
    x = FailOnDarkImages()(inputs)
    x = keras.layers.Conv2D(4, 3, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(3)(x))
    model.save(str(tmp_path / "fails.keras"))
    rows = good_rows(6, with_mask=False)
    rows[1] = {**rows[1], "id": "dark", "image": encode(Image.fromarray(
        np.ones([SIZE, SIZE, 3], np.uint8)))}  # 1/255 after "unit": mean 0.004
    (tmp_path / "in").mkdir()
    write_parquet(str(tmp_path / "in" / "a.parquet"), rows)
    summary = job.run(JobConfig(
        input=str(tmp_path / "in" / "*.parquet"), model=str(tmp_path / "fails.keras"),
        output=str(tmp_path / "out"), image_size=SIZE, preprocess="unit", batch_size=3,
        map_dtype="float32", decode_threads=0,
    ))
    assert (summary["input"], summary["explained"], summary["failed"]) == (6, 5, 1)
    assert summary["failed_by_stage"] == {"explain": 1}
    sizes = summary["metrics"]["inference_request_batch_size"]
    assert sizes["min"] == sizes["max"] == 3  # so the dark image had two batch-mates
    maps, dead = read_output(str(tmp_path / "out"))
    (letter,) = dead.to_pylist()
    assert letter["id"] == "dark" and letter["stage"] == "explain"
    assert letter["error"].startswith("InvalidArgumentError")
    assert "an almost black image" in letter["error"]
    # The reason and the failing op, without the Python frames that built the op.
    assert 'File "' not in letter["error"] and "\n" not in letter["error"]
    assert "(at node " in letter["error"] and len(letter["error"]) < 600, letter["error"]
    # Its batch-mates (batches of 3: the dark image shares one with two others) are explained,
    # with the maps the engine gives for them.
    mates = [row for row in rows if row["id"] != "dark"]
    assert maps.column("id").to_pylist() == [row["id"] for row in mates]
    images = preprocess(
        np.stack([decode_image(row["image"], (SIZE, SIZE)) for row in mates]).astype(np.float32),
        "unit",
    )
    expected = ke.FullGrad(model).compute(images)
    np.testing.assert_allclose(stored_maps(maps), expected.maps[..., 0], atol=1e-5)
    np.testing.assert_allclose(maps.column("logit").to_numpy(), expected.logits[:, 0], rtol=1e-5)


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


def test_gpu_memory_growth_is_set_for_every_gpu(model_path, monkeypatch):
    """The handler asks TF for memory growth on each GPU, both ways it can.

    No GPU exists here, so the GPU list is a stand-in (two ``PhysicalDevice`` records, TF's own
    type) and ``set_memory_growth``, which refuses devices TF does not know, is recorded instead
    of called. Everything else (Beam's env-var hook, the model load) is real.
    """
    import tensorflow as tf

    handler = FullGradModelHandler(model_path, SIZE)
    monkeypatch.delenv("TF_FORCE_GPU_ALLOW_GROWTH", raising=False)
    handler.set_environment_vars()  # what RunInference does in setup, before loading
    assert os.environ["TF_FORCE_GPU_ALLOW_GROWTH"] == "true"

    gpus = [tf.config.PhysicalDevice(f"/physical_device:GPU:{i}", "GPU") for i in range(2)]
    real_list = tf.config.list_physical_devices
    monkeypatch.setattr(tf.config, "list_physical_devices",
                        lambda kind=None: gpus if kind == "GPU" else real_list(kind))
    calls = []

    def set_memory_growth(device, enable):
        calls.append((device.name, enable))
        if device is gpus[0]:  # what TF raises once that GPU was initialised: not fatal
            raise RuntimeError("Physical devices cannot be modified after being initialized")

    monkeypatch.setattr(tf.config.experimental, "set_memory_growth", set_memory_growth)
    explainer = handler.load_model()
    assert calls == [(gpus[0].name, True), (gpus[1].name, True)]
    assert explainer.num_classes == 5  # the load went on after the refused first GPU


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


def test_an_image_file_is_read_where_it_is_decoded(tmp_path):
    """Class-folder rows carry the file; DecodeRows._decode (what the decode-ahead threads run)
    reads it, and a file that cannot be read is a dead letter at stage ``read``."""
    from beamdata import good_rows

    from fullgrad.beam.config import JobConfig
    from fullgrad.beam.io_images import ImageFile
    from fullgrad.beam.transforms import DecodeRows

    picture = tmp_path / "cat" / "001.png"
    picture.parent.mkdir()
    picture.write_bytes(good_rows(1)[0]["image"])
    config = JobConfig(input="x/*/*.png", model="m.keras", output="o", image_size=SIZE,
                       preprocess="unit", decode_threads=0, format="images")
    fn = DecodeRows(config)
    fn.setup()
    (request,) = fn.process({"id": "cat/001.png", "image": ImageFile(str(picture)),
                             "label": 0, "mask": None})
    assert request["id"] == "cat/001.png" and request["image"].shape == (SIZE, SIZE, 3)
    (dead,) = fn.process({"id": "cat/gone.png", "image": ImageFile(str(tmp_path / "gone.png")),
                          "label": 0, "mask": None})
    assert dead.tag == "dead" and dead.value["stage"] == "read"
    assert dead.value["error"].startswith(f"cannot read {tmp_path / 'gone.png'}")

"""The batched engine: same results whatever the batching or the input type, traced once."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

import fullgrad as ke


def _as(kind: str, x: np.ndarray, y: np.ndarray | None):
    if kind == "numpy":
        return x, y
    if kind == "tensor":
        return tf.constant(x), None if y is None else tf.constant(y)
    if kind == "dataset":
        if y is None:
            return tf.data.Dataset.from_tensor_slices(x).batch(3), None
        return tf.data.Dataset.from_tensor_slices((x, y)).batch(3), None
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["numpy", "tensor", "dataset"])
@pytest.mark.parametrize("with_targets", [False, True])
def test_every_input_type_gives_one_map_per_image(sequential_model, rng, kind, with_targets):
    x = rng.uniform(-1, 1, (7, 20, 20, 3)).astype(np.float32)
    y = rng.integers(0, 5, 7) if with_targets else None
    engine = ke.FullGrad(sequential_model)
    expected = engine.explain(x, y, batch_size=None)  # one step over all 7 images
    inputs, targets = _as(kind, x, y)
    maps = engine.explain(inputs, targets, batch_size=3)  # 3 + 3 + 1; datasets batch by 3
    assert maps.shape == (7, 20, 20)
    np.testing.assert_allclose(maps, expected, atol=1e-6)


def test_call_is_explain_and_one_batch_size_default(sequential_model, rng):
    import inspect

    x = rng.uniform(-1, 1, (5, 20, 20, 3)).astype(np.float32)
    y = rng.integers(0, 5, 5)
    engine = ke.FullGrad(sequential_model)
    maps = engine(x, y)
    assert maps.shape == (5, 20, 20)
    np.testing.assert_array_equal(maps, engine.explain(x, y))
    np.testing.assert_array_equal(maps, engine.compute(x, y).maps[..., 0])
    for method in (engine.explain, engine.__call__, engine.compute, engine.decompose,
                   ke.full_gradients, ke.decompose):
        default = inspect.signature(method).parameters["batch_size"].default
        assert default == ke.methods.DEFAULT_BATCH_SIZE, method


def test_decompose_batched_equals_unbatched(sequential_model, rng):
    x = rng.uniform(-1, 1, (5, 20, 20, 3)).astype(np.float32)
    engine = ke.FullGrad(sequential_model)
    whole, split = engine.decompose(x, batch_size=None), engine.decompose(x, batch_size=2)
    np.testing.assert_allclose(split.logits, whole.logits, rtol=1e-6)
    np.testing.assert_allclose(split.input, whole.input, atol=1e-6)
    for a, b in zip(split.biases, whole.biases, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(split.residual, whole.residual, atol=1e-6)
    (step,) = [s for key, s in engine._steps.items() if key[0] == "decompose"]
    assert step.experimental_get_tracing_count() == 1


def test_completeness_is_one_function(rng):
    logits = rng.normal(size=(4, 2)).astype(np.float32)
    sums = rng.normal(size=(4, 2, 5)).astype(np.float32)
    bias = rng.normal(size=(4, 2)).astype(np.float32)
    reconstruction, residual = ke.methods.completeness(logits, sums, bias)
    np.testing.assert_allclose(reconstruction.numpy(), sums.sum(-1) + bias, rtol=1e-6)
    scale = np.abs(logits) + np.abs(sums).sum(-1) + np.abs(bias)
    expected = np.abs(logits - sums.sum(-1) - bias) / scale
    np.testing.assert_allclose(residual.numpy(), expected, rtol=1e-5)
    _, exact = ke.methods.completeness(sums.sum(-1) + bias, sums, bias)
    assert exact.numpy().max() < 1e-6


def test_batched_equals_unbatched(sequential_model, rng):
    x = rng.uniform(-1, 1, (9, 20, 20, 3)).astype(np.float32)
    engine = ke.FullGrad(sequential_model)
    whole = engine.compute(x)
    one_by_one = [engine.compute(x[i : i + 1]) for i in range(9)]
    np.testing.assert_allclose(whole.maps, np.concatenate([r.maps for r in one_by_one]), atol=1e-6)
    np.testing.assert_allclose(
        whole.logits, np.concatenate([r.logits for r in one_by_one]), rtol=1e-6
    )
    np.testing.assert_array_equal(
        whole.targets, np.concatenate([r.targets for r in one_by_one])
    )
    for size in (2, 4):
        np.testing.assert_allclose(engine.compute(x, batch_size=size).maps, whole.maps, atol=1e-6)


def test_result_fields(sequential_model, rng):
    x = rng.uniform(-1, 1, (4, 20, 20, 3)).astype(np.float32)
    result = ke.FullGrad(sequential_model).compute(x)
    all_logits = ke.FullGrad(sequential_model).model(x)[0].numpy()
    np.testing.assert_allclose(result.all_logits, all_logits, rtol=1e-5)
    np.testing.assert_array_equal(result.targets[:, 0], all_logits.argmax(axis=1))
    assert result.residual.shape == (4, 1) and result.residual.max() < 1e-4
    np.testing.assert_allclose(result.residual[:, 0], ke.decompose(sequential_model, x).residual,
                               atol=1e-5)


def test_traced_once_per_input_shape(sequential_model, rng):
    engine = ke.FullGrad(sequential_model)
    for batch in (1, 3, 5, 2):
        engine.compute(rng.uniform(size=(batch, 20, 20, 3)).astype(np.float32))
    engine.compute(rng.uniform(size=(7, 20, 20, 3)).astype(np.float32), batch_size=3)
    (step,) = engine._steps.values()
    assert step.experimental_get_tracing_count() == 1


def test_full_gradients_reuses_its_engine(sequential_model, rng):
    x = rng.uniform(size=(2, 20, 20, 3)).astype(np.float32)
    ke.full_gradients(sequential_model, x)
    count = len(ke.methods.cached_engines(sequential_model))
    assert count >= 1
    ke.full_gradients(sequential_model, x)
    assert len(ke.methods.cached_engines(sequential_model)) == count


def test_engine_cache_does_not_keep_models_alive(rng):
    import gc
    import weakref

    import keras

    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(2, 3, activation="relu")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.GlobalAveragePooling2D()(x)))
    logits = ke.inspection.get_logits_layer(model)
    inters, biases = ke.inspection.layers_with_biases(model, exclude=[logits])
    exposed = ke.inspection.expose(model, inters, logits)
    ke.full_gradients(exposed, rng.uniform(size=(2, 8, 8, 3)), biases=biases)
    alive = weakref.ref(exposed)
    del exposed, model, inters, biases, logits
    gc.collect()
    assert alive() is None


def test_jit_compile_gives_the_same_maps(sequential_model, rng):
    x = rng.uniform(-1, 1, (3, 20, 20, 3)).astype(np.float32)
    plain = ke.FullGrad(sequential_model).explain(x)
    compiled = ke.FullGrad(sequential_model, jit_compile=True).explain(x)
    np.testing.assert_allclose(compiled, plain, atol=1e-4)


def test_jit_compile_padding_of_the_last_batch_changes_no_result(sequential_model, rng):
    x = rng.uniform(-1, 1, (5, 20, 20, 3)).astype(np.float32)
    y = np.array([[1], [-1], [4], [0], [2]])
    engine = ke.FullGrad(sequential_model, jit_compile=True)
    result = engine.compute(x, y, batch_size=2)  # 2 + 2 + 1, the last padded to 2
    assert result.maps.shape == (5, 20, 20, 1) and result.logits.shape == (5, 1)
    plain = ke.FullGrad(sequential_model).compute(x, y)
    np.testing.assert_array_equal(result.targets, plain.targets)
    np.testing.assert_allclose(result.logits, plain.logits, rtol=1e-5)
    np.testing.assert_allclose(result.maps, plain.maps, atol=1e-4)


def test_exposed_model_without_biases_is_a_clear_error(sequential_model):
    import keras

    outputs = [sequential_model.outputs[0], sequential_model.layers[0].output]
    hand_exposed = keras.Model(sequential_model.inputs, outputs)
    with pytest.raises(ValueError, match="biases="):
        ke.FullGrad(hand_exposed)

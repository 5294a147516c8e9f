"""Deletion / insertion faithfulness on a small model trained here, and the evaluation's parts."""

from __future__ import annotations

import pickle

import keras
import numpy as np
import pytest

import fullgrad as ke
from fullgrad import baselines, evaluation

SIZE = 24
SQUARE = 6
# Enough blur that the blurred square no longer decides the class (the default, 3 pixels here,
# leaves a faint blob that this model still reads).
BLUR = 6.0


def _squares(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Grey noise with one square: bright for class 1, dark for class 0, anywhere."""
    rng = np.random.default_rng(seed)
    images = rng.uniform(0.3, 0.7, (count, SIZE, SIZE, 1)).astype(np.float32)
    labels = rng.integers(0, 2, count)
    for image, label in zip(images, labels, strict=True):
        row, col = rng.integers(0, SIZE - SQUARE + 1, 2)
        image[row : row + SQUARE, col : col + SQUARE] = 1.0 if label else 0.0
    return images, labels


@pytest.fixture(scope="module")
def trained() -> tuple[keras.Model, np.ndarray, np.ndarray]:
    """A tiny CNN trained for a few seconds, and held-out images it classifies."""
    keras.utils.set_random_seed(11)
    model = keras.Sequential(
        [
            keras.Input((SIZE, SIZE, 1)),
            keras.layers.Conv2D(8, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
            keras.layers.GlobalMaxPooling2D(),
            keras.layers.Dense(2, activation="softmax"),
        ]
    )
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy")
    x, y = _squares(512, seed=0)
    model.fit(x, y, batch_size=32, epochs=4, verbose=0)
    test_x, test_y = _squares(16, seed=1)
    accuracy = (model.predict(test_x, verbose=0).argmax(axis=1) == test_y).mean()
    assert accuracy >= 0.9, f"the test model did not learn the squares ({accuracy:.2f})"
    return model, test_x, test_y


def _methods(model: keras.Model) -> dict:
    return {
        "fullgrad": ke.FullGrad(model).explain,
        "input_x_gradient": baselines.InputXGradient(model),
        "gradcam": baselines.GradCAM(model),
        "random": evaluation.random_maps(seed=0),
        "blurred_random": evaluation.blurred_random_maps(seed=0),
    }


def test_fullgrad_beats_random_and_random_is_near_chance(trained):
    model, x, labels = trained
    chance_seeds = range(1, 9)
    methods = _methods(model)
    methods.update({f"chance_{s}": evaluation.random_maps(seed=s) for s in chance_seeds})
    report = evaluation.evaluate(model, x, methods, classes=labels, batch_size=8, blur_sigma=BLUR)
    scores = report["methods"]
    assert report["images"] == 16 and report["fractions"] == list(evaluation.FRACTIONS)
    fullgrad, random = scores["fullgrad"], scores["random"]
    assert fullgrad["deletion_auc"] < random["deletion_auc"] - 0.1
    assert fullgrad["insertion_auc"] > random["insertion_auc"] + 0.1
    # The chance curve: the expected curve of a uniformly random pixel order, estimated by
    # averaging eight other seeds. One random draw stays near it...
    chance = {
        kind: np.mean([scores[f"chance_{s}"][f"{kind}_curve"] for s in chance_seeds], axis=0)
        for kind in ("deletion", "insertion")
    }
    for kind in ("deletion", "insertion"):
        np.testing.assert_allclose(random[f"{kind}_curve"], chance[kind], atol=0.06)
        chance_auc = evaluation.auc(chance[kind])
        assert abs(random[f"{kind}_auc"] - chance_auc) < 0.03
        assert abs(fullgrad[f"{kind}_auc"] - chance_auc) > 0.1
    # ...and is symmetric: deleting f of the pixels at random is inserting 1 - f.
    np.testing.assert_allclose(chance["deletion"], chance["insertion"][::-1], atol=0.05)
    # Unperturbed and fully blurred images score alike whatever the method.
    for name in ("fullgrad", "gradcam", "blurred_random"):
        curves = scores[name]
        assert curves["deletion_curve"][0] == pytest.approx(random["deletion_curve"][0], abs=1e-6)
        assert curves["insertion_curve"][-1] == pytest.approx(curves["deletion_curve"][0], abs=1e-6)
        assert curves["deletion_curve"][-1] == pytest.approx(curves["insertion_curve"][0], abs=1e-6)
        assert curves["insertion_curve"][0] == pytest.approx(random["insertion_curve"][0], abs=1e-6)
    # Per class: both classes, each method, counts that add up.
    assert sorted(report["classes"]) == ["0", "1"]
    per_class = [report["classes"][key]["fullgrad"]["images"] for key in ("0", "1")]
    assert sum(per_class) == 16 and min(per_class) > 0


def test_results_equal_at_batch_sizes_1_and_8(trained):
    model, x, labels = trained
    methods = _methods(model)
    one = evaluation.evaluate(
        model, x[:8], methods, classes=labels[:8], batch_size=1, blur_sigma=BLUR
    )
    eight = evaluation.evaluate(
        model, x[:8], methods, classes=labels[:8], batch_size=8, blur_sigma=BLUR
    )
    assert one.keys() == eight.keys() and one["classes"].keys() == eight["classes"].keys()
    for name in methods:
        for field in ("deletion_curve", "insertion_curve", "deletion_auc", "insertion_auc"):
            np.testing.assert_allclose(
                one["methods"][name][field], eight["methods"][name][field], atol=1e-6
            )
            for key in one["classes"]:
                np.testing.assert_allclose(
                    one["classes"][key][name][field],
                    eight["classes"][key][name][field],
                    atol=1e-6,
                )


def test_totals_merge_like_one_pass(trained):
    model, x, labels = trained
    methods = {"fullgrad": ke.FullGrad(model).explain, "random": evaluation.random_maps(3)}
    whole = evaluation.evaluate(model, x, methods, classes=labels, batch_size=16)
    first, second = evaluation.EvaluationTotals(), evaluation.EvaluationTotals()
    evaluation.evaluate(model, x[:5], methods, classes=labels[:5], totals=first)
    evaluation.evaluate(model, x[5:], methods, classes=labels[5:], totals=second)
    merged = pickle.loads(pickle.dumps(first)).merge(second).summary()
    assert merged["images"] == whole["images"] == 16
    for name in methods:
        for field in ("deletion_curve", "insertion_curve", "deletion_auc", "insertion_auc"):
            np.testing.assert_allclose(
                merged["methods"][name][field], whole["methods"][name][field], atol=1e-6
            )
    assert merged["classes"].keys() == whole["classes"].keys()


def test_one_forward_pass_per_step(trained):
    model, x, _ = trained
    curves = evaluation.PerturbationCurves(model)
    targets = curves.predicted(x[:4])
    curves(x[:4], targets, evaluation.random_maps(0)(x[:4]))
    step = curves._steps[((SIZE, SIZE, 1), "curves")]
    operations = [op.type for op in step.get_concrete_function().graph.get_operations()]
    # The model has two convolutions and one dense layer: one pass per step, the two ends
    # (the image and its blurred copy) in one.
    steps = len(evaluation.FRACTIONS) - 1
    assert operations.count("Conv2D") == 2 * steps
    assert operations.count("MatMul") == operations.count("Softmax") == steps


def test_curve_of_a_known_ranking():
    """A one-logit linear model on the image mean: every curve is known in closed form."""
    inputs = keras.Input((4, 4, 1))
    logit = keras.layers.Dense(1, activation="sigmoid")(keras.layers.Flatten()(inputs))
    model = keras.Model(inputs, logit)
    model.layers[-1].kernel.assign(np.full((16, 1), 1.0, np.float32))
    model.layers[-1].bias.assign(np.zeros(1, np.float32))
    image = np.zeros((1, 4, 4, 1), np.float32)
    image[0, 0, :2, 0] = 8.0  # two bright pixels in the corner, the rest zero
    curves = evaluation.PerturbationCurves(model, fractions=(0.0, 0.125, 1.0), blur_sigma=0.0)
    saliency = image[..., 0]
    deletion, insertion = curves(image, np.array([0]), saliency)
    # Without blur the baseline is the image itself, so every step scores sigmoid(16).
    np.testing.assert_allclose(deletion, [[1 / (1 + np.exp(-16.0))] * 3], rtol=1e-6)
    blurry = evaluation.PerturbationCurves(model, fractions=(0.0, 0.125, 1.0), blur_sigma=50.0)
    blurred = evaluation.gaussian_blur(image, blurry.sigma_for(4, 4)).numpy()
    deletion, insertion = blurry(image, np.array([0]), saliency)
    # At 1/8 of the pixels the two bright ones are swapped: both curves cross at the blur.
    after = image.copy()
    after[0, 0, :2] = blurred[0, 0, :2]
    expected = 1 / (1 + np.exp(-after.sum()))
    assert deletion[0, 1] == pytest.approx(expected, rel=1e-5)
    assert deletion[0, 2] == pytest.approx(1 / (1 + np.exp(-blurred.sum())), rel=1e-5)
    assert insertion[0, 0] == pytest.approx(deletion[0, 2], rel=1e-6)


def test_gaussian_blur_is_normalised_and_separable():
    flat = np.full((1, 9, 9, 2), 0.25, np.float32)
    np.testing.assert_allclose(evaluation.gaussian_blur(flat, 2.0).numpy(), flat, atol=1e-6)
    delta = np.zeros((1, 15, 15, 1), np.float32)
    delta[0, 7, 7] = 1.0
    blurred = evaluation.gaussian_blur(delta, 1.5).numpy()[0, :, :, 0]
    offsets = np.arange(-5, 6)
    kernel = np.exp(-0.5 * (offsets / 1.5) ** 2)
    kernel /= kernel.sum()
    expected = np.zeros((15, 15))
    expected[2:13, 2:13] = np.outer(kernel, kernel)
    np.testing.assert_allclose(blurred, expected, atol=1e-6)


def test_random_maps_are_seeded_by_content_and_blurred_random_is_smooth(rng):
    images = rng.uniform(size=(3, 16, 16, 3)).astype(np.float32)
    noise = evaluation.random_maps(seed=0)
    maps = noise(images, None)
    np.testing.assert_array_equal(noise(images[1:2], None)[0], maps[1])
    assert not np.allclose(maps[0], maps[1])
    assert not np.allclose(evaluation.random_maps(seed=1)(images, None), maps)
    smooth = evaluation.blurred_random_maps(seed=0)(images, None)
    assert smooth.shape == maps.shape and smooth.min() == 0.0 and smooth.max() == 1.0

    def roughness(array: np.ndarray) -> float:
        return float(np.abs(np.diff(array, axis=1)).mean() / (array.std() + 1e-12))

    assert roughness(smooth) < 0.5 * roughness(maps)


def test_ties_are_broken_by_a_seeded_permutation():
    flat = np.zeros((2, 4, 4))
    ranks = evaluation.salience_ranks(flat, tie_break_seed=0)
    np.testing.assert_array_equal(ranks[0], ranks[1])
    assert sorted(ranks[0].ravel()) == list(range(16))
    assert not np.array_equal(ranks[0].ravel(), np.arange(16))  # not top-left first
    assert not np.array_equal(evaluation.salience_ranks(flat, tie_break_seed=1), ranks)
    ordered = np.arange(16.0).reshape(1, 4, 4)
    np.testing.assert_array_equal(
        evaluation.salience_ranks(ordered)[0].ravel(), np.arange(15, -1, -1)
    )
    with pytest.raises(ValueError, match="finite"):
        evaluation.salience_ranks(np.full((1, 2, 2), np.nan))


def test_stratified_sample_is_balanced_bounded_and_order_free():
    ids = [f"img-{i}" for i in range(40)]
    classes = ["a"] * 30 + ["b"] * 7 + ["c"] * 3
    sample = evaluation.stratified_sample(ids, classes, limit=12)
    assert len(sample) == 12 and len(set(sample)) == 12
    by_class = {c: sum(classes[ids.index(i)] == c for i in sample) for c in "abc"}
    assert by_class == {"a": 5, "b": 4, "c": 3}  # c runs out; a and b share the rest
    shuffled = np.random.default_rng(0).permutation(40)
    again = evaluation.stratified_sample(
        [ids[i] for i in shuffled], [classes[i] for i in shuffled], limit=12
    )
    assert again == sample
    assert evaluation.stratified_sample(ids, classes, limit=12, seed=1) != sample
    assert len(evaluation.stratified_sample(ids, classes, limit=100)) == 40
    # Smallest keys per class: the first "a" chosen is the "a" with the smallest key.
    first_a = min((i for i, c in zip(ids, classes) if c == "a"), key=evaluation.sample_key)
    assert sample[0] == first_a


def test_every_fullgrad_kind_beats_random_on_the_trained_model(trained):
    from fullgrad import variants

    model, x, labels = trained
    methods = variants.evaluation_methods(model, smooth_samples=4)
    report = evaluation.evaluate(model, x, methods, classes=labels, batch_size=8, blur_sigma=BLUR)
    scores = report["methods"]
    random = scores["random"]
    for kind in variants.FULLGRAD_KINDS:
        assert scores[kind]["deletion_auc"] < random["deletion_auc"] - 0.05, kind
        assert scores[kind]["insertion_auc"] > random["insertion_auc"] + 0.05, kind

"""Strategy discovery (SpRAy) on synthetic classes with and without a planted corner mark."""

import pickle

import numpy as np
import pytest

from fullgrad.audit import stats, strategies

SIZE = 32
_YY, _XX = np.mgrid[:SIZE, :SIZE]


def _blob(cy, cx, radius):
    return np.exp(-((_YY - cy) ** 2 + (_XX - cx) ** 2) / (2 * radius**2))


def _map(rng, marked):
    """A FullGrad-like map: a blob on an object anywhere in the middle, a broad floor at a
    random place, pixel noise; ``marked`` maps also look at a mark in the top-right corner."""
    saliency = _blob(*rng.uniform(8, 24, 2), 3.0)
    if marked:
        saliency = 0.4 * saliency + _blob(2, 29, 2.0)
    saliency = saliency + 0.3 * _blob(*rng.uniform(0, SIZE, 2), 12.0)
    saliency += 0.15 * rng.uniform(size=(SIZE, SIZE))
    return (saliency - saliency.min()) / (saliency.max() - saliency.min())


def _records(planted, seed=0, classes=4, per_class=100):
    """``(id, class, map, statistics)``; in class 3, every other image is marked when
    ``planted`` (its id says so: ``"3-m-17"``)."""
    rng = np.random.default_rng(seed)
    out = []
    for target in range(classes):
        for i in range(per_class):
            marked = planted and target == 3 and i % 2 == 0
            saliency = _map(rng, marked)
            image_id = f"{target}-{'m' if marked else 'c'}-{i}"
            out.append((image_id, target, saliency, stats.image_statistics(saliency)))
    return out


def _reservoirs(records, capacity=80):
    reservoirs = {}
    for image_id, target, saliency, statistics in records:
        reservoirs.setdefault(target, strategies.MapReservoir(capacity, 16)).add(
            image_id, saliency, statistics)
    return reservoirs


@pytest.fixture(scope="module")
def planted():
    return strategies.discover_strategies(_reservoirs(_records(planted=True)))


def test_the_planted_corner_strategy_is_found_and_named(planted):
    assert planted["flagged_classes"] == ["3"]
    assert len(planted["verdicts"]) == 1
    verdict = planted["verdicts"][0]
    assert verdict.startswith("cluster ") and " of class 3 (" in verdict
    assert verdict.endswith("of images): saliency in the top-right corner")
    (cluster,) = [c for c in planted["classes"]["3"]["clusters"] if c["flagged"]]
    assert 0.35 <= cluster["share"] <= 0.65  # half of the class carries the mark
    assert all("-m-" in i for i in cluster["exemplars"]) and len(cluster["exemplars"]) == 4
    assert cluster["mean_map"].shape == (16, 16)
    assert cluster["mean_map"][:3, -3:].mean() > 2 * cluster["mean_map"].mean()
    rest = [c for c in planted["classes"]["3"]["clusters"] if not c["flagged"]]
    # Its mean statistics are reported: the mark sits in the border band.
    assert cluster["statistics"]["border_energy"] > max(
        c["statistics"]["border_energy"] for c in rest)
    assert sum(c["size"] for c in planted["classes"]["3"]["clusters"]) == 80


def test_no_strategy_is_flagged_in_the_control():
    control = strategies.discover_strategies(_reservoirs(_records(planted=False)))
    assert control["verdicts"] == [] and control["flagged_classes"] == []
    assert max(c["excess"] for v in control["classes"].values() for c in v["clusters"]) < 0.25


def test_the_reservoir_is_the_bottom_k_of_the_hashes_and_merges_exactly(planted):
    records = _records(planted=True)
    whole = _reservoirs(records)
    keys = sorted((strategies.sample_key(r[0]), r[0]) for r in records if r[1] == 3)
    assert whole[3].ids == [image_id for _, image_id in keys[:80]]
    # Two workers, and five partitions in shuffled order, merged in different orders.
    order = np.random.default_rng(7).permutation(len(records))
    halves = [_reservoirs([records[i] for i in order[part::2]]) for part in range(2)]
    fifths = [_reservoirs([records[i] for i in order[part::5]]) for part in range(5)]
    for parts in (halves, fifths[::-1], fifths[2:] + fifths[:2]):
        merged = {t: strategies.MapReservoir.merged([p[t] for p in parts]) for t in range(4)}
        for target in range(4):
            assert merged[target].ids == whole[target].ids
            np.testing.assert_array_equal(merged[target].maps, whole[target].maps)
            np.testing.assert_array_equal(merged[target].statistics["border_energy"],
                                          whole[target].statistics["border_energy"])
    merged = {t: strategies.MapReservoir.merged([h[t] for h in halves[::-1]]) for t in range(4)}
    again = strategies.discover_strategies(merged)
    assert again["verdicts"] == planted["verdicts"]
    for key, entry in again["classes"].items():
        got = [(c["size"], c["exemplars"]) for c in entry["clusters"]]
        assert got == [(c["size"], c["exemplars"]) for c in planted["classes"][key]["clusters"]]
    with pytest.raises(ValueError, match="do not merge"):
        strategies.MapReservoir.merged([strategies.MapReservoir(5), strategies.MapReservoir(6)])


def test_the_reservoir_stays_bounded_and_downsamples_by_area():
    reservoir = strategies.MapReservoir(capacity=10, grid=4)
    rng = np.random.default_rng(0)
    for i in range(500):
        reservoir.add(i, rng.uniform(size=(8, 8)))
    assert len(reservoir) == 10 and len(reservoir._items) < 20
    copy = pickle.loads(pickle.dumps(reservoir))  # Beam encodes accumulators
    assert copy.ids == reservoir.ids and np.array_equal(copy.maps, reservoir.maps)
    one = strategies.MapReservoir(capacity=3, grid=2).add("a", np.arange(16.0).reshape(4, 4))
    np.testing.assert_allclose(one.maps[0], [[2.5, 4.5], [10.5, 12.5]])


def test_noise_is_one_cluster():
    maps = np.random.default_rng(0).uniform(size=(60, 16, 16))
    labels, silhouettes = strategies.cluster_maps(maps)
    assert set(labels) == {0} and max(silhouettes.values()) < 0.25
    labels, silhouettes = strategies.cluster_maps(maps[:5])  # too few to split
    assert set(labels) == {0} and silhouettes == {}


def test_two_distinct_groups_are_two_clusters_numbered_by_size():
    rng = np.random.default_rng(1)
    left, right = np.zeros((16, 16)), np.zeros((16, 16))
    left[6:10, 1:4], right[6:10, 12:15] = 1.0, 1.0
    maps = np.array([left] * 30 + [right] * 20) + 0.01 * rng.uniform(size=(50, 16, 16))
    labels, silhouettes = strategies.cluster_maps(maps)
    assert list(labels) == [0] * 30 + [1] * 20 and silhouettes[2] > 0.9


@pytest.mark.parametrize(
    ("cells", "name"),
    [
        ((slice(0, 3), slice(13, 16)), "top-right corner"),
        ((slice(13, 16), slice(0, 3)), "bottom-left corner"),
        ((slice(0, 2), slice(None)), "top band"),
        ((slice(None), slice(0, 2)), "left band"),
        ((slice(6, 10), slice(6, 10)), "centre"),
    ],
)
def test_region_names(cells, name):
    excess = np.zeros((16, 16))
    excess[cells] = 1.0
    assert strategies.region_name(excess) == name

"""Strategy discovery without masks: spectral relevance analysis (SpRAy) on a bounded sample.

SpRAy (Lapuschkin et al., "Unmasking Clever Hans predictors and assessing what machines really
learn", Nature Communications 2019) clusters a class's downsampled saliency maps: a cluster is a
*strategy* the model uses for that class, and a sizeable cluster looking somewhere the rest of the
class and the other classes do not is a candidate shortcut. It needs no object masks.

**The sample** (:class:`MapReservoir`): per class, a bottom-k sample keyed by a hash of the image
id. Every map gets the key ``h(id)`` (the first 8 bytes of BLAKE2b of ``salt + id``, read as an
unsigned integer) and the reservoir keeps the ``capacity`` maps with the smallest keys (ties
broken by id), downsampled by area averaging to ``grid x grid`` (2,000 at 16 x 16 by default:
about 2 MB per class). Because the hash is uniform, the kept ids are a uniform random sample
without replacement of the class's ids; because "the k smallest of a union" is the k smallest of
the parts' k smallest, merging reservoirs gives exactly the reservoir of all the data, whatever
the order or the split. So a Beam ``CombineFn`` can hold one per class, and the sample (and the
clusters) are the same at 1 or N workers. Ids must be unique; a repeated id is kept twice.

**Clustering** (:func:`cluster_maps`, scikit-learn). Each map becomes a feature vector: its
salient part at the audit's ``floor_quantile`` (``max(s - q, 0)``, see :mod:`fullgrad.audit.stats`,
so the broad floor of FullGrad's coarse terms does not dominate), normalised to sum 1: a
distribution of where the map looks. k-means (``n_init=10``, seeded) for every ``k`` in
``2..max_clusters``; ``k`` is the one with the highest mean silhouette coefficient
(``(b - a) / max(a, b)``, ``a`` the mean distance to the own cluster, ``b`` to the nearest other
one). When no ``k`` reaches ``min_silhouette`` (0.25: below it, Kaufman and Rousseeuw's "no
substantial structure") the class is one cluster. (SpRAy's paper uses spectral clustering with
the eigengap; k-means with the silhouette is used here because it is cheaper on thousands of maps
and its ``k`` criterion needs no affinity bandwidth.)

**The flag** (:func:`discover_strategies`). Every map's feature is a distribution on the grid;
``M_j`` is cluster ``j``'s mean feature. Its reference ``R_j`` is the pointwise maximum of

- the ``envelope_quantile`` (0.9) per-cell quantile of the other classes' sampled features, and of
  the class's features outside cluster ``j`` (where at least a tenth of those maps look), and
- the mean feature of every other cluster, of this class and of the other classes (each strategy
  found elsewhere).

The cluster's *excess* is ``sum(max(M_j - R_j, 0))``, in [0, 1]: the share of its mean saliency
that lies where no other strategy and no tenth of the other maps put as much. Both parts matter:
k-means also splits a class by where its objects happen to lie, and such a cluster is sharper than
any envelope of individual maps, but another class has a cluster of objects in the same place; a
shortcut mark has neither. A cluster holding at least ``min_share`` (0.15) of the class's sample
with an excess of at least ``excess_min`` (0.25) is flagged, and the verdict names where the
excess lies (:func:`region_name`): ``"cluster 2 of class 7 (31% of images): saliency in the top
band"``. Measured on this module's synthetic test set (tests/audit/test_strategies.py, 4 classes,
objects anywhere in the middle, 10 seeds, 80 and 200 maps per class): the planted corner cluster's
excess is about 0.5; every control cluster holding at least 15% of its class stays at or below
0.14, but clusters of 10-15% (a handful of maps, so a sharp mean) reached 0.27 and 0.32, which is
why ``min_share`` is 0.15: a shortcut used by fewer images of a class is not flagged. Limits: two
classes that share the same shortcut in the same place cover each other; a class whose objects
all lie where no other class's do is flagged (which a reviewer wants to see anyway).

Example:
    >>> reservoirs = {}
    >>> for record in records:
    ...     reservoirs.setdefault(record["target"], MapReservoir()).add(record["id"], record["map"])
    >>> result = discover_strategies(reservoirs)
    >>> result["verdicts"]
    ['cluster 2 of class 7 (31% of images): saliency in the top-right corner']
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from fullgrad.audit.stats import coarse_map, salient_part

__all__ = [
    "MapReservoir",
    "StrategyOptions",
    "cluster_maps",
    "discover_strategies",
    "region_name",
    "sample_key",
]


def sample_key(image_id: Any, salt: str = "") -> int:
    """The reservoir key of an id: the first 8 bytes of ``blake2b(salt + str(id))``, as an int.

    Example:
        >>> sample_key("img-000017") < 2**64
        True
    """
    digest = hashlib.blake2b(f"{salt}{image_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


class MapReservoir:
    """A bounded, mergeable, reproducible sample of one class's downsampled maps.

    Keeps the ``capacity`` maps whose ids have the smallest :func:`sample_key` (see the module
    docstring for why that is a uniform sample that merges exactly).

    Args:
        capacity: Maps kept.
        grid: Side of the downsampled maps.
        salt: Changes which ids are sampled (same salt, same sample).

    Example:
        >>> reservoir = MapReservoir(capacity=2000, grid=16)
        >>> reservoir.add("img-1", saliency, {"border_energy": 0.4})
        >>> merged = MapReservoir.merged([reservoir, other])
        >>> merged.maps.shape
        (2000, 16, 16)
    """

    def __init__(self, capacity: int = 2000, grid: int = 16, salt: str = ""):
        if capacity < 1 or grid < 2:
            raise ValueError(f"capacity must be >= 1 and grid >= 2, got {capacity}, {grid}")
        self.capacity, self.grid, self.salt = capacity, grid, salt
        self._items: list[tuple[int, str, np.ndarray, dict[str, float]]] = []
        self._threshold: tuple[int, str] | None = None  # the largest kept, once full

    def __len__(self) -> int:
        self._compact(self.capacity)
        return len(self._items)

    def add(
        self, image_id: Any, saliency: np.ndarray, statistics: Mapping[str, float] | None = None
    ) -> MapReservoir:
        """Offers one map; kept when its key is among the ``capacity`` smallest so far.

        Args:
            image_id: The image's id (``str(image_id)`` is hashed).
            saliency: Its ``[h, w]`` map, any size (downsampled to ``grid x grid`` here).
            statistics: Optional per-image statistics kept with it (e.g. ``image_statistics``).

        Returns:
            The reservoir (for chaining).

        Example:
            >>> MapReservoir(capacity=2).add("a", m).add("b", m).add("c", m).ids
            ['c', 'a']
        """
        rank = (sample_key(image_id, self.salt), str(image_id))
        if self._threshold is not None and rank > self._threshold:
            return self  # can never be among the k smallest: skip the downsampling too
        small = coarse_map(saliency, self.grid).astype(np.float32)
        values = {k: float(v) for k, v in (statistics or {}).items() if v is not None}
        self._items.append((*rank, small, values))
        if len(self._items) >= 2 * self.capacity:
            self._compact(self.capacity)
        return self

    def _compact(self, capacity: int) -> None:
        self._items.sort(key=lambda item: (item[0], item[1]))
        del self._items[capacity:]
        if len(self._items) == capacity:
            self._threshold = (self._items[-1][0], self._items[-1][1])

    @classmethod
    def merged(cls, reservoirs: Iterable[MapReservoir]) -> MapReservoir:
        """One reservoir holding the sample of all the parts' data (exact, order-free).

        Example:
            >>> MapReservoir.merged([a, b]).ids == MapReservoir.merged([b, a]).ids
            True
        """
        reservoirs = list(reservoirs)
        if not reservoirs:
            return cls()
        first = reservoirs[0]
        if any((r.capacity, r.grid, r.salt) != (first.capacity, first.grid, first.salt)
               for r in reservoirs):
            raise ValueError("reservoirs of different capacity, grid or salt do not merge")
        out = cls(first.capacity, first.grid, first.salt)
        for reservoir in reservoirs:
            out._items.extend(reservoir._items)
            out._compact(2 * out.capacity)  # bounded while merging many
        out._compact(out.capacity)
        return out

    @property
    def ids(self) -> list[str]:
        """The sampled ids, by key."""
        self._compact(self.capacity)
        return [item[1] for item in self._items]

    @property
    def maps(self) -> np.ndarray:
        """``[n, grid, grid]`` float32 downsampled maps, by key."""
        self._compact(self.capacity)
        if not self._items:
            return np.zeros((0, self.grid, self.grid), np.float32)
        return np.stack([item[2] for item in self._items])

    @property
    def statistics(self) -> dict[str, np.ndarray]:
        """``{statistic: [n] values}`` by key (NaN where an image lacked it)."""
        self._compact(self.capacity)
        names = sorted({name for item in self._items for name in item[3]})
        return {
            name: np.array([item[3].get(name, math.nan) for item in self._items])
            for name in names
        }


@dataclasses.dataclass(frozen=True)
class StrategyOptions:
    """How classes are clustered and when a cluster is flagged (defaults in the module doc).

    Attributes:
        max_clusters: Largest ``k`` tried (from 2).
        min_silhouette: Below this best silhouette, the class is one cluster.
        min_sample: Classes with fewer sampled maps are one cluster, never split.
        min_share: A cluster must hold this share of the class's sample to be flagged.
        excess_min: ...and put this share of its saliency where no reference does.
        envelope_quantile: Per-cell quantile of the other maps taken as "where they look".
        floor_quantile: Quantile removed from each map before clustering (the salient part).
        exemplars: Ids listed per cluster (the nearest to its centre).
        seed: k-means seed.
        threads: BLAS / OpenMP threads for k-means; 1 by default because Beam already runs one
            worker per core, and oversubscribed threads made a 2,000-map class 10x slower
            (12 s against 1.1 s per k-means fit, measured on a loaded 2-core machine). None:
            the libraries' default.

    Example:
        >>> StrategyOptions(max_clusters=4, excess_min=0.3)
    """

    max_clusters: int = 6
    min_silhouette: float = 0.25
    min_sample: int = 20
    min_share: float = 0.15
    excess_min: float = 0.25
    envelope_quantile: float = 0.9
    floor_quantile: float = 0.8
    exemplars: int = 4
    seed: int = 0
    threads: int | None = 1

    def __post_init__(self) -> None:
        if self.max_clusters < 2 or self.min_sample < 4 or self.exemplars < 0:
            raise ValueError("max_clusters must be >= 2, min_sample >= 4, exemplars >= 0")
        for name in ("min_share", "excess_min", "floor_quantile", "envelope_quantile"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")


def _features(maps: np.ndarray, floor_quantile: float) -> np.ndarray:
    """Each map's salient part, normalised to sum 1, flattened: ``[n, grid * grid]``."""
    flat = [salient_part(m, floor_quantile) for m in np.asarray(maps, np.float64)]
    return np.stack([f.ravel() / f.sum() for f in flat]) if flat else np.zeros((0, 0))


def cluster_maps(
    maps: np.ndarray, options: StrategyOptions | None = None
) -> tuple[np.ndarray, dict[int, float]]:
    """Clusters maps with k-means, ``k`` by the best silhouette (module docstring).

    Args:
        maps: ``[n, h, w]`` (downsampled) maps of one class.
        options: See :class:`StrategyOptions`.

    Returns:
        ``(labels, silhouettes)``: an int label per map, numbered by cluster size (0 the
        largest; ties by the first member's position), and the silhouette of each ``k`` tried
        (empty when the sample is too small to split).

    Example:
        >>> labels, scores = cluster_maps(reservoir.maps)
        >>> np.bincount(labels)
        array([1012,  988])
    """
    # Imported here: the rest of the audit (and its Beam combiners) must not need scikit-learn.
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score
    from threadpoolctl import threadpool_limits  # a scikit-learn dependency

    options = options or StrategyOptions()
    features = _features(maps, options.floor_quantile)
    n = len(features)
    if n < options.min_sample:
        return np.zeros(n, int), {}
    scores: dict[int, float] = {}
    fits: dict[int, np.ndarray] = {}
    for k in range(2, min(options.max_clusters, n - 1) + 1):
        model = KMeans(n_clusters=k, n_init=10, random_state=options.seed)
        with warnings.catch_warnings(), threadpool_limits(limits=options.threads):
            warnings.simplefilter("ignore")  # duplicate points: fewer distinct clusters than k
            labels = model.fit_predict(features)
        if len(np.unique(labels)) < 2:
            continue
        fits[k] = labels
        scores[k] = float(silhouette_score(features, labels))
    if not scores or max(scores.values()) < options.min_silhouette:
        return np.zeros(n, int), scores
    best = max(scores, key=lambda k: (scores[k], -k))  # the smaller k on a tie
    return _by_size(fits[best]), scores


def _by_size(labels: np.ndarray) -> np.ndarray:
    values, first, counts = np.unique(labels, return_index=True, return_counts=True)
    order = sorted(range(len(values)), key=lambda i: (-counts[i], first[i]))
    renumber = {int(values[i]): rank for rank, i in enumerate(order)}
    return np.array([renumber[int(v)] for v in labels])


_CELLS = {
    (0, 0): "top-left corner",
    (0, 1): "top band",
    (0, 2): "top-right corner",
    (1, 0): "left band",
    (1, 1): "centre",
    (1, 2): "right band",
    (2, 0): "bottom-left corner",
    (2, 1): "bottom band",
    (2, 2): "bottom-right corner",
}
_BANDS = {
    "top band": (slice(0, 1), slice(None)),
    "bottom band": (slice(2, 3), slice(None)),
    "left band": (slice(None), slice(0, 1)),
    "right band": (slice(None), slice(2, 3)),
}


def region_name(excess: np.ndarray) -> str:
    """Names where a non-negative map's mass lies, on a 3 x 3 split of the map.

    The cell holding the most mass names it when it holds at least half (a corner cell: "top-left
    corner", ...; an edge's middle cell: "top band", ...; the middle: "centre"); else the edge
    (three cells) holding the most, when it holds at least half ("top band", ...); else
    "several regions, most in the <cell>".

    Example:
        >>> m = np.zeros((16, 16)); m[:3, 12:] = 1.0
        >>> region_name(m)
        'top-right corner'
    """
    cells = coarse_map(np.clip(np.nan_to_num(excess), 0.0, None), 3)
    total = float(cells.sum())
    if total <= 0.0:
        return "nowhere"
    shares = cells / total
    best = tuple(int(i) for i in np.unravel_index(int(np.argmax(shares)), shares.shape))
    if shares[best] >= 0.5:
        return _CELLS[best]
    band = max(_BANDS, key=lambda name: shares[_BANDS[name]].sum())
    if shares[_BANDS[band]].sum() >= 0.5:
        return band
    return f"several regions, most in the {_CELLS[best]}"


def discover_strategies(
    reservoirs: Mapping[Any, MapReservoir], options: StrategyOptions | None = None
) -> dict[str, Any]:
    """Clusters every class's sample and flags clusters that look where nothing else does.

    Args:
        reservoirs: ``{class: MapReservoir}`` (merged over the whole dataset).
        options: See :class:`StrategyOptions`.

    Returns:
        ``{"classes": {"7": {"sample": n, "silhouettes": {k: score}, "clusters": [{"cluster":
        1, "size", "share", "mean_map" ([grid, grid], mean of the cluster's downsampled maps),
        "statistics" ({name: mean}), "exemplars" ([id, ...]), "excess", "region",
        "flagged"}, ...], "labels" (each sampled map's cluster, from 0, in ``reservoir.ids``
        order)}, ...}, "verdicts": ["cluster 2 of class 7 (31% of images): saliency
        in the top band", ...], "flagged_classes": ["7"]}``. Clusters are numbered from 1, the
        largest first.

    Example:
        >>> discover_strategies(reservoirs)["verdicts"]
        ['cluster 2 of class 7 (48% of images): saliency in the top-right corner']
    """
    options = options or StrategyOptions()
    parts: dict[Any, dict[str, Any]] = {}
    for target in sorted(reservoirs, key=str):
        reservoir = reservoirs[target]
        maps = reservoir.maps
        features = _features(maps, options.floor_quantile)
        labels, scores = cluster_maps(maps, options)
        parts[target] = {
            "reservoir": reservoir, "maps": maps, "features": features, "labels": labels,
            "silhouettes": scores,
        }
    classes: dict[str, Any] = {}
    verdicts: list[str] = []
    for target, part in parts.items():
        classes[str(target)] = entry = _class_entry(target, part, parts, options)
        for cluster in entry["clusters"]:
            if cluster["flagged"]:
                verdicts.append(
                    f"cluster {cluster['cluster']} of class {target} "
                    f"({cluster['share']:.0%} of images): saliency in the {cluster['region']}"
                )
    return {
        "classes": classes,
        "verdicts": verdicts,
        "flagged_classes": [k for k, v in classes.items() if any(c["flagged"] for c in
                                                               v["clusters"])],
    }


def _centres(features: np.ndarray, labels: np.ndarray) -> dict[int, np.ndarray]:
    return {int(j): features[labels == j].mean(axis=0) for j in np.unique(labels)}


def _class_entry(
    target: Any, part: Mapping[str, Any], parts: Mapping[Any, Mapping[str, Any]],
    options: StrategyOptions,
) -> dict[str, Any]:
    features, labels, maps = part["features"], part["labels"], part["maps"]
    ids = part["reservoir"].ids
    statistics = part["reservoir"].statistics
    n = len(features)
    entry: dict[str, Any] = {"sample": n, "silhouettes": part["silhouettes"], "clusters": [],
                             "labels": labels}
    if n == 0:
        return entry
    q = options.envelope_quantile
    others = [p for t, p in parts.items()
              if t != target and len(p["features"]) and p["features"].shape[1:] == features.shape[1:]]
    # Where the other classes look: the envelope of their maps, and each of their strategies.
    outside = np.zeros(features.shape[1])
    for other in others:
        outside = np.maximum(outside, np.quantile(other["features"], q, axis=0))
        for centre in _centres(other["features"], other["labels"]).values():
            outside = np.maximum(outside, centre)
    centres = _centres(features, labels)
    grid = maps.shape[1:]
    for j, centre in centres.items():
        members = np.flatnonzero(labels == j)
        rest = features[labels != j]
        reference = outside
        if len(rest):
            reference = np.maximum(reference, np.quantile(rest, q, axis=0))
            for i, other_centre in centres.items():
                if i != j:
                    reference = np.maximum(reference, other_centre)
        excess_map = np.maximum(centre - reference, 0.0)
        excess = float(excess_map.sum())
        share = len(members) / n
        distances = np.linalg.norm(features[members] - centre, axis=1)
        nearest = members[np.argsort(distances, kind="stable")[: options.exemplars]]
        entry["clusters"].append({
            "cluster": int(j) + 1,
            "size": len(members),
            "share": share,
            "mean_map": maps[members].mean(axis=0),
            "statistics": {
                name: float(np.nanmean(values[members])) if np.isfinite(values[members]).any()
                else math.nan
                for name, values in statistics.items()
            },
            "exemplars": [ids[i] for i in nearest],
            "excess": excess,
            "region": region_name(excess_map.reshape(grid)),
            "flagged": share >= options.min_share and excess >= options.excess_min,
        })
    return entry

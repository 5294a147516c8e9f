"""The parts of a FullGrad map: the input term and the bias terms grouped by resolution.

FullGrad's map is a sum of post-processed terms, one for the input gradient and one per bias
layer. The audit reads the parts separately (a shortcut can live in one part and be washed out
of the sum by the others), so the parts must be a FIXED list whatever the model: the bias terms
are grouped by their spatial side relative to the input's side ``r = min(h / H, w / W)``:

- ``input``: the input term ``x * grad_x``;
- ``bias_fine``: bias terms with ``r >= 1/4`` (the input resolution down to a quarter of it);
- ``bias_mid``: ``1/8 <= r < 1/4``;
- ``bias_coarse``: ``r < 1/8``.

Dense (non-spatial) bias terms are in no part, as they are in no map. A group without any
layer (a shallow model has no coarse layers) gives an all-zero part map.

Example:
    >>> part_of_resolution((28, 28), (224, 224))
    'bias_mid'
"""

from __future__ import annotations

__all__ = ["PARTS", "PART_LABELS", "part_of_resolution"]

#: The parts of a map, in storage order (the ``P`` axis of ``FullGradResult.parts``).
PARTS = ("input", "bias_fine", "bias_mid", "bias_coarse")

#: How a reader names each part (the audit's verdicts and the report).
PART_LABELS = {
    "input": "input term",
    "bias_fine": "fine bias terms",
    "bias_mid": "mid bias terms",
    "bias_coarse": "coarse bias terms",
}

#: Lower bounds of ``r`` for the bias groups, finest first.
_BOUNDS = (("bias_fine", 1.0 / 4.0), ("bias_mid", 1.0 / 8.0))


def part_of_resolution(size: tuple[int, int], input_size: tuple[int, int]) -> str:
    """The bias group of a term of spatial ``size`` for an input of ``input_size``.

    Args:
        size: The term's ``(h, w)``.
        input_size: The input's ``(H, W)``.

    Returns:
        One of ``bias_fine``, ``bias_mid``, ``bias_coarse``.

    Example:
        >>> part_of_resolution((56, 56), (224, 224)), part_of_resolution((7, 7), (224, 224))
        ('bias_fine', 'bias_coarse')
    """
    ratio = min(size[0] / input_size[0], size[1] / input_size[1])
    for name, bound in _BOUNDS:
        if ratio >= bound:
            return name
    return "bias_coarse"

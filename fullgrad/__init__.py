"""fullgrad: FullGrad saliency maps at dataset scale.

The method follows keras-explainable's API (``inspection``, ``full_gradients``,
``utils.visualize``), for TensorFlow 2.21 / Keras 3; the Beam job, the audit and the Kubeflow
components build on it.

Example:
    >>> import fullgrad as ke
    >>> logits = ke.inspection.get_logits_layer(model)
    >>> inters, biases = ke.inspection.layers_with_biases(model, exclude=[logits])
    >>> model = ke.inspection.expose(model, inters, logits)
    >>> logits, maps = ke.full_gradients(model, x, y, biases=biases)
"""

from fullgrad import inspection, methods, utils
from fullgrad.methods import Decomposition, FullGrad, FullGradResult, decompose, full_gradients
from fullgrad.models import load_model
from fullgrad.targets import TARGET_PREDICTED
from fullgrad.utils import visualize

__version__ = "0.1.0"

__all__ = [
    "TARGET_PREDICTED",
    "Decomposition",
    "FullGrad",
    "FullGradResult",
    "decompose",
    "full_gradients",
    "inspection",
    "load_model",
    "methods",
    "utils",
    "visualize",
]

"""Load the classifier to explain: a saved Keras file, or a keras.applications architecture.

Keras' ``safe_mode`` stays on unless the caller opts out, for every format, so a file that would
run arbitrary Python (a ``Lambda`` layer's bytecode) is refused. Remote URIs (``gs://``,
``s3://``) are copied to a local temporary file through Beam's filesystems when Beam is
installed. Legacy Keras 2 HDF5 files (``.h5``, ``.hdf5``) load too, including the configuration
keys Keras 2 wrote for ``SeparableConv2D`` and ``DepthwiseConv2D`` that Keras 3 refuses. A
TensorFlow SavedModel directory is refused with a message that says how to convert it.

Example:
    >>> model = fullgrad.load_model("gs://bucket/model.keras")
    >>> model = fullgrad.load_model("ResNet50", weights="/models/resnet50.weights.h5")
"""

from __future__ import annotations

import os
import shutil
import tempfile

import keras

__all__ = ["UNSAFE_ARGUMENT", "ModelLoadError", "load_model", "local_copy"]

_SUFFIXES = (".keras", ".h5", ".hdf5")


#: The Python argument that lets ``load_model`` run a file's code, as the error names it.
UNSAFE_ARGUMENT = "safe_mode=False"


class ModelLoadError(ValueError):
    """The model could not be loaded; the message names the path and the reason.

    Attributes:
        unsafe_argument: When Keras' ``safe_mode`` refused the file, the text in the message
            that names the way around it (``UNSAFE_ARGUMENT``), so that a command-line caller
            can say its own flag instead:
            ``str(error).replace(error.unsafe_argument, "--unsafe-model")``; None otherwise.
    """

    def __init__(self, message: str, *, unsafe_argument: str | None = None) -> None:
        super().__init__(message)
        self.unsafe_argument = unsafe_argument


#: Keys Keras 2 wrote into these layers' configurations (inherited from its Conv base class)
#: that Keras 3 rejects. ``groups`` is dropped only when it is 1, the only value Keras 3 has for
#: these layers (a grouped one then still fails, loudly); a ``None`` value means: always drop.
_SEPARABLE_EXTRA = {
    "groups": 1,
    "kernel_initializer": None,
    "kernel_regularizer": None,
    "kernel_constraint": None,
}
_KERAS2_EXTRA_KEYS = {
    "SeparableConv1D": _SEPARABLE_EXTRA,
    "SeparableConv2D": _SEPARABLE_EXTRA,
    "DepthwiseConv1D": {"groups": 1},
    "DepthwiseConv2D": {"groups": 1},
}


def _keras2_compatible(class_name: str) -> type:
    """A loader for ``class_name`` that drops the Keras 2 keys, returning the Keras 3 layer."""
    base = getattr(keras.layers, class_name)
    extra = _KERAS2_EXTRA_KEYS[class_name]

    class Compatible(base):
        @classmethod
        def from_config(cls, config):
            config = dict(config)
            for key, implied in extra.items():
                # kernel_* describe the one kernel Keras 2's base class had: meaningless for
                # separable layers, whose depthwise_*/pointwise_* keys carry the settings.
                if key in config and (implied is None or config[key] == implied):
                    del config[key]
            return base.from_config(config)

    Compatible.__name__ = class_name
    return Compatible


def _legacy_custom_objects() -> dict[str, type]:
    return {name: _keras2_compatible(name) for name in _KERAS2_EXTRA_KEYS}


def _is_saved_model(path: str) -> bool:
    if _is_remote(path):
        try:
            from apache_beam.io.filesystems import FileSystems
        except ImportError:
            return False
        return FileSystems.exists(path.rstrip("/") + "/saved_model.pb")
    path = path.removeprefix("file://")
    return os.path.isdir(path) and os.path.exists(os.path.join(path, "saved_model.pb"))


def _saved_model_error(spec: str) -> ModelLoadError:
    return ModelLoadError(
        f"{spec} is a TensorFlow SavedModel directory; Keras 3 can only call it as a black box "
        "(keras.layers.TFSMLayer), not expose the layers FullGrad needs. Convert it where it "
        "was made: load it with Keras 2 (TensorFlow <= 2.15, or pip install tf_keras and set "
        "TF_USE_LEGACY_KERAS=1) as model = tf.keras.models.load_model(PATH), then "
        "model.save('model.h5'), and pass the .h5 file"
    )


def _is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def local_copy(path: str) -> str:
    """Returns a local path for ``path``, copying remote URIs through Beam's filesystems.

    Args:
        path: A local path or a URI Beam understands (``gs://``, ``s3://``).

    Returns:
        ``path`` itself when local, else a temporary file with the same suffix.

    Raises:
        FileNotFoundError: Nothing at ``path``.
    """
    if not _is_remote(path):
        path = path.removeprefix("file://")
        if not os.path.exists(path):
            raise FileNotFoundError(f"model file not found: {path}")
        return path
    from apache_beam.io.filesystems import FileSystems

    if not FileSystems.exists(path):
        raise FileNotFoundError(f"model file not found: {path}")
    handle, local = tempfile.mkstemp(suffix=os.path.splitext(path)[1])
    with FileSystems.open(path) as source, os.fdopen(handle, "wb") as target:
        shutil.copyfileobj(source, target)
    return local


def _application(name: str):
    for candidate in (name, name.replace("_", "")):
        for attribute in dir(keras.applications):
            if attribute.lower() == candidate.lower() and callable(
                getattr(keras.applications, attribute)
            ):
                return getattr(keras.applications, attribute)
    return None


def load_model(
    spec: str,
    *,
    weights: str | None = None,
    safe_mode: bool = True,
    input_shape: tuple[int, int, int] | None = None,
    classes: int = 1000,
) -> keras.Model:
    """Loads a Keras classifier from a file or builds a ``keras.applications`` model.

    Args:
        spec: A ``.keras`` / ``.h5`` / ``.hdf5`` path or URI (Keras 3, or legacy Keras 2
            HDF5), or a ``keras.applications`` name such as ``"ResNet50"``
            (case-insensitive).
        weights: For an application: a weights file, ``"imagenet"`` (downloaded by Keras),
            or None for random weights.
        safe_mode: Keras' guard against files that execute code; keep it on unless you trust
            the file.
        input_shape: For an application: ``(H, W, C)``.
        classes: For an application without ImageNet weights: the number of classes.

    Returns:
        The model, uncompiled, with its softmax kept: ``expose`` explains the logits.

    Raises:
        FileNotFoundError: The file does not exist.
        ModelLoadError: The file is corrupt, unsafe (``error.unsafe_argument`` is then set),
            of an unknown kind, a TF SavedModel directory, or the weights could not be fetched;
            the message names the path.

    Example:
        >>> model = load_model("model.keras")
    """
    if _is_saved_model(spec):
        raise _saved_model_error(spec)
    if spec.lower().endswith(_SUFFIXES):
        local = local_copy(spec)
        legacy = not spec.lower().endswith(".keras")
        try:
            return keras.saving.load_model(
                local,
                custom_objects=_legacy_custom_objects() if legacy else None,
                compile=False,
                safe_mode=safe_mode,
            )
        except Exception as error:  # Keras raises many types for bad files
            reason = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
            if "safe_mode" in str(error) or "lambda" in str(error).lower():
                # Keras' own text names its Python switches too; the chained error keeps it.
                reason = (
                    "the file contains code (e.g. a Lambda layer's Python function) that "
                    f"Keras' safe_mode refuses to load; pass {UNSAFE_ARGUMENT} only if you "
                    "trust it"
                )
                raise ModelLoadError(
                    f"could not load Keras model {spec}: {reason}", unsafe_argument=UNSAFE_ARGUMENT
                ) from error
            raise ModelLoadError(f"could not load Keras model {spec}: {reason}") from error
        finally:
            if local != spec.removeprefix("file://"):
                os.unlink(local)
    builder = _application(spec)
    if builder is None:
        raise ModelLoadError(
            f"{spec!r} is neither a .keras/.h5 file nor a keras.applications model name"
        )
    kwargs = {"input_shape": input_shape} if input_shape else {}
    if weights in (None, "imagenet"):
        try:
            return builder(weights=weights, classes=1000 if weights else classes, **kwargs)
        except Exception as error:
            if weights == "imagenet":
                raise ModelLoadError(
                    f"could not download the imagenet weights of {spec} (is this machine "
                    f"offline? pass weights=PATH to a local file): {error}"
                ) from error
            raise
    local = local_copy(weights)
    try:
        model = builder(weights=None, classes=classes, **kwargs)
        model.load_weights(local)
        return model
    except Exception as error:
        raise ModelLoadError(f"could not load weights {weights} into {spec}: {error}") from error
    finally:
        if local != weights.removeprefix("file://"):
            os.unlink(local)

"""Load the classifier to explain: a saved Keras file, or a keras.applications architecture.

Keras' ``safe_mode`` stays on unless the caller opts out, so a file that would run arbitrary
Python (a ``Lambda`` layer's bytecode) is refused. Remote URIs (``gs://``, ``s3://``) are copied
to a local temporary file through Beam's filesystems when Beam is installed.

Example:
    >>> model = fullgrad.load_model("gs://bucket/model.keras")
    >>> model = fullgrad.load_model("ResNet50", weights="/models/resnet50.weights.h5")
"""

from __future__ import annotations

import os
import shutil
import tempfile

import keras

__all__ = ["ModelLoadError", "load_model", "local_copy"]

_SUFFIXES = (".keras", ".h5", ".hdf5")


class ModelLoadError(ValueError):
    """The model could not be loaded; the message names the path and the reason."""


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
        spec: A ``.keras`` / ``.h5`` path or URI, or a ``keras.applications`` name such as
            ``"ResNet50"`` (case-insensitive).
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
        ModelLoadError: The file is corrupt, unsafe, of an unknown kind, or the weights could
            not be fetched; the message names the path.

    Example:
        >>> model = load_model("model.keras")
    """
    if spec.lower().endswith(_SUFFIXES):
        local = local_copy(spec)
        try:
            return keras.saving.load_model(local, compile=False, safe_mode=safe_mode)
        except Exception as error:  # Keras raises many types for bad files
            reason = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
            if "safe_mode" in str(error) or "lambda" in str(error).lower():
                reason = (
                    "the file contains code (e.g. a Lambda layer) that Keras' safe_mode refuses "
                    f"to load; pass safe_mode=False only if you trust it ({reason})"
                )
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

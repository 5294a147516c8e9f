"""The Kubeflow components: ``explain`` (the Beam job) and ``audit`` (the report).

Both are lightweight Python components whose base image is the project's container
(``containers/Dockerfile``), which already holds ``fullgrad`` and its pinned dependencies, kfp
included. So nothing is pip-installed when a task starts (``install_kfp_package=False``) and a
component body is a single call into :mod:`fullgrad.kfp.tasks`: the code that runs in the pod is
the library's, not a copy pasted into the YAML.

The image is chosen when the components are built: :func:`build_components` takes it, and the
module-level ``explain_op`` / ``audit_op`` use :func:`default_image` (``$FULLGRAD_IMAGE``, else
``fullgrad:<version>``).

Example:
    >>> from fullgrad.kfp.components import build_components
    >>> ops = build_components("us-docker.pkg.dev/my-project/ml/fullgrad:0.1.0")
    >>> sorted(ops)
    ['audit', 'explain']
"""

# No ``from __future__ import annotations``: kfp reads the artifact annotations as objects.
import os

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Markdown, Metrics, Model, Output

from fullgrad import __version__

__all__ = [
    "DEFAULT_IMAGE",
    "IMAGE_ENV",
    "audit",
    "audit_op",
    "build_components",
    "default_image",
    "explain",
    "explain_op",
]

#: Environment variable read at build/compile time for the components' base image.
IMAGE_ENV = "FULLGRAD_IMAGE"
#: The image name used when ``$FULLGRAD_IMAGE`` is unset: what ``containers/Dockerfile`` builds
#: under its local tag. Push it to a registry and compile with ``--image`` for a real cluster.
DEFAULT_IMAGE = f"fullgrad:{__version__}"


def default_image() -> str:
    """Returns the components' base image: ``$FULLGRAD_IMAGE`` if set, else :data:`DEFAULT_IMAGE`.

    Example:
        >>> default_image()
        'fullgrad:0.1.0'
    """
    return os.environ.get(IMAGE_ENV) or DEFAULT_IMAGE


def explain(
    images: Input[Dataset],
    model: Input[Model],
    maps: Output[Dataset],
    dead_letters: Output[Dataset],
    counts: Output[Metrics],
    image_size: int = 224,
    preprocess: str = "none",
    target: str = "predicted",
    batch_size: int = 32,
    input_format: str = "",
    runner: str = "local",
    project: str = "",
    region: str = "",
    temp_location: str = "",
    worker_accelerator: str = "",
    worker_accelerator_count: int = 1,
    machine_type: str = "",
    sdk_container_image: str = "",
    extra_args: list[str] = [],  # noqa: B006 - kfp needs a literal default; never mutated
):
    """Explains every image of a dataset with FullGrad (the ``fullgrad run`` Beam job).

    Args:
        images: Parquet or TFRecord files (a file or a folder of them).
        model: A ``.keras`` / ``.h5`` classifier (a file, or a folder holding one).
        maps: Written: the maps Parquet (one row per explained image) and ``summary.json``.
        dead_letters: Written: one row per input that failed, with its stage and error.
        counts: Logged: ``input``, ``explained``, ``failed``, throughput and wall time.
        image_size: Side the images are resized to (the model's input size).
        preprocess: ``none``, ``unit``, ``tf``, ``caffe`` or ``torch``.
        target: ``predicted`` (top-1), ``label``, or a class index.
        batch_size: Images per FullGrad batch.
        input_format: ``parquet`` or ``tfrecord``; empty: from the files' extensions.
        runner: ``local`` runs the job's pinned local runner inside this pod (the task's GPU);
            any other value is a Beam runner name, e.g. ``DataflowRunner``, whose workers read
            the artifacts' URIs.
        project: Dataflow: the Google Cloud project.
        region: Dataflow: the region.
        temp_location: Dataflow: a ``gs://`` folder for temporary files.
        worker_accelerator: Dataflow: GPU type on the workers, e.g. ``nvidia-tesla-t4``.
        worker_accelerator_count: Dataflow: GPUs per worker.
        machine_type: Dataflow: worker machine type, e.g. ``n1-standard-8``.
        sdk_container_image: Dataflow: the workers' image (this project's image).
        extra_args: More ``fullgrad run`` flags or Beam pipeline options, one per item.
    """
    from fullgrad.kfp.tasks import run_explain

    run_explain(
        images=images,
        model=model,
        maps=maps,
        dead_letters=dead_letters,
        counts=counts,
        image_size=image_size,
        preprocess=preprocess,
        target=target,
        batch_size=batch_size,
        input_format=input_format,
        runner=runner,
        project=project,
        region=region,
        temp_location=temp_location,
        worker_accelerator=worker_accelerator,
        worker_accelerator_count=worker_accelerator_count,
        machine_type=machine_type,
        sdk_container_image=sdk_container_image,
        extra_args=extra_args,
    )


def audit(
    maps: Input[Dataset],
    report: Output[HTML],
    summary: Output[Markdown],
    metrics: Output[Metrics],
    extra_args: list[str] = [],  # noqa: B006 - kfp needs a literal default; never mutated
):
    """Audits the maps written by ``explain``: per-class evidence of where the model looks.

    If ``explain`` ran with ``--audit`` (the audit computed in the Beam pass, e.g. on Dataflow)
    and ``extra_args`` is empty, that audit is filed as it is instead of re-reading the maps.

    Args:
        maps: The ``explain`` task's maps.
        report: Written: the self-contained HTML report (pictures included).
        summary: Written: a Markdown table per class and the flagged classes.
        metrics: Logged: ``mask_energy_class_<k>`` per class (when the data has masks),
            ``border_energy_class_<k>``, ``flagged_classes`` (how many) and ``flagged_images``.
        extra_args: More ``fullgrad audit`` flags (thresholds), one per item.
    """
    from fullgrad.kfp.tasks import run_audit

    run_audit(maps=maps, report=report, summary=summary, metrics=metrics, extra_args=extra_args)


def build_components(image: str | None = None) -> dict[str, dsl.base_component.BaseComponent]:
    """Builds the components on ``image``.

    Args:
        image: The base image; None: :func:`default_image`.

    Returns:
        ``{"explain": ..., "audit": ...}``, kfp components ready for a pipeline or to compile.

    Example:
        >>> ops = build_components("fullgrad:dev")
        >>> ops["explain"].component_spec.implementation.container.image
        'fullgrad:dev'
    """
    image = image or default_image()
    return {
        func.__name__: dsl.component(func, base_image=image, install_kfp_package=False)
        for func in (explain, audit)
    }


_DEFAULT = build_components()
#: The components on :func:`default_image`, for use in users' own pipelines.
explain_op = _DEFAULT["explain"]
audit_op = _DEFAULT["audit"]

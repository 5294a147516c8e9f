"""The Kubeflow pipeline: import the dataset and the model, explain, audit.

The dataset and the model enter as URIs (pipeline parameters), turned into ``Dataset`` /
``Model`` artifacts by ``dsl.importer``. That keeps the pipeline self-contained for a schedule
(``fullgrad schedule --param dataset_uri=gs://...``) while the components keep typed artifact
inputs, so a training pipeline can also wire its own ``Model`` output straight into
``explain``.

The explain task asks for a GPU through ``set_accelerator_type`` / ``set_accelerator_limit``.
Those are compile-time settings, so :func:`build_pipeline` takes them; ``accelerator_limit=0``
builds the same pipeline without any accelerator request (for ``kfp.local``, CPU clusters, or
``runner=DataflowRunner`` where the GPUs sit on the Dataflow workers, not in the pod).

Example:
    >>> from kfp import compiler
    >>> from fullgrad.kfp.pipeline import build_pipeline
    >>> compiler.Compiler().compile(build_pipeline(), "fullgrad-explain-audit.yaml")
"""

from kfp import dsl
from kfp.dsl import Dataset, Model

from fullgrad.kfp.components import build_components, default_image

__all__ = [
    "DEFAULT_ACCELERATOR_LIMIT",
    "DEFAULT_ACCELERATOR_TYPE",
    "PIPELINE_NAME",
    "build_pipeline",
]

#: The pipeline's name in the KFP UI (and the name ``fullgrad schedule`` uploads it under).
PIPELINE_NAME = "fullgrad-explain-audit"
#: Kubernetes' extended resource for NVIDIA GPUs (the NVIDIA device plugin's name).
DEFAULT_ACCELERATOR_TYPE = "nvidia.com/gpu"
DEFAULT_ACCELERATOR_LIMIT = 1


def build_pipeline(
    image: str | None = None,
    accelerator_type: str = DEFAULT_ACCELERATOR_TYPE,
    accelerator_limit: int = DEFAULT_ACCELERATOR_LIMIT,
    name: str = PIPELINE_NAME,
):
    """Builds the explain + audit pipeline.

    Args:
        image: The components' base image; None: ``default_image()``. Also the default of the
            ``sdk_container_image`` parameter, so Dataflow workers run the same image.
        accelerator_type: The explain task's accelerator, e.g. ``nvidia.com/gpu``.
        accelerator_limit: GPUs for the explain task; 0 requests none.
        name: The pipeline's name.

    Returns:
        A kfp pipeline (a ``GraphComponent``) to compile, run with ``kfp.local``, or submit.

    Example:
        >>> pipeline = build_pipeline(accelerator_limit=0)
        >>> pipeline.name
        'fullgrad-explain-audit'
    """
    image = image or default_image()
    if accelerator_limit < 0:
        raise ValueError(f"accelerator_limit must be >= 0, got {accelerator_limit}")
    ops = build_components(image)
    explain_op, audit_op = ops["explain"], ops["audit"]

    @dsl.pipeline(
        name=name,
        description="FullGrad saliency maps over an image dataset, then the attribution audit.",
    )
    def explain_audit(
        dataset_uri: str,
        model_uri: str,
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
        sdk_container_image: str = image,
        explain_args: list[str] = [],  # noqa: B006 - kfp needs a literal default
        audit_args: list[str] = [],  # noqa: B006 - kfp needs a literal default
    ):
        images = dsl.importer(
            artifact_uri=dataset_uri, artifact_class=Dataset, reimport=False
        ).set_display_name("dataset")
        model = dsl.importer(
            artifact_uri=model_uri, artifact_class=Model, reimport=False
        ).set_display_name("model")
        explained = explain_op(
            images=images.output,
            model=model.output,
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
            extra_args=explain_args,
        ).set_display_name("explain")
        # A scheduled audit reruns on the same URIs whose contents change (tonight's data,
        # the model just promoted), so a cache hit would silently skip it.
        explained.set_caching_options(False)
        if accelerator_limit > 0:
            explained.set_accelerator_type(accelerator_type)
            explained.set_accelerator_limit(accelerator_limit)
        audit_op(maps=explained.outputs["maps"], extra_args=audit_args).set_display_name(
            "audit"
        ).set_caching_options(False)

    return explain_audit

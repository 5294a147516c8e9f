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

import textwrap
from typing import Any

from kfp import dsl
from kfp.dsl import Dataset, Model

from fullgrad.kfp.components import (
    build_components,
    default_image,
    define_function,
    docstring_args,
    parameter_source,
)
from fullgrad.kfp.tasks import explain_parameters

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

    parameters = explain_parameters()
    names = [p.name for p in parameters]

    def wire(dataset_uri: str, model_uri: str, explain_args: list, audit_args: list,
             baseline_uri: str, history_uri: str, **values: Any) -> None:
        images = dsl.importer(
            artifact_uri=dataset_uri, artifact_class=Dataset, reimport=False
        ).set_display_name("dataset")
        model = dsl.importer(
            artifact_uri=model_uri, artifact_class=Model, reimport=False
        ).set_display_name("model")
        explained = explain_op(
            images=images.output,
            model=model.output,
            **{name: values[name] for name in names},
            extra_args=explain_args,
        ).set_display_name("explain")
        # A scheduled audit reruns on the same URIs whose contents change (tonight's data,
        # the model just promoted), so a cache hit would silently skip it.
        explained.set_caching_options(False)
        if accelerator_limit > 0:
            explained.set_accelerator_type(accelerator_type)
            explained.set_accelerator_limit(accelerator_limit)
        audit_op(maps=explained.outputs["maps"], extra_args=audit_args, baseline_uri=baseline_uri,
                 history_uri=history_uri).set_display_name(
            "audit"
        ).set_caching_options(False)

    doc = docstring_args(
        [("dataset_uri", "the dataset: a file or folder URI (gs://, s3://, a path)"),
         ("model_uri", "the classifier's .keras / .h5 URI")]
        + [(p.name, p.help) for p in parameters]
        + [("explain_args", "more `fullgrad run` flags or Beam pipeline options"),
           ("audit_args", "more `fullgrad audit` flags (thresholds)"),
           ("baseline_uri", ("an earlier run's audit (folder or audit.json) to compare with; "
            "empty: none, or the history's latest")),
           ("history_uri", ("a history folder: each run compares with the latest run recorded "
            "there and records itself (run-<timestamp>/, latest.json); empty: none"))]
    )
    source = (
        "def explain_audit(dataset_uri: str, model_uri: str, "
        f"{parameter_source(parameters, {'sdk_container_image': image})}, "
        "explain_args: list[str] = [], audit_args: list[str] = [], baseline_uri: str = '', "
        "history_uri: str = ''):\n"
        f'    """FullGrad maps over an image dataset, then the attribution audit.\n\n'
        f'{textwrap.indent(doc, "    ")}\n    """\n'
        "    wire(**locals())\n"
    )
    explain_audit = define_function(source, "explain_audit", wire=wire)
    explain_audit = dsl.pipeline(
        name=name,
        description="FullGrad saliency maps over an image dataset, then the attribution audit.",
    )(explain_audit)
    return explain_audit

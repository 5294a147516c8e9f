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
import linecache
import os
import textwrap
from collections.abc import Callable, Iterable
from typing import Any

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Markdown, Metrics, Model, Output

from fullgrad import __version__
from fullgrad.beam.config import KfpParameter
from fullgrad.kfp.tasks import explain_parameters

__all__ = [
    "DEFAULT_IMAGE",
    "IMAGE_ENV",
    "audit",
    "audit_op",
    "build_components",
    "default_image",
    "define_function",
    "docstring_args",
    "explain",
    "explain_op",
    "parameter_source",
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


#: The explain component's artifacts, before its generated parameters.
_EXPLAIN_ARTIFACTS = (
    ("images", "Input[Dataset]", "Parquet or TFRecord files (a file or a folder of them)."),
    ("model", "Input[Model]", "A .keras / .h5 classifier (a file, or a folder holding one)."),
    ("maps", "Output[Dataset]",
     "Written: the maps Parquet (one row per explained image) and summary.json."),
    ("dead_letters", "Output[Dataset]",
     "Written: one row per input that failed, with its stage and error."),
    ("counts", "Output[Metrics]", "Logged: input, explained, failed, throughput and wall time."),
)
_EXTRA_ARGS_HELP = "More `fullgrad run` flags or Beam pipeline options, one per item."


def define_function(source: str, name: str, **names: Any) -> Callable:
    """Defines the generated function ``name`` from ``source``, with kfp's names in scope.

    ``names`` are more globals the source may use.

    kfp reads a lightweight component's source with ``inspect.getsource`` to embed it in the
    YAML, so the source is registered with ``linecache`` under a name of its own.

    Example:
        >>> define_function("def f(x: int = 1):\n    return x\n", "f")()
        1
    """
    filename = f"<fullgrad.kfp generated {name}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace = {
        "__name__": __name__, "Input": Input, "Output": Output, "Dataset": Dataset,
        "Model": Model, "Metrics": Metrics, "HTML": HTML, "Markdown": Markdown, **names,
    }
    exec(compile(source, filename, "exec"), namespace)  # noqa: S102 -- our own generated text
    return namespace[name]


def parameter_source(parameters: Iterable[KfpParameter], defaults: dict | None = None) -> str:
    """``name: type = default`` for each parameter (``defaults`` overrides some defaults)."""
    defaults = defaults or {}
    return ", ".join(
        f"{p.name}: {p.annotation.__name__} = {defaults.get(p.name, p.default)!r}"
        for p in parameters
    )


def docstring_args(items: Iterable[tuple[str, str]]) -> str:
    """A Google-style ``Args:`` section (kfp reads parameter descriptions from it)."""
    lines = ["Args:"]
    for name, text in items:
        lines.append(f"    {name}: {text[0].upper()}{text[1:].rstrip('.')}.")
    return "\n".join(lines)


def _explain_source() -> str:
    parameters = explain_parameters()
    artifacts = ", ".join(f"{name}: {kind}" for name, kind, _ in _EXPLAIN_ARTIFACTS)
    args = docstring_args(
        [(name, text) for name, _, text in _EXPLAIN_ARTIFACTS]
        + [(p.name, p.help) for p in parameters]
        + [("extra_args", _EXTRA_ARGS_HELP)]
    )
    doc = textwrap.indent(
        "Explains every image of a dataset with FullGrad (the `fullgrad run` Beam job).\n\n"
        + args, "    "
    )
    return (
        f"def explain({artifacts}, {parameter_source(parameters)}, "
        "extra_args: list[str] = []):\n"
        f'    """{doc.strip()}\n    """\n'
        "    parameters = dict(locals())  # before the import adds a name\n"
        "    from fullgrad.kfp.tasks import run_explain\n\n"
        "    run_explain(**parameters)\n"
    )


#: The explain component's function, generated from the job's settings (``JobConfig``) and
#: ``RunnerSettings``: its parameters are written nowhere else.
explain = define_function(_explain_source(), "explain")


def audit(
    maps: Input[Dataset],
    report: Output[HTML],
    summary: Output[Markdown],
    metrics: Output[Metrics],
    extra_args: list[str] = [],  # noqa: B006 - kfp needs a literal default; never mutated
    baseline_uri: str = "",
    history_uri: str = "",
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
        baseline_uri: An earlier run's audit (its folder or audit.json) to compare with; empty:
            none, or the history's latest run.
        history_uri: A history folder (gs://, s3://, a path) for scheduled runs: the latest
            audit recorded there is the baseline (unless baseline_uri), and this audit is
            recorded there at the end; empty: no history.
    """
    from fullgrad.kfp.tasks import run_audit

    run_audit(maps=maps, report=report, summary=summary, metrics=metrics, extra_args=extra_args,
              baseline_uri=baseline_uri, history_uri=history_uri)


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

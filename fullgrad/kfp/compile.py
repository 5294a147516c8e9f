"""``fullgrad compile``: write the components' and the pipelines' YAML.

``fullgrad compile --output DIR`` writes::

    DIR/components/explain.yaml
    DIR/components/audit.yaml
    DIR/pipelines/fullgrad_explain_audit.yaml       explain task requests 1 nvidia.com/gpu
    DIR/pipelines/fullgrad_explain_audit_cpu.yaml   no accelerator request

The copies committed under ``components/`` and ``pipelines/`` are exactly this output for
``--output .`` with the default image (``make compile``); a test recompiles and compares bytes,
so they cannot go stale. The CPU pipeline is for ``runner=DataflowRunner`` (the GPUs are on the
Dataflow workers, the pod only submits) and for clusters without GPUs.

Example:
    $ fullgrad compile --output .
    $ fullgrad compile --output build/ --image us-docker.pkg.dev/my-project/ml/fullgrad:0.1.0
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from kfp import compiler

from fullgrad.kfp.components import IMAGE_ENV, build_components, default_image
from fullgrad.kfp.pipeline import (
    DEFAULT_ACCELERATOR_LIMIT,
    DEFAULT_ACCELERATOR_TYPE,
    build_pipeline,
)

__all__ = ["PIPELINE_FILES", "add_arguments", "compile_all", "main"]

#: Pipeline file name -> the accelerator limit it is compiled with (its type: --accelerator-type).
PIPELINE_FILES: dict[str, int] = {
    "fullgrad_explain_audit.yaml": DEFAULT_ACCELERATOR_LIMIT,
    "fullgrad_explain_audit_cpu.yaml": 0,
}


def compile_all(
    output: str | os.PathLike,
    image: str | None = None,
    accelerator_type: str = DEFAULT_ACCELERATOR_TYPE,
    accelerator_limit: int = DEFAULT_ACCELERATOR_LIMIT,
) -> list[Path]:
    """Compiles every component and pipeline under ``output``.

    Args:
        output: The folder that receives ``components/`` and ``pipelines/``.
        image: The base image; None: ``$FULLGRAD_IMAGE`` or the default name.
        accelerator_type: The GPU pipeline's accelerator type.
        accelerator_limit: The GPU pipeline's accelerator limit (the CPU one always has 0).

    Returns:
        The files written, in order.

    Example:
        >>> [p.name for p in compile_all("build")][:2]
        ['explain.yaml', 'audit.yaml']
    """
    output = Path(output)
    image = image or default_image()
    targets: list[tuple[object, Path]] = [
        (component, output / "components" / f"{name}.yaml")
        for name, component in build_components(image).items()
    ]
    for filename, default_limit in PIPELINE_FILES.items():
        limit = accelerator_limit if default_limit else 0
        pipeline = build_pipeline(image, accelerator_type=accelerator_type, accelerator_limit=limit)
        targets.append((pipeline, output / "pipelines" / filename))
    written = []
    for component, path in targets:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Compile next to the target and rename, so an interrupted run leaves no half file.
        with tempfile.NamedTemporaryFile(
            dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp.yaml", delete=False
        ) as handle:
            tmp = Path(handle.name)
        try:
            compiler.Compiler().compile(component, package_path=str(tmp))
            tmp.chmod(0o644)  # NamedTemporaryFile creates 0600; these are shared, committed files
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)
        written.append(path)
    return written


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds ``fullgrad compile``'s flags to ``parser``."""
    parser.add_argument(
        "--output", required=True, help="Folder that receives components/ and pipelines/."
    )
    parser.add_argument(
        "--image",
        default=None,
        help=f"Base image of the components (default: ${IMAGE_ENV}, else {default_image()!r}).",
    )
    parser.add_argument(
        "--accelerator-type",
        default=DEFAULT_ACCELERATOR_TYPE,
        help="Accelerator of the explain task in the GPU pipeline (default: %(default)s).",
    )
    parser.add_argument(
        "--accelerator-limit",
        type=int,
        default=DEFAULT_ACCELERATOR_LIMIT,
        help="Accelerators for the explain task in the GPU pipeline (default: %(default)s).",
    )


def main(args: argparse.Namespace, extra: list[str]) -> int:
    """Runs ``fullgrad compile``; prints each file written."""
    if args.accelerator_limit < 1:
        raise SystemExit(
            "fullgrad compile: --accelerator-limit must be >= 1 "
            "(the *_cpu.yaml pipeline is the one without a GPU)"
        )
    for path in compile_all(
        args.output,
        image=args.image,
        accelerator_type=args.accelerator_type,
        accelerator_limit=args.accelerator_limit,
    ):
        print(path)
    return 0

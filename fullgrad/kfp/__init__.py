"""Kubeflow Pipelines (kfp v2) integration: components, the pipeline, compile and schedule.

One module per job:

- ``components``: the ``explain`` and ``audit`` components, built on the project's image.
- ``pipeline``: the pipeline chaining them, with the GPU request on the explain task.
- ``tasks``: what each task does, as plain Python over the library (the component bodies are
  one call into it, so the logic is tested without Kubeflow).
- ``compile``: ``fullgrad compile --output DIR`` writes the YAML kept in ``components/`` and
  ``pipelines/``.
- ``schedule``: ``fullgrad schedule`` creates, lists and deletes recurring runs.

The submodules import ``kfp`` (the ``kfp`` extra); this package itself does not, so the
library imports without it.

Example:
    >>> from fullgrad.kfp.pipeline import build_pipeline
    >>> pipeline = build_pipeline(accelerator_limit=0)   # no GPU request, e.g. for kfp.local
"""

__all__: list[str] = []

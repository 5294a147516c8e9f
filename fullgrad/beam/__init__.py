"""The Beam job: FullGrad maps over Parquet / TFRecord datasets, on any Beam runner.

- ``config``: ``JobConfig``, the job's settings;
- ``handler``: ``FullGradModelHandler``, FullGrad inside Beam's ``RunInference``;
- ``io``: readers (Parquet, TFRecord) and writers (maps, dead letters, overlays);
- ``transforms``: decode/preprocess, explain, explained records;
- ``job``: ``fullgrad run``, ``build_pipeline``, ``pipeline_options``, ``run``.

Apache Beam is an optional extra (``pip install fullgrad[beam]``); importing this package
does not import Beam, its modules do.

Example:
    >>> from fullgrad.beam.job import JobConfig, run
    >>> run(JobConfig(input="data/*.parquet", model="model.keras", output="out"))
"""

__all__: list[str] = []

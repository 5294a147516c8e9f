"""Entry point of the Beam job, as in Beam's examples: ``python pipelines/beam_job.py ...``.

The same as ``fullgrad run``; flags it does not know go to Beam's ``PipelineOptions``.

Example:
    $ python pipelines/beam_job.py --input 'data/*.parquet' --model model.keras \\
        --output out --image-size 224 --preprocess torch \\
        --direct_num_workers 2 --direct_running_mode multi_processing
"""

from __future__ import annotations

import argparse
import sys

from fullgrad.beam import job


def main(argv: list[str] | None = None) -> int:
    """Parses ``argv`` (``sys.argv[1:]`` when None) and runs the job."""
    parser = argparse.ArgumentParser(prog="beam_job.py", description=__doc__.splitlines()[0])
    job.add_arguments(parser)
    args, extra = parser.parse_known_args(argv)
    return job.main(args, extra)


if __name__ == "__main__":
    sys.exit(main())

"""The `fullgrad` command line: one entry point, one module per subcommand.

Each subcommand lives with the code it drives and exposes two functions,
``add_arguments(parser)`` and ``main(args, extra) -> int``. The module is imported only
when its subcommand runs, so ``fullgrad --help`` stays fast and a missing optional extra
(Beam, kfp) only matters to the subcommand that needs it.

Example:
    $ fullgrad run --input 'data/*.parquet' --model model.keras --output out/
    $ fullgrad demo --output demo-output
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

__all__ = ["COMMANDS", "main"]

#: name -> (module implementing it, one-line help).
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("fullgrad.beam.job", "Run the Beam job: FullGrad maps (and the audit) over a dataset."),
    "audit": ("fullgrad.beam.audit_job", "Audit maps already written by `fullgrad run`."),
    "demo": ("fullgrad.demo.command", "Build the demo dataset and model, run the job and the audit."),
    "compile": ("fullgrad.kfp.compile", "Compile the Kubeflow components and pipeline to YAML."),
    "schedule": ("fullgrad.kfp.schedule", "Create, list or delete recurring Kubeflow runs."),
}

#: Subcommands that also take Beam's pipeline options (any other unknown flag is an error).
PASS_THROUGH = {"run", "audit", "demo"}


def _top_level_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fullgrad",
        description="FullGrad saliency maps at dataset scale.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n"
        + "\n".join(f"  {name:<10}{text}" for name, (_, text) in COMMANDS.items()),
    )
    parser.add_argument("command", choices=sorted(COMMANDS), metavar="COMMAND")
    parser.add_argument("arguments", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parses ``argv`` and runs the chosen subcommand.

    Args:
        argv: Arguments without the program name; ``sys.argv[1:]`` when None.

    Returns:
        The process exit status.
    """
    top = _top_level_parser().parse_args(argv)
    module_name, text = COMMANDS[top.command]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(
        prog=f"fullgrad {top.command}", description=text, allow_abbrev=False
    )
    module.add_arguments(parser)
    if top.command in PASS_THROUGH:
        from fullgrad.beam.options import parse_flags

        args, extra = parse_flags(parser, top.arguments)
    else:
        args, extra = parser.parse_args(top.arguments), []
    return int(module.main(args, extra) or 0)


if __name__ == "__main__":
    sys.exit(main())

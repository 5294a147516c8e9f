"""Imports go one way: core -> audit -> beam -> kfp, demo -> cli (README, "Layout").

Every ``import`` in every module counts, including those inside functions, which is where a
cycle hides: an import placed in a function body still makes the two subpackages depend on
each other.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "fullgrad"

#: Each part of the package and its layer; a module may import only its own layer or lower.
LAYERS = {"core": 0, "audit": 1, "beam": 2, "kfp": 3, "demo": 3, "cli": 4}


def part_of(module: str) -> str:
    """``fullgrad.beam.io`` -> ``beam``; ``fullgrad.methods`` and ``fullgrad`` -> ``core``."""
    names = module.split(".")
    if len(names) == 1:
        return "core"
    if names[1] == "cli":
        return "cli"
    return names[1] if (PACKAGE / names[1]).is_dir() else "core"


def module_name(path: pathlib.Path) -> str:
    relative = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(relative.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: pathlib.Path) -> list[tuple[int, str]]:
    """``(line, module)`` for every fullgrad module ``path`` imports, anywhere in the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            # ``from fullgrad import record`` imports the module fullgrad.record.
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                relative = candidate.split(".")[1:]
                if relative and (
                    PACKAGE.joinpath(*relative).with_suffix(".py").exists()
                    or PACKAGE.joinpath(*relative).is_dir()
                ):
                    found.append((node.lineno, candidate))
    return [(line, name) for line, name in found if name.split(".")[0] == "fullgrad"]


MODULES = sorted(PACKAGE.rglob("*.py"))


def dependencies() -> dict[str, set[str]]:
    """Part -> the other parts it imports."""
    graph: dict[str, set[str]] = {part: set() for part in LAYERS}
    for path in MODULES:
        source = part_of(module_name(path))
        for _, name in imported_modules(path):
            target = part_of(name)
            if target != source:
                graph[source].add(target)
    return graph


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_imports_point_down(path):
    source = part_of(module_name(path))
    upward = [
        f"line {line}: {name} ({part_of(name)})"
        for line, name in imported_modules(path)
        if LAYERS[part_of(name)] > LAYERS[source]
    ]
    assert not upward, f"{module_name(path)} ({source}) imports a higher layer: {upward}"


def test_no_cycle_between_parts():
    graph = dependencies()
    visiting: list[str] = []
    done: set[str] = set()

    def visit(part: str) -> None:
        assert part not in visiting, f"import cycle: {' -> '.join([*visiting, part])}"
        if part in done:
            return
        visiting.append(part)
        for target in sorted(graph[part]):
            visit(target)
        visiting.pop()
        done.add(part)

    for part in sorted(graph):
        visit(part)


def test_the_checker_sees_imports_inside_functions(tmp_path):
    """The cycle the reshape removed was hidden in function bodies: the walk must find them."""
    path = PACKAGE / "beam" / "job.py"
    inner = [name for _, name in imported_modules(path) if name.startswith("fullgrad.beam.")]
    # build_pipeline imports fullgrad.beam.io and fullgrad.beam.transforms inside its body.
    assert {"fullgrad.beam.io", "fullgrad.beam.transforms"} <= set(inner)
    assert part_of("fullgrad.kfp.tasks") == "kfp" and part_of("fullgrad.record") == "core"
    assert part_of("fullgrad") == "core" and part_of("fullgrad.cli") == "cli"

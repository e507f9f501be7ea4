"""The shape of the source tree that ARCHITECTURE.md promises: layers, sizes, no cycles.

The checker reads imports with ``ast`` (nothing is imported), so a wrong import fails here
before it can make a cycle at run time. Every import counts, including those under
``TYPE_CHECKING`` and inside functions: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "src" / "recarchive"

#: The layers of ARCHITECTURE.md, lowest first. A module may import its own unit and any unit
#: of a lower layer; units of one layer never import each other.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors", "redaction", "config", "model", "leases", "tempfiles"),
    ("bird", "normalize", "store", "media"),
    ("ids", "export"),
    ("run",),
    ("cli",),
)
#: Base modules are one unit for this check: they import each other (config reads
#: redaction, tempfiles asks leases whether an owner is alive), never anything above.
BASE = LAYERS[0]
#: Apart from the layers: only ``cli`` (the ``simulate`` and ``demo`` commands), tests and
#: benchmarks use it, and it imports nothing of the pipeline.
SIMULATOR = "simulator"
#: Units of the inputs-and-outputs layer use only these units of the stages below (and the
#: base): ``ids/`` asks Bird for a window's IDs, ``export/`` reads SQL.
LOWER_UNITS = {"ids": {"bird"}, "export": {"store"}}
#: Functions that import the module named by their first argument.
DYNAMIC_IMPORTS = {"import_module", "__import__"}
#: Longest module the tree keeps; past it a module is doing two jobs.
MAX_MODULE_LINES = 450


@dataclass(frozen=True)
class Violation:
    """One import the layering forbids."""

    module: str
    imported: str
    why: str

    def __str__(self) -> str:
        return f"{self.module} imports {self.imported}: {self.why}"


def unit_of(module: str) -> str:
    """The layering unit of ``recarchive.x.y``: its first part below the package."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def layer_of(unit: str) -> int | None:
    for index, units in enumerate(LAYERS):
        if unit in units:
            return index
    return None


def modules(package: Path) -> Iterator[tuple[str, Path]]:
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield ".".join(parts), path


def package_of(module: str, path: Path) -> list[str]:
    """The package that relative imports in ``path`` start from."""
    return module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]


def imported_names(package: list[str], node: ast.AST) -> list[str]:
    """The ``recarchive`` modules one import statement names, relative ones resolved.

    ``from recarchive.run import chunk`` names both ``recarchive.run`` and
    ``recarchive.run.chunk`` (which of them is a module, the caller decides).
    """
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    elif isinstance(node, ast.Call) and _called_name(node.func) in DYNAMIC_IMPORTS:
        first = node.args[0] if node.args else None
        names = (
            [first.value]
            if isinstance(first, ast.Constant) and isinstance(first.value, str)
            else []
        )
    elif isinstance(node, ast.ImportFrom):
        if node.level:
            base = ".".join(
                [*package[: len(package) - node.level + 1], *([node.module] if node.module else [])]
            )
        else:
            base = node.module or ""
        names = [base, *(f"{base}.{alias.name}" for alias in node.names)]
    else:
        return []
    return [name for name in names if name.split(".")[0] == "recarchive"]


def _called_name(func: ast.expr) -> str:
    if isinstance(func, ast.Attribute):
        return func.attr
    return func.id if isinstance(func, ast.Name) else ""


def imports_of(module: str, path: Path) -> Iterator[str]:
    """Every ``recarchive`` module that ``path`` imports, anywhere in it."""
    package = package_of(module, path)
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        yield from imported_names(package, node)


def check_import(module: str, imported: str) -> str | None:
    """Why ``module`` must not import ``imported``, or ``None`` when it may."""
    unit, target = unit_of(module), unit_of(imported)
    if not unit and target:
        return "the package's __init__ imports nothing: importing any part must not load others"
    if not target or unit == target:
        return None
    if unit == SIMULATOR:
        return "the simulator stands apart and imports nothing of the pipeline"
    if target == SIMULATOR:
        return None if unit == "cli" else "only the cli (and tests) may use the simulator"
    own, theirs = layer_of(unit), layer_of(target)
    if own is None or theirs is None:
        return f"{unit if own is None else target} is in no layer of ARCHITECTURE.md"
    if own == theirs == 0:
        return None
    if theirs > own:
        return f"{target} is a higher layer than {unit}"
    if theirs == own:
        return f"{unit} and {target} are one layer and must not import each other"
    if theirs > 0 and unit in LOWER_UNITS and target not in LOWER_UNITS[unit]:
        return f"{unit} uses only {', '.join(sorted(LOWER_UNITS[unit]))} of the stages"
    return None


def violations(package: Path) -> list[Violation]:
    found = []
    for module, path in modules(package):
        seen: set[str] = set()
        for imported in imports_of(module, path):
            why = check_import(module, imported)
            # One report per unit imported: ``from x import y`` names x and x.y.
            if why and unit_of(imported) not in seen:
                seen.add(unit_of(imported))
                found.append(Violation(module, imported, why))
    return found


def test_no_module_imports_a_higher_layer_or_a_sibling() -> None:
    found = violations(PACKAGE)
    assert not found, "\n".join(map(str, found))


def test_flows_use_the_run_layer_and_below_only() -> None:
    # flows/ is the second door beside cli/: it may use everything up to run/, never the cli
    # or the simulator.
    found = []
    for path in sorted((ROOT / "flows").rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        for imported in imports_of(module, path):
            target = unit_of(imported)
            if target in ("cli", SIMULATOR) or (layer_of(target) is None and target):
                found.append(f"{path.relative_to(ROOT)} imports {imported}")
    assert not found, "\n".join(found)


def test_every_unit_of_the_tree_has_a_layer() -> None:
    # A new top-level module or folder has to be given its place in ARCHITECTURE.md (and in
    # LAYERS) before it can hold code.
    units = {unit_of(module) for module, _path in modules(PACKAGE)} - {""}
    placed = {unit for layer in LAYERS for unit in layer} | {SIMULATOR}
    assert units == placed


def test_no_module_is_over_the_size_limit() -> None:
    long = {
        str(path.relative_to(ROOT)): lines
        for _module, path in modules(PACKAGE)
        if (lines := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert not long, f"over {MAX_MODULE_LINES} lines: {long}"


def test_docstrings_point_into_the_repository() -> None:
    # Documents outside the repository (the design notes it was built from) are not there for
    # a reader of a clone: point to ARCHITECTURE.md or docs/ instead.
    stale = [
        f"{path.relative_to(ROOT)}:{number}"
        for folder in ("src", "flows", "bench", "tests", "scripts")
        for path in sorted((ROOT / folder).rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if "DESIGN" in line and path.name != "test_architecture.py"
    ]
    assert not stale, stale


def import_cycles(package: Path) -> list[list[str]]:
    """Cycles among the imports that run when modules are imported (see _run_at_import)."""
    graph: dict[str, set[str]] = {}
    for module, path in modules(package):
        relative_base = package_of(module, path)
        graph[module] = {
            name
            for node in _run_at_import(ast.parse(path.read_text()))
            for name in imported_names(relative_base, node)
        }
        # Importing a.b.c runs a/__init__ and a/b/__init__ first.
        parts = module.split(".")
        graph[module].update(".".join(parts[:end]) for end in range(1, len(parts)))
    known = set(graph)
    cycles = []
    state: dict[str, int] = {}

    def visit(module: str, trail: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if target not in known or target == module:
                continue
            if state.get(target) == 1:
                cycles.append([*trail[trail.index(target) :], target])
            elif target not in state:
                visit(target, [*trail, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return cycles


def test_no_import_cycle_between_modules() -> None:
    # A cycle among module-level imports is an error waiting for a new import order.
    cycles = import_cycles(PACKAGE)
    assert not cycles, cycles


@pytest.mark.parametrize(
    ("second", "cycle"),
    [
        ("from recarchive.store import first\n", True),
        ("try:\n    import recarchive.store.first\nexcept ImportError:\n    pass\n", True),
        ("def later() -> None:\n    from recarchive.store import first\n", False),
        (
            "import typing\nif typing.TYPE_CHECKING:\n    from recarchive.store import first\n",
            False,
        ),
    ],
    ids=["module-level", "in-try", "in-function", "type-checking"],
)
def test_the_cycle_check_sees_imports_that_run_at_import(
    tmp_path: Path, second: str, cycle: bool
) -> None:
    store = tmp_path / "recarchive" / "store"
    store.mkdir(parents=True)
    for init in (store.parent / "__init__.py", store / "__init__.py"):
        init.touch()
    (store / "first.py").write_text("from recarchive.store import second\n")
    (store / "second.py").write_text(second)
    assert bool(import_cycles(store.parent)) == cycle


def _run_at_import(tree: ast.Module) -> Iterator[ast.AST]:
    """The nodes executed when a module is imported: not those in functions or in
    ``if TYPE_CHECKING:`` blocks, but those in class bodies and module-level ``try``/``if``."""
    stack: list[ast.AST] = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            continue
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        yield node
        stack.extend(ast.iter_child_nodes(node))


# The checker itself, on a tree made for it: each wrong import below must be reported, and
# the right ones must not (the control for the real tree's test above).
CASES = {
    "store-imports-media": ("store/ledger.py", "from recarchive.media.s3 import MediaStore", True),
    "bird-imports-run": ("bird/client.py", "import recarchive.run.chunk", True),
    "media-imports-bird": ("media/transfer.py", "from recarchive.bird.client import X", True),
    "ids-imports-export": ("ids/read.py", "from recarchive.export.parquet import x", True),
    "export-imports-run": ("export/parquet.py", "from recarchive.run import runs", True),
    "model-imports-store": ("model.py", "from recarchive.store.ledger import Ledger", True),
    "run-imports-cli": ("run/runs.py", "from recarchive.cli.app import app", True),
    "run-imports-simulator": ("run/chunk.py", "from recarchive.simulator import server", True),
    "simulator-imports-model": ("simulator/server.py", "from recarchive.model import X", True),
    "relative-upward": ("store/ledger.py", "from ..run.chunk import X", True),
    "unplaced-unit": ("extras.py", "from recarchive.model import X", True),
    "dynamic-upward": (
        "store/ledger.py",
        "import importlib\nimportlib.import_module('recarchive.run')",
        True,
    ),
    "dunder-import-upward": ("bird/client.py", "__import__('recarchive.cli.app')", True),
    "package-init-imports": ("__init__.py", "from recarchive.cli.app import main", True),
    "ids-imports-store": ("ids/read.py", "from recarchive.store.archive import ArchiveStore", True),
    "export-imports-bird": (
        "export/parquet.py",
        "from recarchive.bird.client import BirdClient",
        True,
    ),
    "ids-imports-bird": ("ids/discover.py", "from recarchive.bird.client import BirdClient", False),
    "run-imports-store": ("run/chunk.py", "from recarchive.store.ledger import Ledger", False),
    "cli-imports-simulator": ("cli/demo.py", "from recarchive.simulator import server", False),
    "export-imports-store": ("export/parquet.py", "from recarchive.store import tables", False),
    "config-imports-redaction": ("config.py", "from recarchive.redaction import redact", False),
    "own-package": ("media/s3.py", "from recarchive.media.keys import media_key", False),
    "typing-only-upward": (
        "store/ledger.py",
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from recarchive.run import x",
        True,
    ),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_the_checker_reports_exactly_the_wrong_imports(tmp_path: Path, case: str) -> None:
    relative, source, wrong = CASES[case]
    package = tmp_path / "recarchive"
    target = package / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    for folder in {package, target.parent}:
        (folder / "__init__.py").touch()
    target.write_text(source + "\n")
    found = violations(package)
    assert bool(found) == wrong, found

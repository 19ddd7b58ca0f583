"""The architecture holds: imports point one way, no module cycle, a pure core that imports alone,
and library messages that name options rather than command-line flags.

Every import in src/batchfit is read with ``ast`` (deferred imports inside functions included), so
a forbidden direction fails here, not in review.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "batchfit"

#: Each part of the package, and the parts it may import. Every module belongs to exactly one
#: part (its first dotted component under batchfit, or the module itself); a part may always
#: import itself. Parts are listed from the bottom up.
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "version": set(),
    "core": {"errors"},
    "files": {"core", "errors"},
    "imports": {"errors"},
    "examples": {"core", "errors", "files"},
    "data": {"core", "errors", "files"},
    "losses": {"core", "data", "errors", "imports"},
    "checkpoint": {"core", "errors", "files"},
    "metrics": {"core", "errors"},
    "progress": {"core", "errors"},
    "memory_limits": {"core"},
    "threads": {"core"},
    "precision": {"core", "errors", "losses"},
    "compiling": {"losses"},
    "step": {"core", "data", "errors", "losses", "precision"},
    "distributed": {"core", "data", "errors", "losses", "precision"},
    "inputs": {"core", "data", "errors", "imports", "losses"},
    "probe": {
        "core",
        "data",
        "errors",
        "files",
        "inputs",
        "losses",
        "memory_limits",
        "step",
        "threads",
    },
    "loop": {
        "checkpoint",
        "compiling",
        "core",
        "data",
        "distributed",
        "errors",
        "files",
        "inputs",
        "losses",
        "memory_limits",
        "metrics",
        "precision",
        "progress",
        "step",
        "threads",
    },
    "report": {"core", "errors", "files", "version"},
    "orchestrate": {
        "checkpoint",
        "compiling",
        "core",
        "data",
        "distributed",
        "errors",
        "files",
        "inputs",
        "loop",
        "losses",
        "metrics",
        "precision",
        "probe",
        "progress",
        "report",
        "step",
        "threads",
    },
    "task": {"core", "checkpoint", "data", "errors", "examples", "imports", "inputs", "losses"},
    "cli": {
        "core",
        "errors",
        "examples",
        "files",
        "loop",
        "orchestrate",
        "progress",
        "report",
        "task",
        "version",
    },
    "integrations": {"core", "errors", "inputs", "losses", "orchestrate", "report"},
    "__init__": {"*"},
    "__main__": {"cli", "distributed"},
}

#: What the pure core and the command line must not load just by being imported (NumPy is
#: allowed: the noise-scale estimator's bootstrap uses it).
HEAVY = ("torch", "pyarrow", "matplotlib", "rich", "psutil")


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(("batchfit", *parts)).removesuffix(".__init__")


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(SRC.rglob("*.py"))}


MODULES = _modules()


def _part(module: str) -> str:
    rest = module.split(".")[1:]
    return rest[0] if rest else "__init__"


def _imports(module: str, path: Path) -> set[str]:
    """The batchfit modules that ``module`` imports anywhere in its source."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                stem = package[: len(package) - (node.level - 1)]
                base = ".".join(stem + ([base] if base else []))
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for name in names:
            while name and name not in MODULES:
                name = name.rpartition(".")[0]
            if name.startswith("batchfit") and name != module:
                found.add(name)
    return found


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


def test_every_module_belongs_to_a_known_part():
    unknown = sorted({_part(m) for m in MODULES} - set(ALLOWED))
    assert not unknown, f"add these parts to ALLOWED, with what they may import: {unknown}"


def test_imports_point_down_the_layers():
    wrong = []
    for module, imported in GRAPH.items():
        mine = _part(module)
        allowed = ALLOWED[mine]
        for other in imported:
            theirs = _part(other)
            if theirs == "__init__" and other == "batchfit":
                wrong.append(f"{module} -> batchfit (import the defining module instead)")
            elif theirs != mine and "*" not in allowed and theirs not in allowed:
                wrong.append(f"{module} -> {other}")
    assert not wrong, "forbidden import directions:\n" + "\n".join(sorted(wrong))


def test_no_import_cycle_between_modules():
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(GRAPH[node]):
            if nxt.endswith("__init__") or MODULES[nxt].name == "__init__.py":
                continue  # package docstrings and batchfit's lazy exports
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif not state.get(nxt):
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for module in sorted(GRAPH):
        if not state.get(module) and MODULES[module].name != "__init__.py":
            visit(module, [])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_architecture_test_sees_a_forbidden_import(tmp_path):
    """The checker itself: a probe that imports the loop is caught."""
    bad = tmp_path / "bad.py"
    bad.write_text("from batchfit.loop.train import train\n")
    imported = _imports("batchfit.probe.bad", bad)
    assert "batchfit.loop.train" in imported
    assert "loop" not in ALLOWED["probe"]


PURE_IMPORT = """
import sys
import {module}
heavy = sorted(m for m in {heavy!r} if m in sys.modules)
print(",".join(heavy))
"""


@pytest.mark.parametrize(
    "module",
    sorted(m for m in MODULES if _part(m) == "core") + ["batchfit", "batchfit.cli"],
)
def test_core_and_the_command_line_import_without_torch(module):
    code = PURE_IMPORT.format(module=module, heavy=HEAVY)
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == "", f"importing {module} loaded {done.stdout.strip()}"


def test_batchfit_plan_runs_without_importing_torch():
    code = (
        "import sys, runpy\n"
        "sys.argv = ['batchfit', 'plan', '--samples', '24000', '--batch-size', '32', '--json']\n"
        "from batchfit.cli import main\n"
        "assert main() == 0\n"
        "print('torch' in sys.modules, 'pyarrow' in sys.modules, 'matplotlib' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert '"steps_per_epoch": 750' in done.stdout
    assert done.stdout.strip().splitlines()[-1] == "False False False"


#: A command-line flag inside a string literal: ``--batch-size``, ``--out``.
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9]*(?:-[a-z0-9]+)*\b")


def _string_literals(tree: ast.AST) -> list[tuple[int, str]]:
    """Every string constant that is not a docstring, with its line, and the text of every
    f-string with its replacement fields left out: ``f"--{'no-' if on else ''}stream"`` holds
    ``--stream`` though no constant of it does."""
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                docstrings.add(id(body[0].value))
    constants = [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and id(node) not in docstrings
    ]
    fstrings = [
        (node.lineno, "".join(v.value for v in node.values if isinstance(v, ast.Constant)))
        for node in ast.walk(tree)
        if isinstance(node, ast.JoinedStr)
    ]
    return constants + fstrings


def _flags_named(source: str) -> set[tuple[int, str]]:
    """``(line, flag)`` for each flag that a string of ``source`` names."""
    return {
        (line, flag)
        for line, text in _string_literals(ast.parse(source))
        for flag in FLAG.findall(text)
    }


def test_a_flag_is_found_in_plain_strings_and_in_fstrings_that_split_it():
    source = (
        'a = "pass --batch-size"\n'
        "b = f\"--{'no-' if on else ''}stream to override\"\n"
        'c = f"{opt(name)} or {n}-fold, --{flag}"\n'
        'def f():\n    """--out in a docstring"""\n'
    )
    assert _flags_named(source) == {(1, "--batch-size"), (2, "--stream")}


#: Where flags belong: the command line, and the option table's help texts it shows.
FLAGS_ALLOWED_IN = {"batchfit.cli", "batchfit.core.options"}


def test_library_messages_name_options_not_flags():
    found = []
    for module, path in MODULES.items():
        if module in FLAGS_ALLOWED_IN:
            continue
        for line, flag in sorted(_flags_named(path.read_text())):
            found.append(f"{path.relative_to(SRC.parent)}:{line}: {flag}")
    assert not found, "use batchfit.core.options.opt() instead of these flags:\n" + "\n".join(found)

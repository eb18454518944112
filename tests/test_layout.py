"""The house keeps its shape: imports run down the floors of dicomnode, and never from models/training up into it.

Why a test: a loop hidden by a function-local import (45 of them before the
re-lay) is invisible until a module is imported in another order. The floors
are those of ../shared/DESIGN.md; a module may import its own floor and the
floors below, never above.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# dicomnode's floors, bottom (0) to top; a module's floor is that of the longest prefix listed.
FLOORS: dict[str, int] = {
    "dicomnode": 0, "dicomnode.config": 0, "dicomnode.logs": 0, "dicomnode.files": 0, "dicomnode.handoff": 0,
    "dicomnode.dicom": 1, "dicomnode.index": 1, "dicomnode.spool": 1, "dicomnode.synth": 1,
    "dicomnode.assemble": 2,
    "dicomnode.stages": 3,
    "dicomnode.runtime": 4, "dicomnode.web": 4,
    "dicomnode.node": 5, "dicomnode.cli": 5, "dicomnode.demo": 5, "dicomnode.__main__": 5,
}
# settings, logging and the atomic writer import nothing of ours (mercure's circle in common/ is the lesson)
IMPORT_NOTHING_OF_OURS = {"dicomnode.config", "dicomnode.logs", "dicomnode.files"}
# The only function-local imports allowed, each keeping torch (or training) out of a process that does not need
# it: the CLI's commands that train or synthesise (demo, synth), and the stage list's lazy module resolution.
LOCAL_IMPORTS_ALLOWED: dict[str, set[str]] = {
    "dicomnode.cli": {"dicomnode.demo", "dicomnode.synth", "training.heads", "training.demo", "training.cohort"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def floor_of(name: str) -> int | None:
    best = None
    for prefix, floor in FLOORS.items():
        if name == prefix or name.startswith(prefix + "."):
            if best is None or len(prefix) > len(best[0]):
                best = (prefix, floor)
    return None if best is None else best[1]


def imports_of(path: Path, mod: str | None = None) -> list[tuple[str, int, bool]]:
    """(imported module, line, function-local?) for every import statement in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    mod = mod or module_name(path)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, local: bool) -> None:
        for child in ast.iter_child_nodes(node):
            is_func = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                out.extend((a.name, child.lineno, local) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                out.append((target, child.lineno, local))
            visit(child, local or is_func)

    visit(tree, False)
    return out


def _sources(package: str) -> list[Path]:
    return sorted(p for p in (ROOT / package).rglob("*.py") if "migrations" not in p.parts)


def test_every_dicomnode_module_has_a_floor() -> None:
    unplaced = [module_name(p) for p in _sources("dicomnode") if floor_of(module_name(p)) is None]
    assert not unplaced, f"modules without a floor (add them to FLOORS and DESIGN.md): {unplaced}"


def test_no_dicomnode_module_imports_a_floor_above_its_own() -> None:
    bad = []
    for path in _sources("dicomnode"):
        mod = module_name(path)
        own = floor_of(mod)
        for target, line, _ in imports_of(path):
            if not target.startswith("dicomnode"):
                continue
            theirs = floor_of(target)
            if own is not None and theirs is not None and theirs > own:
                bad.append(f"{path.relative_to(ROOT)}:{line} {mod} (floor {own}) imports {target} (floor {theirs})")
            if mod in IMPORT_NOTHING_OF_OURS and target != mod:
                bad.append(f"{path.relative_to(ROOT)}:{line} {mod} must import nothing of ours, imports {target}")
    assert not bad, "imports that run up the house:\n" + "\n".join(bad)


def test_function_local_imports_only_where_they_keep_torch_out() -> None:
    bad = []
    for path in _sources("dicomnode"):
        mod = module_name(path)
        for target, line, local in imports_of(path):
            if local and target not in LOCAL_IMPORTS_ALLOWED.get(mod, set()):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {target} inside a function")
    assert not bad, "function-local imports (import at the top, or list the reason in LOCAL_IMPORTS_ALLOWED):\n" \
        + "\n".join(bad)


@pytest.mark.parametrize("package", ["models", "training"])
def test_models_and_training_never_import_dicomnode(package: str) -> None:
    bad = [f"{p.relative_to(ROOT)}:{line} imports {target}" for p in _sources(package)
           for target, line, _ in imports_of(p) if target == "dicomnode" or target.startswith("dicomnode.")]
    assert not bad, f"{package} must not import dicomnode (dicomnode -> models <- training):\n" + "\n".join(bad)


def test_models_never_imports_training() -> None:
    bad = [f"{p.relative_to(ROOT)}:{line} imports {target}" for p in _sources("models")
           for target, line, _ in imports_of(p) if target == "training" or target.startswith("training.")]
    assert not bad, "\n".join(bad)


def test_the_layout_check_sees_a_violation(tmp_path: Path) -> None:
    """The checker itself: an upward import in a bottom-floor module is found (so the tests above can fail)."""
    src = tmp_path / "probe.py"
    src.write_text("from dicomnode.runtime.runner import Runtime\n\ndef f():\n    import dicomnode.node\n")
    found = imports_of(src, "dicomnode.index.probe")
    assert ("dicomnode.runtime.runner", 1, False) in found and ("dicomnode.node", 4, True) in found
    assert floor_of("dicomnode.runtime.runner") == 4 > floor_of("dicomnode.index.studies") == 1  # type: ignore[operator]

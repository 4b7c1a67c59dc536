"""The package's shape, checked on its source: imports point down the layers, and no module or
function outgrows what a reader can hold (the README's architecture section is the map)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ircan_serve"

LAYERS = [
    {"errors", "files", "prompts", "answers", "architectures"},
    {"config", "units", "models"},
    {"generation", "reweight", "retrieval"},
    {"data", "conflicts", "attribution", "selection", "checkpoint"},
    {"pipeline", "evaluation"},
    {"serving", "langchain"},
    {"demo", "benchmarks", "cli"},
]
"""Bottom first. A module may import from its own layer and the layers below it, never above."""

THIN = {"serving", "langchain"}
"""Serving and the LangChain wrappers depend only on these (the manifest, the prompts)."""
THIN_MAY_IMPORT = {"errors", "prompts", "units", "checkpoint.manifest", "serving", "langchain"}
RAG_MAY_ALSO_IMPORT = {"retrieval"}
"""The RAG helper (``langchain/rag.py``) also reads the retriever."""

MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE)


def _dotted(path: Path) -> list[str]:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    return parts[:-1] if parts[-1] == "__init__" else parts


def _imports(path: Path) -> set[str]:
    """Every module of the package that ``path`` imports, at the top or inside functions, as a
    dotted path below ``ircan_serve``."""
    here = _dotted(path)
    package = here if path.name == "__init__.py" else here[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
            elif node.module and node.module.startswith("ircan_serve"):
                base = []
            else:
                continue
            module = (node.module or "").removeprefix("ircan_serve").lstrip(".")
            target = base + [m for m in module.split(".") if m]
            names = [a.name for a in node.names]
            out |= {".".join(target + [n]) for n in names} | {".".join(target)}
        elif isinstance(node, ast.Import):
            out |= {a.name.removeprefix("ircan_serve.") for a in node.names if a.name.startswith("ircan_serve.")}
    return {o for o in out if o}


def _component(dotted: str) -> str:
    return dotted.split(".")[0]


def _layer(component: str) -> int:
    for i, names in enumerate(LAYERS):
        if component in names:
            return i
    raise AssertionError(f"{component!r} is in no layer of tests/test_layers.py:LAYERS; add it there")


def _existing(dotted: str) -> bool:
    path = PACKAGE.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(path):
    me = _component(".".join(_dotted(path)))
    for target in sorted(t for t in _imports(path) if _existing(t)):
        other = _component(target)
        assert _layer(other) <= _layer(me), f"{path.relative_to(PACKAGE)} imports {target}, a layer above it"
        if me in THIN and other not in THIN:
            allowed = THIN_MAY_IMPORT | (RAG_MAY_ALSO_IMPORT if path.name == "rag.py" else set())
            assert target in allowed or other in allowed, \
                f"{path.relative_to(PACKAGE)} imports {target}: serving and the wrappers read only the manifest and prompts"


def test_components_of_one_layer_do_not_import_each_other_in_a_cycle():
    edges: dict[str, set[str]] = {}
    for path in _modules():
        me = _component(".".join(_dotted(path)))
        for target in _imports(path):
            if _existing(target) and _component(target) != me:
                edges.setdefault(me, set()).add(_component(target))

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(nxt == goal or nxt not in seen and reaches(nxt, goal, seen | {nxt}) for nxt in edges.get(start, ()))

    cycles = sorted(c for c in edges if reaches(c, c, {c}))
    assert not cycles, f"import cycles through {cycles}"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_and_functions_stay_small(path):
    text = path.read_text()
    assert len(text.splitlines()) <= MAX_MODULE_LINES, f"{path.name}: {len(text.splitlines())} lines"
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lines = node.end_lineno - node.lineno + 1  # type: ignore[operator]
            assert lines <= MAX_FUNCTION_LINES, f"{path.name}:{node.lineno} {node.name}: {lines} lines"


def test_the_checker_sees_an_upward_import(tmp_path, monkeypatch):
    """The check is not vacuous: a bottom module importing the CLI is reported."""
    fake = tmp_path / "ircan_serve"
    fake.mkdir()
    (fake / "errors.py").write_text("from .cli import main\n")
    (fake / "cli.py").write_text("")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    with pytest.raises(AssertionError, match="a layer above it"):
        test_imports_point_down(fake / "errors.py")

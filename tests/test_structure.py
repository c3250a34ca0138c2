"""The shape of lib: one methods module per paper, and no import cycles (issue 14)."""
import ast
import re
from pathlib import Path

from lib import methods

LIB = Path(__file__).resolve().parent.parent / "lib"

# Each paper's methods module, and the registry names (methods, modifiers, aliases) it must define.
PAPERS = {
    "lib.methods.baselines": {"zeroshot", "lp", "ft", "lp-ft"},
    "lib.methods.clipood": {"mms", "bma", "clipood"},
    "lib.methods.robust_ft": {"ce", "vision-only", "swa", "ce-swa"},
    "lib.methods.arf": {"flyp", "arf", "arf-cap", "arf-ret"},
    "lib.methods.saft": {"saft"},
    "lib.methods.model_stock": {"stock", "model-stock"},
}


def _module_name(path):
    parts = path.relative_to(LIB.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def lib_imports():
    """{module: set of lib modules it imports}, every import statement counted (those inside functions too)."""
    files = {_module_name(path): path for path in LIB.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package.split(".")
                base = base[:len(base) - node.level + 1] if node.level else []
                stem = ".".join(base + ([node.module] if node.module else []))
                # `from . import anchors` imports the module lib.anchors; `from .x import f` imports lib.x
                targets = [f"{stem}.{a.name}" if f"{stem}.{a.name}" in files else stem for a in node.names]
            else:
                continue
            edges |= {t for t in targets if t in files and t != name}
        graph[name] = edges
    return graph


def test_no_module_of_lib_imports_a_module_that_imports_it_back():
    graph = lib_imports()

    def reaches(start, goal):
        seen, todo = set(), [start]
        while todo:
            module = todo.pop()
            if module == goal:
                return True
            if module not in seen:
                seen.add(module)
                todo.extend(graph[module])
        return False
    cycles = sorted((a, b) for a in graph for b in graph[a] if reaches(b, a))
    assert not cycles, f"import cycles in lib (module, an import that leads back to it): {cycles}"


def test_the_walk_sees_lazy_and_relative_imports():
    graph = lib_imports()
    assert "lib.methods" in graph["lib.experiments"] and "lib.train" in graph["lib.methods.model_stock"]
    assert "lib.anchors" in graph["lib.methods.arf"] and "lib.models" in graph["lib.data.benchmark"]


def test_every_registered_method_lives_in_the_module_of_its_paper():
    where = {name: module for module, names in PAPERS.items() for name in names}
    registered = {**methods.METHODS, **methods.MODIFIERS}
    assert set(where) == set(registered) | set(methods.ALIASES), "a registry name missing from PAPERS (or gone)"
    for name, cls in registered.items():
        assert cls.__module__ == where[name], f"{name!r} is defined in {cls.__module__}, not {where[name]}"
    for name in methods.ALIASES:  # an alias is registered by a call alias("name", ...) in its paper's module
        source = (LIB.parent / (where[name].replace(".", "/") + ".py")).read_text()
        assert re.search(rf'alias\("{re.escape(name)}",', source), f"alias {name!r} is not made in {where[name]}"


def test_each_paper_module_names_its_notebook_and_primitives():
    notebooks = {"clipood": "01_clipood", "robust_ft": "02_robust_ft_swa", "arf": "03_arf_anchors",
                 "saft": "04_saft"}
    for module, notebook in notebooks.items():
        doc = ast.get_docstring(ast.parse((LIB / "methods" / f"{module}.py").read_text()))
        assert f"Notebook: {notebook}" in doc and "Primitives: lib." in doc, module

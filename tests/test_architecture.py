"""The package dependency rules of docs/architecture.md §9, checked on the import statements of every module:
which package may import which, a model that is plain PyTorch, and no import cycle anywhere."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

# package -> the project modules it may import (a prefix allows its submodules)
ALLOWED = {
    "config": (),
    "kernels": (),
    "model": ("config", "kernels"),
    "data_prep": ("config", "model.image_prep", "model.tokenizer", "model.vq"),
    "parallel": ("config", "model", "kernels"),
    "trainer": ("config", "model", "parallel", "data_prep.schema", "data_prep.megatron_reader"),
    "inference": ("config", "model", "data_prep.schema", "trainer.checkpoint_files", "trainer.checkpoint_weights"),
    "planner": ("config", "model", "kernels", "parallel", "trainer"),  # a tool above the library
}
PROJECT = set(ALLOWED) | {"examples", "tests", "benchmarks"}
ENGINE_IMPLEMENTATIONS = ("parallel.deepspeed_engine", "parallel.torch_engine")


def project_imports(path: Path) -> list[tuple[int, str]]:
    """(line, dotted module) of every import of a project module in `path`, lazy ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return [(line, m) for line, m in found if m.split(".")[0] in PROJECT]


def allowed(module: str, rules: tuple[str, ...]) -> bool:
    return any(module == r or module.startswith(r + ".") for r in rules)


def test_library_packages_import_only_what_the_rules_allow():
    broken = []
    for package, rules in ALLOWED.items():
        for path in sorted((REPO / package).rglob("*.py")):
            for line, module in project_imports(path):
                if module.split(".")[0] != package and not allowed(module, rules):
                    broken.append(f"{path.relative_to(REPO)}:{line} imports {module}")
    assert not broken, "\n".join(broken)


def test_only_the_engine_module_names_an_engine_implementation():
    """The trainer, checkpointer and converter talk to parallel.engine; only the registry
    (parallel.engines) and the engines' own tests import an implementation."""
    users = []
    for package in ALLOWED:
        for path in sorted((REPO / package).rglob("*.py")):
            rel = path.relative_to(REPO).with_suffix("").as_posix().replace("/", ".")
            if rel == "parallel.engines" or rel in ENGINE_IMPLEMENTATIONS:
                continue
            users += [f"{rel}:{line}" for line, m in project_imports(path) if allowed(m, ENGINE_IMPLEMENTATIONS)]
    assert not users, users


def test_the_rule_checker_sees_lazy_and_from_imports(tmp_path):
    """The checker itself: a lazy import inside a function and a from-import are both reported."""
    src = tmp_path / "m.py"
    src.write_text("import os\nfrom trainer.optim import x\n\ndef f():\n    import parallel.deepspeed_engine\n")
    assert project_imports(src) == [(2, "trainer.optim.x"), (5, "parallel.deepspeed_engine")]
    assert not allowed("trainer.optim.x", ALLOWED["parallel"])
    assert allowed("model.vq.load_vq", ALLOWED["data_prep"]) and not allowed("model.batch", ALLOWED["data_prep"])


# What parallel/ applies to the model from outside: the model's code never names it.
MODEL_MUST_NOT_IMPORT = ("deepspeed", "torch.distributed")
MODEL_MUST_NOT_NAME = ("DTensor", "ds_id", "deepspeed", "loss_parallel", "device_mesh")


def module_name(path: Path) -> str:
    return path.relative_to(REPO).with_suffix("").as_posix().replace("/", ".").removesuffix(".__init__")


def library_modules() -> dict[str, Path]:
    return {module_name(p): p for package in ALLOWED for p in sorted((REPO / package).rglob("*.py"))}


def module_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the project modules it imports (relative and lazy imports included; `from pkg import
    sub` depends on the submodule, not on the package's __init__)."""
    graph = {}
    for mod, path in modules.items():
        pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in modules:
                    t = t.rpartition(".")[0]
                if t and t != mod:
                    deps.add(t)
        graph[mod] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_inside_or_between_packages():
    graph = module_graph(library_modules())
    assert not cycles(graph), cycles(graph)
    packages = {p: set() for p in ALLOWED}
    for mod, deps in graph.items():
        packages[mod.split(".")[0]] |= {d.split(".")[0] for d in deps} - {mod.split(".")[0]}
    assert not cycles(packages), cycles(packages)


def test_model_is_plain_pytorch():
    """No engine, DTensor or DeepSpeed in model/: layouts are applied from parallel/."""
    found = []
    for path in sorted((REPO / "model").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            mods = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            found += [f"{path.relative_to(REPO)}:{node.lineno} imports {m}" for m in mods
                      if m.startswith(MODEL_MUST_NOT_IMPORT)]
            name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None
            if name is not None and any(bad.lower() in name.lower() for bad in MODEL_MUST_NOT_NAME):
                found.append(f"{path.relative_to(REPO)}:{node.lineno} names {name}")
    assert not found, "\n".join(found)


def test_the_cycle_checker_finds_a_cycle(tmp_path):
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []

"""The package dependency rules of docs/architecture.md §9, checked on the import statements of every module."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

# package -> the project modules it may import (a prefix allows its submodules)
ALLOWED = {
    "config": (),
    "kernels": (),
    "model": ("config", "kernels"),
    "data_prep": ("config", "model.image_prep", "model.vq", "model.tokenizer"),
    "parallel": ("config", "model", "kernels"),
    "trainer": ("config", "model", "parallel", "data_prep.schema", "data_prep.megatron_reader"),
    "inference": ("config", "model", "trainer.checkpoint_files", "parallel.engine"),
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
    """The trainer, checkpointer and converter talk to parallel.engine; only it (and the engines'
    own tests) import an implementation."""
    users = []
    for package in ALLOWED:
        for path in sorted((REPO / package).rglob("*.py")):
            rel = path.relative_to(REPO).with_suffix("").as_posix().replace("/", ".")
            if rel == "parallel.engine" or rel in ENGINE_IMPLEMENTATIONS:
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

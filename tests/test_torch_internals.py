"""The planner's private torch APIs (planner/torch_internals.py) exist in the installed torch."""

from __future__ import annotations

import ast

from planner import torch_internals
from tests.conftest import REPO

PRIVATE_TORCH = ("torch._", "torch.testing._internal", "torch.utils._python_dispatch", "torch.distributed._tools")


def test_every_private_torch_api_the_planner_uses_exists():
    problems = torch_internals.missing()
    assert not problems, "\n".join(problems)


def test_a_missing_internal_is_named_in_one_line(monkeypatch):
    monkeypatch.setattr(torch_internals, "INTERNALS", (
        ("torch.distributed.fsdp", "FSDPModule._no_such_method", "a test"),
        ("torch.no_such_module", "x", "a test"),
    ))
    lines = torch_internals.missing()
    assert len(lines) == 2 and all("\n" not in line for line in lines)
    assert "torch.distributed.fsdp.FSDPModule._no_such_method" in lines[0] and "checked against torch" in lines[0]
    assert "torch.no_such_module.x" in lines[1]


def test_only_torch_internals_imports_private_torch_modules():
    """Every other planner module takes torch's private names from planner/torch_internals.py."""
    found = []
    for path in sorted((REPO / "planner").glob("*.py")):
        if path.name == "torch_internals.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            mods = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            found += [f"{path.name}:{node.lineno} imports {m}" for m in mods if m.startswith(PRIVATE_TORCH)]
    assert not found, found

"""The layering import-linter cannot state (it forbids external packages whole, not torch.distributed): models/ and
data/ take rank and world size as integers and never import torch.distributed, even inside a function."""

from __future__ import annotations

import ast

import pytest

from tests.conftest import ROOT


def distributed_imports(path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        found += [f"{path}:{node.lineno} {n}" for n in names if n.startswith("torch.distributed")]
    return found


@pytest.mark.parametrize("package", ["models", "data"])
def test_no_torch_distributed(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files
    assert [hit for path in files for hit in distributed_imports(path)] == []


def test_the_check_sees_an_import(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from torch import distributed\n    import torch.distributed as dist\n")
    assert len(distributed_imports(probe)) == 2

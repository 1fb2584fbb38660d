"""The arrows between the layers go one way (docs: style): the data layer never imports the
model and jobs, and the model never imports the data layer."""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def imported_packages(path: str) -> set[str]:
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package, forbidden, files", [
    ("pipelines", "evl", None),
    ("evl", "pipelines", ("backbone.py", "decoder.py", "model.py")),
])
def test_imports_go_one_way(package, forbidden, files):
    folder = os.path.join(ROOT, package)
    names = files or sorted(n for n in os.listdir(folder) if n.endswith(".py"))
    offenders = [n for n in names if forbidden in imported_packages(os.path.join(folder, n))]
    assert not offenders, f"{package}/{offenders} import {forbidden}"

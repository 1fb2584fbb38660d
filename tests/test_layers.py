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


def test_encoding_workers_do_not_import_torch():
    """``evl.prepare`` and the demo writer encode videos in worker processes that import only
    their own module: importing torch there cost each worker seconds and hundreds of MB. The
    packages' public names import on first use."""
    import subprocess
    import sys

    import evl
    import pipelines

    code = "import sys, evl.prepare, evl.demo\nprint(sorted(m for m in ('torch', 'open_clip') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    assert evl.build_model.__module__ == "evl.model" and pipelines.PipelineConfig.__module__ == "pipelines.base"
    assert "build_model" in dir(evl) and "Batch" in dir(pipelines)
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        evl.nothing

"""Imports run one way: orchestrator -> workers -> models; models/ knows nothing of distribution or storage;
benchmarks/ (run on GPU machines without Ray or MLflow) sits beside orchestrator and imports neither."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "models": {"ray", "deepspeed", "mlflow", "s3fs", "fsspec", "pyarrow", "boto3", "workers", "orchestrator",
               "benchmarks"},
    "workers": {"orchestrator", "benchmarks"},
    "orchestrator": {"benchmarks"},
    "benchmarks": {"ray", "mlflow"},
}


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_run_one_way(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files
    offending = {str(f.relative_to(ROOT)): sorted(imported_modules(f) & FORBIDDEN[package]) for f in files}
    assert {f: m for f, m in offending.items() if m} == {}


def test_the_checker_sees_forbidden_imports(tmp_path):
    path = tmp_path / "x.py"
    path.write_text("import ray.train\nfrom deepspeed import init\nfrom . import local\n")
    assert imported_modules(path) == {"ray", "deepspeed"}

"""Imports run one way: orchestrator -> workers -> models; models/ knows nothing of distribution or storage, and
its math (the top level) and shared metrics know no teacher family; benchmarks/ (run on GPU machines without Ray
or MLflow) sits beside orchestrator and imports neither."""

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


def imported_modules(path: Path, depth: int = 1) -> set[str]:
    """The modules path imports, cut to their first depth dotted parts."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(".".join(alias.name.split(".")[:depth]) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # "from models import families" imports models.families
            names.update(".".join(f"{node.module}.{alias.name}".split(".")[:depth]) for alias in node.names)
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


def test_the_math_knows_no_family():
    """Flow conventions, losses, rollouts, sampling, the adapter interface and the shared metrics are what every
    family builds on: none of them imports one."""
    files = [*(ROOT / "models").glob("*.py"), *(ROOT / "models" / "metrics").rglob("*.py")]
    assert len(files) > 5
    assert [str(f.relative_to(ROOT)) for f in files if "models.families" in imported_modules(f, depth=2)] == []

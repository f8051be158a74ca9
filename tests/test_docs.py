"""The docs stand alone: every file a document or a docstring names is in the repository."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOP = ("models", "workers", "orchestrator", "tune_spaces", "tests", "benchmarks", "docs", "scripts")
# A path into the repository's folders, or a document cited by name (README.md, BENCHMARKS.md, ...; the
# lower-case .md names the commands write into run directories are outputs, not citations)
PATH = re.compile(r"(?<![\w/.<-])((?:%s)/[\w/.-]*\w|[A-Z][A-Z_-]*\.md)\b" % "|".join(TOP))


def _texts():
    for path in [*ROOT.glob("*.md"), *ROOT.glob("docs/*.md"), *ROOT.glob("orchestrator/recipes/*.yaml"),
                 *(p for top in TOP for p in (ROOT / top).rglob("*.py"))]:
        yield path, path.read_text()


def test_every_named_file_exists():
    missing = []
    for path, text in _texts():
        for name in PATH.findall(text):
            if "*" in name or "NAME" in name or name.endswith((".", "-")):  # patterns and placeholders
                continue
            if set(name.split("/")) <= set(TOP):  # a list of folders ("workers/models/orchestrator"), not a path
                continue
            if not ((ROOT / name).exists() or (ROOT / "docs" / name).exists()
                    or any(ROOT.glob(f"**/{name}") if "/" not in name else [])):
                missing.append(f"{path.relative_to(ROOT)}: {name}")
    assert not missing, "\n".join(missing)


def test_installs_pin_every_package_the_tests_passed_with_and_the_license_is_spdx():
    """scripts/dev installs with constraints-lock.txt: one exact version per package, the project's own
    dependencies among them, and neither torch (constraints-cpu.txt pins it without a GPU; a GPU machine keeps
    its own) nor the project itself."""
    import re
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0"  # an SPDX expression, not a table
    lines = [line for line in (ROOT / "constraints-lock.txt").read_text().splitlines()
             if line and not line.startswith("#")]
    pins = dict(line.split("==") for line in lines)
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+==[A-Za-z0-9.+!-]+", line) for line in lines), lines
    names = {re.split(r"[<>=!\[ ]", dep)[0].lower().replace("_", "-")
             for dep in project["dependencies"] + project["optional-dependencies"]["test"]}
    assert names - {"torch"} <= {name.lower().replace("_", "-") for name in pins}
    assert not {"torch", "dpdmd"} & {name.lower() for name in pins}
    assert "-c constraints-lock.txt" in (ROOT / "scripts" / "dev").read_text()

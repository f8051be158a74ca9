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

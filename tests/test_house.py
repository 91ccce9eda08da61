"""House rules that the linters do not state (import-linter checks modules, not names; ruff's
private-import rule lets a package's modules share private names): no module imports another
module's private names. What modules share is public, in a module of its own
(``retriever/kernels/common.py`` for the kernels)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECKED = ("chameleon", "coordinator", "fpga", "retriever", "benchmarks", "tests")


def private_imports(root: Path) -> list[str]:
    found = []
    for path in sorted(p for folder in CHECKED for p in (root / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module != "__future__":
                found += [
                    f"{path.relative_to(root)}:{node.lineno}: from {node.module} import {alias.name}"
                    for alias in node.names
                    if alias.name.startswith("_") and not alias.name.startswith("__")
                ]
    return found


def test_no_module_imports_another_modules_private_names(tmp_path):
    assert private_imports(ROOT) == []
    # and the check sees one when there is one
    (tmp_path / "retriever").mkdir()
    (tmp_path / "retriever" / "refine.py").write_text("from retriever.kernels.adc import _residual_table\n")
    assert private_imports(tmp_path) == ["retriever/refine.py:1: from retriever.kernels.adc import _residual_table"]


def test_the_readme_and_docs_link_only_to_files_of_the_repository():
    import re

    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    assert len(pages) > 5
    for page in pages:
        for target in re.findall(r"\]\(([^)]+)\)", page.read_text()):
            path = target.split("#")[0]
            assert "://" not in target and (page.parent / path).resolve().is_relative_to(ROOT), f"{page.name} links out: {target}"
            assert (page.parent / path).exists(), f"{page.name} links to {target}, which does not exist"

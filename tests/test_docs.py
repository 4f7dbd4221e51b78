"""docs/architecture.md stays true to the tree: every file it names exists, the README links it."""

from __future__ import annotations

import re

from tests.conftest import REPO

DOC = REPO / "docs" / "architecture.md"
PACKAGES = ["app", "app/routes", "contract", "model", "training"]


def test_every_module_the_design_document_names_exists():
    names = set(re.findall(r"`([\w/]+\.py)`", DOC.read_text()))
    assert len(names) > 20
    missing = [n for n in sorted(names) if not (REPO / n).is_file()
               and not any((REPO / p / n).is_file() for p in PACKAGES)]
    assert not missing, f"docs/architecture.md names modules that do not exist: {missing}"


def test_the_readme_links_the_design_document_inside_the_repository():
    readme = (REPO / "README.md").read_text()
    assert "](docs/architecture.md)" in readme
    assert "../shared" not in readme  # a clone has nothing outside the repository

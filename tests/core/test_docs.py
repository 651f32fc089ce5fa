"""The docs point at things that exist: every relative Markdown link (and its #section), and every repo path a doc
names (in backticks or in prose, e.g. `training/models.py` or "see nodes/apply.py"), in every tracked *.md file.

A path counts as a repo path when it starts with one of the repo's own top-level folders or files; paths with
placeholders (`runs/<name>/`, `step_*`, `$VAR`) and files that runs create (outputs/, runs/) are not checked.
"""

import re
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
TOP = ("hyperalign", "nodes", "training", "tests", "scripts", "docs", "web", "benchmarks", "example_workflows", ".ci")
TOP_FILES = ("README.md", "pyproject.toml", "requirements.txt", "LICENSE", "__init__.py", "node_list.json")
_DIRS, _FILES = "|".join(map(re.escape, TOP)), "|".join(map(re.escape, TOP_FILES))
PATH = re.compile(rf"(?<![\w./-])((?:{_DIRS})/[\w./-]*[\w/]|(?:{_FILES}))(?![\w/-])")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.M)
FENCE = re.compile(r"^```.*?^```", re.M | re.S)


def markdown_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "*.md"], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    return [REPO_ROOT / line for line in listed.stdout.split() if "node_modules" not in line]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to '-'."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", text))


def anchors(path: Path) -> set[str]:
    return {slug(h) for h in HEADING.findall(FENCE.sub("", path.read_text()))}


def broken_links(doc: Path) -> list[str]:
    broken = []
    for target in LINK.findall(doc.read_text()):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        file_part, _, section = target.partition("#")
        path = (doc.parent / file_part).resolve() if file_part else doc
        if not path.exists():
            broken.append(f"{target} (no such file)")
        elif section and path.suffix == ".md" and section not in anchors(path):
            broken.append(f"{target} (no section #{section} in {path.relative_to(REPO_ROOT)})")
    return broken


def missing_paths(doc: Path) -> list[str]:
    missing = []
    for line in doc.read_text().splitlines():
        for path in PATH.findall(line):
            if re.search(r"[<>*{}$]", line[line.find(path) : line.find(path) + len(path) + 1]):
                continue  # a placeholder or a glob right after it
            if not (REPO_ROOT / path.rstrip("/")).exists():
                missing.append(path)
    return sorted(set(missing))


DOCS = markdown_files()


def test_there_are_docs_to_check():
    assert {"README.md", "docs/architecture.md", "training/README.md"} <= {str(p.relative_to(REPO_ROOT)) for p in DOCS}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_links_and_sections_exist(doc):
    assert broken_links(doc) == []


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_named_repo_paths_exist(doc):
    assert missing_paths(doc) == []


def test_the_checks_can_fail(tmp_path):
    doc = REPO_ROOT / "docs" / ".test_docs_probe.md"
    doc.write_text(
        "[a](architecture.md#no-such-section) [b](nope.md) see `training/no_such.py` and hyperalign/lora.py\n"
    )
    try:
        assert broken_links(doc) == [
            "architecture.md#no-such-section (no section #no-such-section in docs/architecture.md)",
            "nope.md (no such file)",
        ]
        assert missing_paths(doc) == ["training/no_such.py"]
    finally:
        doc.unlink()

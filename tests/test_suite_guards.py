"""Guards on the suite itself: the repository is self-contained. Reference data lives in
``tests/data`` (each file's origin and license in its README.md), and no source file reads
anything from a folder beside the checkout."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
SOURCE_SUFFIXES = (".py", ".ipynb", ".sh", ".toml")
# Spelled in two halves so that this file does not match its own patterns.
OUTSIDE = re.compile(re.escape("..") + "/shared" + "|" + "/shared" + "/data")


def source_files() -> list[Path]:
    """Tracked and new (not ignored) files with a source suffix or a ``#!`` first line."""
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout
    files = []
    for name in filter(None, out.split("\0")):
        path = ROOT / name
        if not path.is_file():
            continue  # deleted in the work tree
        if path.suffix in SOURCE_SUFFIXES:
            files.append(path)
        elif not path.suffix:
            with path.open("rb") as f:
                if f.read(2) == b"#!":
                    files.append(path)
    return files


def outside_references(files: list[Path]) -> list[tuple[Path, int, str]]:
    """``(path, line number, line)`` of every line that names the shared folder beside the
    checkout."""
    hits = []
    for path in files:
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if OUTSIDE.search(line):
                hits.append((path, n, line.strip()))
    return hits


def test_no_source_file_reads_outside_the_repository():
    files = source_files()
    assert any(p.name == "conftest.py" for p in files) and any(
        p.suffix == ".ipynb" for p in files), "the file listing missed the sources"
    hits = [f"{p.relative_to(ROOT)}:{n}: {line}" for p, n, line in outside_references(files)]
    assert not hits, "files read data from beside the repository (use tests/data):\n" + "\n".join(
        hits)


def test_the_pattern_catches_both_spellings(tmp_path):
    planted = tmp_path / "planted.py"
    planted.write_text("a = ROOT.parent / 'x'\nb = '../" + "shared/data/x.csv'\nc = '/srv/"
                       + "shared/data'\n")
    assert [n for _, n, _ in outside_references([planted])] == [2, 3]


def test_reference_data_is_in_the_repository_with_its_origins(reference_data):
    """Every data file in ``tests/data`` is described in its README (origin, license), and
    every file the README's table names is there."""
    assert reference_data == DATA
    readme = (DATA / "README.md").read_text()
    files = sorted(p.name for p in DATA.iterdir() if p.name != "README.md")
    listed = sorted(set(re.findall(r"^\| `([^`]+)` \|", readme, flags=re.MULTILINE)))
    assert files == listed
    assert {"chinchilla_svg_extracted.csv", "erk_reference.json", "frantar_sparse_t5.csv",
            "frantar_sparse_vit.json"} <= set(files)
    for name in files:
        row = next(line for line in readme.splitlines() if line.startswith(f"| `{name}` |"))
        assert row.count("|") == 5 and row.split("|")[4].strip(), f"{name}: no license column"


DESIGN = ROOT / "docs" / "design.md"
# A citation: the notes' path, then the section's heading in double quotes (a comma, backticks,
# a line break, a comment's '#' optional; escaped quotes inside notebooks).
CITATION = re.compile(r'docs/design\.md`?,?\s*(?:#\s*)?\\?"([^"\\]+)\\?"')


def design_citations(files: list[Path]) -> list[tuple[Path, str]]:
    """``(file, section)`` for every citation of a design-notes section in ``files``."""
    return [(path, " ".join(m.group(1).split())) for path in files
            for m in CITATION.finditer(path.read_text(errors="replace"))]


def test_design_citations_name_sections_of_the_design_notes():
    headings = {line.lstrip("#").strip() for line in DESIGN.read_text().splitlines()
                if line.startswith(("## ", "### "))}
    this = Path(__file__).resolve()
    files = [p for p in source_files() + [ROOT / "README.md", DATA / "README.md"]
             if p not in (DESIGN, this)]
    cited = design_citations(files)
    assert len(cited) >= 10, cited  # the library, scaling and benchmarks cite the notes
    missing = sorted({f"{p.relative_to(ROOT)}: {s!r}" for p, s in cited if s not in headings})
    assert not missing, "citations of sections docs/design.md does not have:\n" + "\n".join(
        missing)


def test_the_citation_pattern_reads_every_spelling(tmp_path):
    planted = tmp_path / "planted.py"
    planted.write_text('a (docs/design.md, "Core\ncontracts")\nb docs/design.md "Data"\n'
                       'c `docs/design.md`, \\"Scaling\\"\n# d docs/design.md,\n# "Kernels"\n')
    assert [s for _, s in design_citations([planted])] == ["Core contracts", "Data", "Scaling",
                                                           "Kernels"]

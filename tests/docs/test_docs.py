"""The documentation's links hold: every relative link of README.md, BENCHMARKS.md, CHANGELOG.md
and docs/*.md points to a file that exists, and every ``#anchor`` to a heading of the target
(GitHub's slugs) or to an explicit ``<a id="...">`` there; the README stays short."""
import re
from pathlib import Path

import pytest
from tests.helpers import ROOT

README_MAX_LINES = 320

LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
EXPLICIT = re.compile(r"<a\s+(?:id|name)=\"([^\"]+)\"")
CODE_SPAN = re.compile(r"(`+).*?\1")


def doc_files(root: Path = ROOT) -> list[Path]:
    names = [root / "README.md", root / "BENCHMARKS.md", root / "CHANGELOG.md"]
    return [p for p in names if p.exists()] + sorted((root / "docs").glob("*.md"))


def prose_lines(text: str):
    """(line number, line) of the lines outside fenced and indented code blocks."""
    fenced = indented = False
    previous_blank = True
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
            continue
        if fenced:
            continue
        blank = not line.strip()
        if line.startswith("    ") and not blank and (previous_blank or indented):
            indented = True
        elif not blank:
            indented = False
        previous_blank = blank
        if not indented and not blank:
            yield number, line


def slug(title: str) -> str:
    """GitHub's heading anchor: the rendered text lowercased, punctuation but hyphens and
    underscores dropped, spaces turned to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", title)  # a link renders as its text
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor a link may name in ``path``: heading slugs (repeats get -1, -2, ... as on
    GitHub) and explicit ``<a id>`` / ``<a name>`` anchors."""
    found, seen = set(), {}
    text = path.read_text(encoding="utf-8")
    for _, line in prose_lines(text):
        found.update(EXPLICIT.findall(line))
        match = HEADING.match(line)
        if match:
            base = slug(match.group(2))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def broken_links(files, root: Path = ROOT) -> list[str]:
    """One line per link of ``files`` whose file or anchor does not exist."""
    problems, cache = [], {}
    for path in files:
        for number, line in prose_lines(path.read_text(encoding="utf-8")):
            for target in LINK.findall(CODE_SPAN.sub(lambda m: m.group(0).replace("](", "] ("), line)):
                if re.match(r"^[a-z][a-z0-9+.-]*:", target, flags=re.I):  # http:, https:, mailto:
                    continue
                file_part, _, anchor = target.partition("#")
                dest = (path.parent / file_part).resolve() if file_part else path
                where = f"{path.relative_to(root)}:{number}: {target}"
                if not dest.exists():
                    rel = dest.relative_to(root).as_posix() if dest.is_relative_to(root) else str(dest)
                    problems.append(f"{where}: no file {rel}")
                    continue
                if anchor and dest.is_file():
                    if dest not in cache:
                        cache[dest] = anchors(dest)
                    if anchor not in cache[dest]:
                        problems.append(f"{where}: no heading or <a id> '{anchor}' in {dest.name}")
    return problems


def test_docs_exist():
    names = {p.relative_to(ROOT).as_posix() for p in doc_files()}
    assert {"README.md", "BENCHMARKS.md", "CHANGELOG.md"} <= names
    assert any(name.startswith("docs/") for name in names)


def test_every_relative_link_resolves():
    problems = broken_links(doc_files())
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, \
        f"README.md has {lines} lines (at most {README_MAX_LINES}): move reference to docs/"


@pytest.mark.parametrize("title, expected", [
    ("Real data (CamVid)", "real-data-camvid"),
    ("Metrics: three protocols, always all", "metrics-three-protocols-always-all"),
    ("Pasted OOD splits for tuning (`python -m obsnet.paste`)",
     "pasted-ood-splits-for-tuning-python--m-obsnetpaste"),
    ("ONNX export (2026-12-02)", "onnx-export-2026-12-02"),
    ("The original project's commands", "the-original-projects-commands"),
    ("snake_case and [a link](x.md)", "snake_case-and-a-link"),
])
def test_slug_follows_github(title, expected):
    assert slug(title) == expected


def test_checker_finds_broken_links(tmp_path):
    """The check can fail: a missing file, a missing anchor and a missing in-page anchor are each
    reported; links inside code, external links and good anchors are not."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text(
        "# Title A\n\n## Part: two\n\n<a id=\"kept\"></a>**Bold.** text\n")
    readme = tmp_path / "README.md"
    readme.write_text(
        "# Top\n\n"
        "[ok](docs/a.md) [ok](docs/a.md#part-two) [ok](docs/a.md#kept) [ok](#top) "
        "[ext](https://example.org/x#y)\n"
        "[gone](docs/missing.md) [bad](docs/a.md#nowhere) [self](#absent)\n\n"
        "    [in code](docs/not-checked.md)\n\n"
        "`[span](docs/not-checked-either.md)`\n")
    problems = broken_links([readme, tmp_path / "docs" / "a.md"], root=tmp_path)
    assert len(problems) == 3, problems
    assert "no file docs/missing.md" in problems[0]
    assert "'nowhere' in a.md" in problems[1]
    assert "'absent' in README.md" in problems[2]

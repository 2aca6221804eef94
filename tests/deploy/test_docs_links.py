"""README.md and docs/ point only at things that exist: links, anchors and repository paths in backticks.

A relative link `[text](path#anchor)` must name an existing file or folder (relative to the page), and its anchor
a heading of the target page (GitHub's anchor rule). A backticked span that looks like a repository path (no
spaces, its first component a top-level entry of the repository, or a folder of `remix_serve/` or
`remix_serve/vllm_plugin/`, as the docs write them) must exist. Tests are looked up by file name anywhere under
`tests/`, so the docs stay valid whichever folder of `tests/` a test lives in; a bare `name.py` must exist
somewhere in the source. Paths of other projects (`vllm/...`), URLs, routes (`/v1/...`) and patterns (`*`, `{}`)
are not checked. README.md also has a size limit: it is the front page, the rest belongs in docs/.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent
while not (ROOT / "pyproject.toml").is_file():
    ROOT = ROOT.parent
README_LIMIT = 8192  # bytes
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SOURCE_DIRS = ("remix_serve", "bench", "tests", "scripts", "examples")
# Where a path in backticks may start: the repository root, or the package folders the docs abbreviate.
PATH_BASES = (ROOT, ROOT / "remix_serve", ROOT / "remix_serve" / "vllm_plugin")

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
CODE = re.compile(r"`([^`\n]+)`")
PATHLIKE = re.compile(r"^[\w.\-/]+$")


def prose_lines(text: str) -> list[str]:
    """The page's lines outside fenced code blocks."""
    out, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            out.append(line)
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in prose_lines(page.read_text()):
        m = re.match(r"^#{1,6}\s+(.*)$", line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def link_problems(page: Path) -> list[str]:
    problems = []
    for line in prose_lines(page.read_text()):
        for target in LINK.findall(CODE.sub("", line)):
            if re.match(r"^[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                problems.append(f"{page.name}: link to missing {target}")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                problems.append(f"{page.name}: link {target}: no heading #{anchor} in {dest.name}")
    return problems


def _in_tests(name: str) -> bool:
    return any(p.name == name for p in (ROOT / "tests").rglob(name))


def _in_source(name: str) -> bool:
    return any(any((ROOT / d).rglob(name)) for d in SOURCE_DIRS)


def path_problems(page: Path) -> list[str]:
    problems = []
    for line in prose_lines(page.read_text()):
        for span in CODE.findall(line):
            span = span.strip()
            if not PATHLIKE.match(span) or span.startswith(("/", "..")):
                continue
            parts = span.rstrip("/").split("/")
            if len(parts) == 1:
                if span.endswith(".py") and not (_in_tests(span) if span.startswith("test_") else _in_source(span)):
                    problems.append(f"{page.name}: `{span}` is no file of the repository")
                continue
            if parts[0] == "tests":
                if not _in_tests(parts[-1]):
                    problems.append(f"{page.name}: `{span}` is not under tests/")
                continue
            bases = [b for b in PATH_BASES if (b / parts[0]).exists()]
            if bases and not any((b / span).exists() for b in bases):
                problems.append(f"{page.name}: `{span}` does not exist")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_links_and_anchors_resolve(page: Path) -> None:
    assert link_problems(page) == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_repository_paths_exist(page: Path) -> None:
    assert path_problems(page) == []


def test_readme_is_a_front_page() -> None:
    size = (ROOT / "README.md").stat().st_size
    assert size <= README_LIMIT, f"README.md is {size} bytes; move detail into docs/ (limit {README_LIMIT})"
    text = (ROOT / "README.md").read_text()
    assert "make serve" in text and "make test" in text
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f"docs/{page.name}" in text, f"README does not link docs/{page.name}"


def test_shown_commands_name_what_exists() -> None:
    """`make X` targets, `--preset X` presets and `bench/`/`scripts/` commands that the pages show exist, and
    README's `docker run` lines are the ones docs/deployment.md documents."""
    from remix_serve.train.args import PRESETS

    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), flags=re.M))
    deployment = (ROOT / "docs" / "deployment.md").read_text()
    for page in PAGES:
        text = page.read_text()
        for target in re.findall(r"(?:^|`)make ([a-z][\w-]*)", text, flags=re.M):
            assert target in targets, f"{page.name}: make {target} is no Makefile target"
        for preset in re.findall(r"--preset ([a-z]\w*)", text):
            assert preset in PRESETS, f"{page.name}: --preset {preset} is not in train.args.PRESETS"
        for script in re.findall(r"\b((?:bench|scripts|examples)/[\w/]+\.(?:py|sh))\b", text):
            assert (ROOT / script).is_file(), f"{page.name}: {script} does not exist"
    readme = (ROOT / "README.md").read_text()
    runs = re.findall(r"^docker run .*(?:\\\n.*)*", readme, flags=re.M)
    assert len(runs) == 2
    for run in runs:
        assert run in deployment, f"README's docker run line differs from docs/deployment.md: {run}"


def test_checker_catches_broken_links(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    (tmp_path / "other.md").write_text("# Other\n\n## A heading\n")
    page.write_text(
        "# Page\n\n[ok](other.md#a-heading) [gone](missing.md) [bad anchor](other.md#nope) [self](#page)\n"
        "`remix_serve/routing.py` `remix_serve/no_such.py` `vllm_plugin/bank.py` `vllm_plugin/nope.py`\n"
        "`tests/test_docs_links.py` `tests/test_nope.py` `vllm/platforms/cpu.py` `/v1/models`\n"
        "```\n[in code](missing-too.md)\n```\n"
    )
    assert link_problems(page) == [
        "page.md: link to missing missing.md",
        "page.md: link other.md#nope: no heading #nope in other.md",
    ]
    assert path_problems(page) == [
        "page.md: `remix_serve/no_such.py` does not exist",
        "page.md: `vllm_plugin/nope.py` does not exist",
        "page.md: `tests/test_nope.py` is not under tests/",
    ]

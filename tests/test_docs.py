"""The documentation stays a short README plus docs/, true to the tree.

- README.md fits in a few screens (at most README_MAX_LINES lines) and
  links every page of docs/;
- every relative link in README.md and docs/*.md points at a file inside
  the repository (and, for a `#section` link to a Markdown file, at one of
  its headings);
- every module path (`trainer/online.py`) and dotted name
  (`freshtower.trainer.retrieval.build_index`) quoted in the docs exists;
- no tracked file points outside the repository or speaks of the
  project's history instead of the system (history belongs in git).
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
README_MAX_LINES = 220
DOC_PAGES = sorted((ROOT / "docs").glob("*.md"))
DOCUMENTS = [README, *DOC_PAGES]

# Text that refers to something a user who cloned the repository does not
# have: files outside it, or the tracker and notes the work was organised in.
OUTSIDE_PATHS = [r"\.\./shared\b", r"(?<![\w.])/work/", r"\bshared/(design|ENVIRONMENT|STYLE)\.md\b"]
HISTORY_PHRASES = [
    r"\bthis stop\b",
    r"\bclosing notes?\b",
    r"\bas issue\b",
    r"\bissue #?\d+",
    r"\bticket #?\d+",
    r"\bthe issue (was|is) silent\b",
    r"\bwhere the brief\b",
    r"\bother engineers?\b",
    r"\bother people'?s test",
    r"\b(in|within) this session\b",
]
SKIPPED_DIRS = {".git", ".venv", "build", "dist", "__pycache__", ".pytest_cache", "freshtower-data", "node_modules"}


def _tracked_files() -> list[Path]:
    """The repository's files (tracked, and new ones git does not ignore) in
    a checkout; elsewhere a walk that skips build outputs and environments."""
    try:
        command = ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"]
        listed = subprocess.run(command, cwd=ROOT, capture_output=True, check=True, timeout=30).stdout.decode()
        return sorted(ROOT / name for name in listed.split("\0") if name and (ROOT / name).is_file())
    except (OSError, subprocess.SubprocessError):
        files = []
        for directory, dirs, names in os.walk(ROOT):
            dirs[:] = [d for d in dirs if d not in SKIPPED_DIRS and not d.endswith(".egg-info")]
            files.extend(Path(directory) / name for name in names)
        return sorted(files)


@lru_cache(maxsize=None)
def _text_files() -> tuple[tuple[Path, str], ...]:
    texts = []
    for path in _tracked_files():
        try:
            texts.append((path, path.read_text(encoding="utf-8")))
        except (UnicodeDecodeError, OSError):
            continue  # binary
    return tuple(texts)


def _without_code_blocks(markdown: str) -> str:
    """Markdown with fenced code blocks blanked (lines kept, so numbers stay)."""
    out, fenced = [], False
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            out.append("")
        else:
            out.append("" if fenced else line)
    return "\n".join(out)


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped,
    spaces to hyphens.

    >>> github_slug("Delivery: at-least-once, idempotent sinks")
    'delivery-at-least-once-idempotent-sinks'
    >>> github_slug("`freshtower run` and the other commands")
    'freshtower-run-and-the-other-commands'
    """
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(markdown: str) -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    for line in _without_code_blocks(markdown).splitlines():
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        slug = github_slug(match.group(1))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def _links(markdown: str) -> list[tuple[int, str]]:
    return [
        (number, match.group(1))
        for number, line in enumerate(_without_code_blocks(markdown).splitlines(), 1)
        for match in LINK.finditer(line)
    ]


def test_readme_is_a_short_front_door():
    text = README.read_text()
    lines = len(text.splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; keep it to {README_MAX_LINES} and move depth to docs/"
    assert "make run" in text and "make test" in text, "README.md must give the two commands"


def test_readme_links_every_page_of_docs():
    linked = {target.split("#")[0] for _, target in _links(README.read_text())}
    missing = [f"docs/{page.name}" for page in DOC_PAGES if f"docs/{page.name}" not in linked]
    assert DOC_PAGES, "docs/ holds no pages"
    assert not missing, f"README.md does not link {missing}"


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_at_files_in_the_repository(document):
    problems = []
    for number, target in _links(document.read_text()):
        where = f"{document.relative_to(ROOT)}:{number}: {target}"
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path_part, _, anchor = target.partition("#")
        linked = (document.parent / path_part).resolve() if path_part else document
        try:
            linked.relative_to(ROOT)
        except ValueError:
            problems.append(f"{where} leaves the repository")
            continue
        if not linked.exists():
            problems.append(f"{where} does not exist")
            continue
        if anchor and linked.suffix == ".md" and anchor not in _anchors(linked.read_text()):
            problems.append(f"{where}: {linked.relative_to(ROOT)} has no heading #{anchor}")
    assert not problems, "\n".join(problems)


CODE_SPAN = re.compile(r"`([^`\n]+)`")
FILE_PATH = re.compile(r"^[\w.-]+(/[\w.-]+)+\.(py|md|toml|yml|yaml)(::\w+)?$")
DOTTED_NAME = re.compile(r"^freshtower(\.\w+)+$")


def _resolves(dotted: str) -> bool:
    """A module, or an attribute of the longest importable module prefix."""
    parts = dotted.split(".")
    for cut in range(len(parts), 1, -1):
        try:
            target = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attribute in parts[cut:]:
            if not hasattr(target, attribute):
                return False
            target = getattr(target, attribute)
        return True
    return False


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_paths_and_names_quoted_in_the_docs_exist(document):
    problems = []
    for number, line in enumerate(_without_code_blocks(document.read_text()).splitlines(), 1):
        for span in CODE_SPAN.findall(line):
            where = f"{document.relative_to(ROOT)}:{number}: `{span}`"
            if FILE_PATH.match(span):
                path, _, test_name = span.partition("::")
                if not (ROOT / path).is_file():
                    problems.append(f"{where}: no such file")
                elif test_name and f"def {test_name}(" not in (ROOT / path).read_text():
                    problems.append(f"{where}: no function {test_name} in {path}")
            elif DOTTED_NAME.match(span) and not _resolves(span):
                problems.append(f"{where}: does not import")
    assert not problems, "\n".join(problems)


def _hits(patterns: list[str]) -> list[str]:
    compiled = [re.compile(p, re.IGNORECASE) for p in patterns]
    this_file = Path(__file__).resolve()
    hits = []
    for path, text in _text_files():
        if path.resolve() == this_file:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if any(p.search(line) for p in compiled):
                hits.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:120]}")
    return hits


def test_no_file_refers_to_a_path_outside_the_repository():
    hits = _hits(OUTSIDE_PATHS)
    assert not hits, "paths outside the repository:\n" + "\n".join(hits)


def test_no_file_speaks_of_issues_stops_or_sessions_of_work():
    hits = _hits(HISTORY_PHRASES)
    assert not hits, "history belongs in git, not in the tree:\n" + "\n".join(hits)


def test_docs_pages_named_in_the_tree_exist():
    missing = []
    for path, text in _text_files():
        for number, line in enumerate(text.splitlines(), 1):
            for name in re.findall(r"(?<![\w/])docs/[\w-]+\.md\b", line):
                if not (ROOT / name).is_file():
                    missing.append(f"{path.relative_to(ROOT)}:{number}: {name}")
    assert not missing, "\n".join(missing)

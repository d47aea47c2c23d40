"""Code, docs and scripts give their reasons in words: tracked text cites no issue, ticket or
pull-request number (CHANGELOG.md, which lists changes by version, and this file's examples are not
scanned).

A number after ``#`` that is a C preprocessor line, a comment, a colour or a link anchor is fine.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SUFFIXES = {".py", ".md", ".sh", ".yaml", ".yml", ".toml", ".c", ".h", ".txt"}
EXEMPT = {"CHANGELOG.md", "tests/test_no_tracker_numbers.py"}  # this file holds examples of what it finds

TRACKER_NUMBER = re.compile(
    r"\b(?:issues?|items?|tickets?|PRs?|pull requests?)\s*#?\d+\b|(?<![\w&/#])#\d{1,4}\b(?![\w-])", re.I
)


def find_tracker_numbers(text: str) -> list[tuple[int, str]]:
    """(line number, matched text) for every tracker number in ``text``."""
    return [(number, m.group(0)) for number, line in enumerate(text.splitlines(), 1) for m in TRACKER_NUMBER.finditer(line)]


def tracked_text_files() -> list[str]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [p for p in out.splitlines() if Path(p).suffix in SUFFIXES and p not in EXEMPT and (ROOT / p).is_file()]


@pytest.mark.parametrize("text", ["added for issue 14", "see #14 for why", "as item 10 says", "fixed by PR 7", "Issue #3"])
def test_tracker_numbers_are_found(text: str) -> None:
    assert find_tracker_numbers(text), text


@pytest.mark.parametrize(
    "text",
    [
        "#include <stdint.h>",
        "x = a[0]  # 1 entry per block",
        "color #fff",
        "html anchor [x](#multi-gpu-ddp)",
        "the 14 issues of a tokenizer",
        "items are 4 bytes wide",
    ],
)
def test_other_numbers_pass(text: str) -> None:
    assert not find_tracker_numbers(text), find_tracker_numbers(text)


def test_tracked_text_cites_no_tracker_number() -> None:
    offenders = []
    for path in tracked_text_files():
        text = (ROOT / path).read_text(encoding="utf-8", errors="replace")
        offenders += [f"{path}:{line}: {match!r}" for line, match in find_tracker_numbers(text)]
    assert not offenders, "tracker numbers in tracked text (give the reason in words):\n" + "\n".join(offenders)

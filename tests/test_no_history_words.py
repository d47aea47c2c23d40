"""The project speaks only of itself: tracked text names no sessions, agents, leads, worktrees, lent
machines or tracker numbers as the reason for code. History goes to CHANGELOG.md (not scanned).

The patterns aim at the organisational sense only: a helper function, a pytest session fixture, a mask
"re-drawn every interval steps" or a buffer "lent and returned" are fine.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SUFFIXES = {".py", ".md", ".sh", ".yaml", ".yml", ".toml", ".c", ".h", ".txt"}
EXEMPT = {"CHANGELOG.md", "tests/test_no_history_words.py"}

_NEAR = r"[^.\n]{0,40}?"
_MACHINE = r"(?:machines?|GPUs?|devices?|accelerators?|sessions?|tasks?|project)"
PATTERNS: dict[str, re.Pattern[str]] = {
    # "session" in pytest's sense (test session, session-scoped fixtures, sessionstart) is allowed.
    "session": re.compile(
        r"(?<!test )(?<!pytest )(?<![\w\"'(-])sessions?\b(?!\s*[-_]?\s*(?:scope|start|finish|fixture))(?![\")]|\.\w)",
        re.I,
    ),
    "agent": re.compile(r"\bagents?\b", re.I),
    "helper (a person)": re.compile(r"\bhelpers?(?:'s)?\s+(?:sessions?|agents?)\b|\(helpers?\)", re.I),
    "lead (a person)": re.compile(r"\b(?:the|a|our)\s+lead(?:'s)?\b(?!\s+(?:to|time|in|up|into)\b)", re.I),
    "worktree": re.compile(r"\bwork[- ]?trees?\b", re.I),
    "lent or drawn machine": re.compile(
        rf"\b(?:lent|drawn)\b{_NEAR}\b{_MACHINE}\b|\b{_MACHINE}\b{_NEAR}\b(?:lent|drawn)\b", re.I
    ),
    "tracker number": re.compile(
        r"\b(?:issues?|items?|tickets?|PRs?|pull requests?)\s*#?\d+\b|(?<![\w&/#])#\d{1,4}\b(?![\w-])", re.I
    ),
}


def find_history_words(text: str) -> list[tuple[int, str, str]]:
    """(line number, pattern name, matched text) for every match in ``text``."""
    hits = []
    for number, line in enumerate(text.splitlines(), 1):
        for name, pattern in PATTERNS.items():
            hits += [(number, name, m.group(0)) for m in pattern.finditer(line)]
    return hits


def tracked_text_files() -> list[str]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [p for p in out.splitlines() if Path(p).suffix in SUFFIXES and p not in EXEMPT and (ROOT / p).is_file()]


@pytest.mark.parametrize(
    "text",
    [
        "measured in the previous session",
        "three other agents were working",
        "the GPU was not lent to this project",
        "this task was not drawn for a device machine",
        "no device machine was lent",
        "cleaned by the lead when merging",
        "the helper session's branch",
        "**gmt_momentum** (helper): the EMA",
        "the docs worktree",
        "added for issue 14",
        "see #14 for why",
        "item 10 of the brief",
        "Sessions' loaded runs",
    ],
)
def test_organisational_words_are_found(text: str) -> None:
    assert find_history_words(text), text


@pytest.mark.parametrize(
    "text",
    [
        "a helper that packs the bits",
        "def helper(x):",
        "@pytest.fixture(scope=\"session\")",
        "once per test session",
        "pytest_sessionstart(session)",
        "the frozen half is re-drawn every stage of interval steps",
        "histograms live in a scratch buffer lent and returned zeroed",
        "layers drawn uniformly without replacement",
        "this leads to a smaller mask; the lead time is short",
        "#include <stdint.h>",
        "x = a[0]  # 1 entry per block",
        "color #fff",
        "html anchor [x](#multi-gpu-ddp)",
    ],
)
def test_ordinary_words_pass(text: str) -> None:
    assert not find_history_words(text), find_history_words(text)


def test_tracked_text_speaks_only_of_the_project() -> None:
    offenders = []
    for path in tracked_text_files():
        text = (ROOT / path).read_text(encoding="utf-8", errors="replace")
        offenders += [f"{path}:{line}: {name}: {match!r}" for line, name, match in find_history_words(text)]
    assert not offenders, "words about how the work was organised:\n" + "\n".join(offenders)

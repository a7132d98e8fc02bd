"""What every benchmark shares: its own section of BENCHMARKS.md and the machine it ran on.

Each benchmark owns one section between `<!-- NAME:begin -->` and `<!-- NAME:end -->`; writing it
replaces only that section, so benchmarks run separately do not overwrite each other's results.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from machine import describe

__all__ = ["describe", "markers", "write_section"]


def markers(name: str) -> tuple[str, str]:
    """The begin and end markers of benchmark `name`'s section (HTML comments: invisible)."""
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def write_section(path: Path, name: str, lines: list[str]) -> None:
    """Replace benchmark `name`'s section of the markdown file, keeping every other section;
    a section seen for the first time is appended (the file is created if missing)."""
    begin, end = markers(name)
    section = "\n".join([begin, *lines, end]) + "\n"
    text = path.read_text() if path.exists() else "# Benchmarks\n\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + section + rest.split(end, 1)[1].lstrip("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)

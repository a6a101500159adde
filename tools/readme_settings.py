"""Writes the README's configuration table from the settings' declarations (embedserve.settings).

Usage: python tools/readme_settings.py     (tests/unit/test_settings_table.py checks it is current)
"""

from __future__ import annotations

import re
from pathlib import Path

from embedserve.settings import markdown_table

README = Path(__file__).resolve().parent.parent / "README.md"
BEGIN, END = "<!-- settings table: begin (python tools/readme_settings.py) -->", "<!-- settings table: end -->"
BLOCK = re.compile(re.escape(BEGIN) + r"\n(.*?)" + re.escape(END), re.DOTALL)


def readme_table(text: str) -> str:
    """The table between the markers in the README's text."""
    found = BLOCK.search(text)
    if found is None:
        raise SystemExit(f"{README} has no settings table markers ({BEGIN} ... {END})")
    return found.group(1)


def main() -> None:
    """Replaces the README's table with the one the declarations give."""
    text = README.read_text()
    readme_table(text)  # fails when the markers are missing
    README.write_text(BLOCK.sub(lambda _: f"{BEGIN}\n{markdown_table()}{END}", text))


if __name__ == "__main__":
    main()

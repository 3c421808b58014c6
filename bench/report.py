"""Writing benchmark tables into markdown files under docs/, one `## section` per benchmark."""
from __future__ import annotations

import re
from pathlib import Path


def write_section(path: str | Path, title: str, body: str) -> None:
    """Replace (or append) the section `## title` of a markdown file with `body`."""
    path = Path(path)
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    section = f"## {title}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text).rstrip() + "\n"
    else:
        text = text.rstrip() + "\n\n" + section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)

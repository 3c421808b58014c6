"""Writing benchmark tables into markdown files under docs/, one `## section` per benchmark."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
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


def run_at_revision(ref: str, bench_file: str | Path, args: list[str]) -> list[dict]:
    """Run the bench module `bench_file` (this checkout's version of it) on the code of git revision `ref`,
    extracted with `git archive` into a temporary directory, in a subprocess; returns the JSON lines it prints.
    How a benchmark gets its "before" column in the same run as its "after"."""
    bench_file = Path(bench_file)
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "archive", ref], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        (Path(tmp) / "bench" / bench_file.name).write_text(bench_file.read_text())
        env = {**os.environ, "PYTHONPATH": tmp}
        out = subprocess.run([sys.executable, "-m", f"bench.{bench_file.stem}", *args], cwd=tmp, env=env,
                             check=True, capture_output=True, text=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]

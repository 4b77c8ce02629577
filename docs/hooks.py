"""MkDocs hooks: the figures under bench/results/ are pages' pictures as results/<name>, so the docs show
them from where the bench scripts write them (nothing copied into docs/); and a page's
`<!-- records: KIND -->` becomes the table of bench/results/KIND.jsonl (bench/page.py), so its numbers are
the records', never typed."""
from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
MARKER = re.compile(r"<!-- records: (\w+) -->")


def on_files(files: Files, config: Any) -> Files:
    for picture in sorted((BENCH / "results").glob("*.png")):
        files.append(File(f"results/{picture.name}", str(BENCH), config["site_dir"], config["use_directory_urls"]))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from bench.page import ROWS, render

    def table(m: re.Match[str]) -> str:
        if m.group(1) not in ROWS:
            raise ValueError(f"{page.file.src_path}: no records named {m.group(1)!r} (known: {', '.join(ROWS)})")
        return render(m.group(1))

    markdown = MARKER.sub(table, markdown)
    if left := re.search(r"<!--\s*records\b.*?-->", markdown):  # a marker mistyped: it would show nothing
        raise ValueError(f"{page.file.src_path}: {left.group(0)} is not a records marker (<!-- records: KIND -->)")
    return markdown

"""MkDocs hook: the figures under bench/results/ are pages' pictures as results/<name>, so the docs show
them from where the bench scripts write them (nothing copied into docs/)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

BENCH = Path(__file__).resolve().parents[1] / "bench"


def on_files(files: Files, config: Any) -> Files:
    for picture in sorted((BENCH / "results").glob("*.png")):
        files.append(File(f"results/{picture.name}", str(BENCH), config["site_dir"], config["use_directory_urls"]))
    return files

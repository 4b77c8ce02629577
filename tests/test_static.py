"""Static checks, configured in pyproject.toml: ruff (lint and import order) over the whole tree, mypy over
the package, the launcher, tune/ and bench/. Part of the test command, so CI runs them too."""
import os
import sys
from pathlib import Path

import pytest

from conftest import ROOT, env, run

pytestmark = pytest.mark.timeout(180)


@pytest.mark.parametrize("tool", [["ruff", "check", "--output-format", "concise", "."], ["mypy"]])
def test_clean(tool):
    # mypy's cache in the user's cache folder, not the clone's: a fresh clone then checks in a second instead
    # of 20 CPU-seconds (the cache is valid across folders: mypy checks each file's hash)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cifar-dist" / "mypy"
    r = run([sys.executable, "-m", *tool], 150, cwd=ROOT, env=env(MYPY_CACHE_DIR=str(cache)))
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]

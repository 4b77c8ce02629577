"""Static checks, configured in pyproject.toml: ruff (lint and import order) over the whole tree, mypy over
the package, the launcher, tune/ and bench/. Part of the test command, so CI runs them too."""
import sys

import pytest

from conftest import ROOT, run

pytestmark = pytest.mark.timeout(180)


@pytest.mark.parametrize("tool", [["ruff", "check", "--output-format", "concise", "."], ["mypy"]])
def test_clean(tool):
    r = run([sys.executable, "-m", *tool], 150, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]

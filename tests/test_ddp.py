"""Real 2-process CPU DDP through `accelerate launch` (gloo): bad input. A 2-process run's one world and
identical weights are checked on the run test_tracking.py launches with both trackers."""
import pytest

from conftest import accelerate_launch

pytestmark = pytest.mark.timeout(300)


def test_ddp_bad_input_reports_our_line(tmp_path, tiny_args):
    r = accelerate_launch([*tiny_args, "--batch-size", "101", "--output-dir", str(tmp_path / "o")], tmp_path)
    assert r.returncode != 0
    assert "batch_size 101 must be divisible by processes x grad_accum (2 x 1)" in r.stderr
    assert not (tmp_path / "o").exists()

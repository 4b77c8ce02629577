"""Real 2-process CPU DDP through `accelerate launch` (gloo)."""
import pytest

from conftest import accelerate_launch, metrics, summary

pytestmark = pytest.mark.timeout(300)


def test_two_process_ddp_world_size_2_identical_weights(tmp_path, tiny_args):
    out = tmp_path / "run"
    r = accelerate_launch([*tiny_args, "--epochs", "2", "--output-dir", str(out)], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    s = summary(out)
    assert s["world_size"] == 2
    digests = s["rank_weight_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]  # DDP kept both ranks' weights identical
    assert [m["epoch"] for m in metrics(out)] == [1, 2]
    assert r.stdout.count("epoch   1/2 |") == 1  # one line per epoch, from the main process only
    assert metrics(out)[-1]["test_acc"] > 0.3


def test_ddp_bad_input_reports_our_line(tmp_path, tiny_args):
    r = accelerate_launch([*tiny_args, "--batch-size", "101", "--output-dir", str(tmp_path / "o")], tmp_path)
    assert r.returncode != 0
    assert "batch_size 101 must be divisible by processes x grad_accum (2 x 1)" in r.stderr
    assert not (tmp_path / "o").exists()

"""BatchNorm over fixed groups of images (--bn-group) and the micro-batch a machine runs fastest
(--micro-batch): with a group, how a step's batch is cut into forward passes changes its speed, not its
result. Runs in this process where processes are not what is tested."""
import subprocess
import sys

import pytest
import torch

from cifar_dist import machine, train
from cifar_dist.config import resolve
from cifar_dist.model import GhostBatchNorm2d

from conftest import TINY, TINY_MODEL, accelerate_launch, assert_one_line_error, env, metrics, summary

pytestmark = pytest.mark.timeout(300)
GROUPED = [*TINY, "--bn-group", "25", "--epochs", "2"]  # batch 100: 4 groups a step


def test_each_group_is_normalised_alone_and_the_running_stats_follow_the_groups_in_order():
    torch.manual_seed(0)
    x = torch.randn(100, 4, 5, 5) * 3 + 1
    ghost = GhostBatchNorm2d(4, group=25, eps=1e-5, momentum=0.1).train()
    plain = torch.nn.BatchNorm2d(4).train()
    y = ghost(x)
    for part, out in zip(x.split(25), y.split(25)):
        assert torch.allclose(out, plain(part), atol=1e-5)  # each group with its own statistics
    assert torch.allclose(ghost.running_mean, plain.running_mean) and torch.allclose(ghost.running_var, plain.running_var)
    again = GhostBatchNorm2d(4, group=25, eps=1e-5, momentum=0.1).train()
    for part in x.split(50):  # two micro-batches of two groups: the same outputs and running averages
        again(part)
    assert torch.equal(again.running_mean, ghost.running_mean) and torch.equal(again.running_var, ghost.running_var)
    assert torch.allclose(ghost.eval()(x), plain.eval()(x), atol=1e-5)  # evaluation: plain BatchNorm
    with pytest.raises(ValueError, match="not a multiple of the BatchNorm group 25"):
        ghost.train()(x[:30])


def test_any_micro_batch_of_whole_groups_trains_the_same_and_auto_is_the_probed_best(tmp_path, in_process, monkeypatch):
    monkeypatch.setenv("CIFAR_DIST_CACHE", str(tmp_path / "cache"))
    runs = {}
    for micro in ("25", "50", "whole", "auto"):
        out = tmp_path / micro
        r = in_process(train.main, [*GROUPED, "--micro-batch", micro, "--output-dir", str(out)])
        assert r.returncode == 0, r.stderr
        runs[micro] = (summary(out), metrics(out), torch.load(out / "model.pt"))
    s, _, _ = runs["auto"]
    probe = s["micro_batch_probe"]
    assert list(probe["images_per_second"]) == ["25", "50", "100"] and not probe["cached"]
    assert s["micro_batch"] == probe["best"] == int(max(probe["images_per_second"], key=probe["images_per_second"].get))
    assert "micro-batch: " in r.stdout and "(auto: fastest; images/s 25: " in r.stdout
    assert [runs[m][0]["micro_batch"] for m in ("25", "50", "whole")] == [25, 50, 100]
    explicit = {25: "25", 50: "50", 100: "whole"}[s["micro_batch"]]
    assert runs["auto"][0]["rank_weight_digests"] == runs[explicit][0]["rank_weight_digests"]  # auto is its choice
    _, ref_metrics, ref_weights = runs["whole"]
    ungrouped = tmp_path / "ungrouped"  # BatchNorm over all 100 images: another network function
    assert in_process(train.main, [*TINY, "--epochs", "2", "--output-dir", str(ungrouped)]).returncode == 0
    other = distance(torch.load(ungrouped / "model.pt"), ref_weights)
    for micro in ("25", "50"):  # the same steps, up to the order of float sums (other kernels per batch size)
        _, rows, weights = runs[micro]
        assert [m["train_loss"] for m in rows] == pytest.approx([m["train_loss"] for m in ref_metrics], rel=1e-3)
        assert distance(weights, ref_weights) < other / 8  # here 1/15 (2 epochs, 1 thread, AMD EPYC)
    again = in_process(train.main, [*GROUPED, "--micro-batch", "auto", "--output-dir", str(tmp_path / "again")])
    assert again.returncode == 0 and summary(tmp_path / "again")["micro_batch_probe"]["cached"]


def distance(a: dict, b: dict) -> float:
    """Relative distance of two state_dicts' float tensors (weights and BatchNorm running statistics)."""
    keys = [k for k in b if b[k].is_floating_point()]
    diff = sum(float((a[k].double() - b[k].double()).square().sum()) for k in keys)
    return (diff / sum(float(b[k].double().square().sum()) for k in keys)) ** 0.5


def test_micro_batch_candidates_are_whole_groups_dividing_the_share():
    assert machine.micro_candidates(2000, 125) == [125, 250, 500, 1000, 2000]
    assert machine.micro_candidates(100, 25) == [25, 50, 100]
    assert machine.micro_candidates(500, 500) == [500]
    assert all(500 % m == 0 and m % 50 == 0 for m in machine.micro_candidates(500, 50))
    assert machine.probe_batch(resolve([*GROUPED, "--bn-group", "75", "--batch-size", "300"]), 1) == 225


@pytest.mark.parametrize("args, text", [
    (["--micro-batch", "50"], "--micro-batch 50 would change what BatchNorm normalises (the whole 100 images"),
    (["--bn-group", "25", "--micro-batch", "30"], "--micro-batch 30 must be a multiple of bn_group 25 that divides"),
    (["--bn-group", "25", "--micro-batch", "lots"], "micro_batch must be auto, whole or a positive number"),
    (["--bn-group", "30"], "batch_size 100 must be a multiple of bn_group 30"),
    (["--bn-group", "50", "--grad-accum", "4"], "a process's share of a step (25 images"),
    (["--bn-group", "25", "--sync-bn"], "--sync-bn with --bn-group"),
    (["--bn-group", "-1"], "bn_group must be >= 0"),
])
def test_micro_batch_and_group_refusals_are_one_line(tmp_path, main_in_process, args, text):
    code, err = main_in_process(train.main, [*TINY, *args, "--output-dir", str(tmp_path / "o")])
    assert_one_line_error(code, err, text)
    assert not (tmp_path / "o").exists()


def test_two_processes_with_groups_take_the_steps_of_one(tmp_path, in_process):
    """Each process normalises its own groups: the world size does not change a step (no --sync-bn)."""
    one = tmp_path / "one"
    assert in_process(train.main, [*GROUPED, "--output-dir", str(one)]).returncode == 0
    two = tmp_path / "two"
    r = accelerate_launch([*GROUPED, "--output-dir", str(two)], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert summary(two)["world_size"] == 2 and summary(two)["micro_batch"] in (25, 50)
    assert [m["train_loss"] for m in metrics(two)] == pytest.approx([m["train_loss"] for m in metrics(one)], rel=1e-3)


def test_odd_batches_through_a_strided_shortcut_do_not_crash():
    """torch 2.14's CPU backward of a strided 1x1 conv on an odd channels-last batch with 2 threads
    corrupted memory (cifar_dist.model.SubsampledConv1x1): in a process of its own, where a crash is a code."""
    code = ("import torch; torch.set_num_threads(2); from cifar_dist.config import resolve; "
            "from cifar_dist.model import build_model; "
            f"m = build_model(resolve({TINY_MODEL!r}).model).to(memory_format=torch.channels_last)\n"
            "for b in (25, 27, 125):\n"
            "    for _ in range(10): m(torch.randn(b, 3, 32, 32).contiguous(memory_format=torch.channels_last)).sum().backward()\n"
            "print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env())
    assert r.returncode == 0 and r.stdout.strip() == "ok", (r.returncode, r.stderr[-2000:])

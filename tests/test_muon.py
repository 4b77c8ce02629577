"""Muon (cifar_dist.optim) and the recipe after airbench94_muon: the orthogonalised filter step, the
parameter groups, and a run that trains, checkpoints and resumes with it."""
import signal
import subprocess
import sys

import pytest
import torch

from cifar_dist.config import resolve
from cifar_dist.model import build_model
from cifar_dist.optim import Muon, make_optimizer, orthogonalize

from conftest import TINY, env, metrics, summary, wait_for_file

pytestmark = pytest.mark.timeout(300)


@pytest.mark.parametrize("shape", [(64, 576), (576, 64), (32, 32)])
def test_orthogonalize_flattens_the_spectrum(shape):
    torch.manual_seed(0)
    k = min(shape)
    u, v = torch.linalg.qr(torch.randn(shape[0], k))[0], torch.linalg.qr(torch.randn(shape[1], k))[0]
    g = 1e3 * u @ torch.diag(torch.logspace(-1, 0, k)) @ v.T  # singular values 100..1000
    out = orthogonalize(g)
    s = torch.linalg.svdvals(out)
    assert out.shape == g.shape
    assert 0.6 < s.min() and s.max() < 1.3  # 3 quintic steps: roughly 0.5-1.5 (not U V^T's exact 1s)
    # the directions are g's: the output is about U V^T, whatever g's scale
    assert torch.nn.functional.cosine_similarity(out.flatten(), (u @ v.T).flatten(), dim=0) > 0.95


def test_muon_step_keeps_filter_norms_and_moves_by_the_lr_whatever_the_gradient_scale():
    for scale in (1e-4, 1e4):
        w = torch.nn.Parameter(torch.randn(16, 8, 3, 3))
        opt = Muon([dict(params=[w], lr=0.1, momentum=0.0, muon=True)], lr=0.1, momentum=0.0, nesterov=False)
        w.grad = torch.randn_like(w) * scale
        before = w.detach().clone() * (16 ** 0.5 / w.detach().norm())
        opt.step()
        step = (w.detach() - before).reshape(16, -1)
        assert torch.linalg.matrix_norm(step, ord=2) == pytest.approx(0.1, rel=0.6)  # lr x a ~unit spectral norm


def test_the_muon_recipe_groups():
    cfg = resolve(["--preset", "fast"])  # the Muon recipe is `fast`'s own
    assert cfg.optimizer == "muon" and cfg.batch_size == 2000 and cfg.epochs == 8 and not cfg.lookahead
    model = build_model(cfg.model)
    opt = make_optimizer(cfg, model)
    groups = {g["name"]: g for g in opt.param_groups}
    assert set(groups) == {"filters", "norm", "head", "stem_bias"}
    filters = groups["filters"]
    assert filters["muon"] and filters["lr"] == 0.24 and filters["momentum"] == 0.6 and filters["weight_decay"] == 0
    trained_4d = [p for p in model.parameters() if p.requires_grad and p.ndim == 4]
    assert len(filters["params"]) == len(trained_4d) == 6  # the frozen whitening filters are not trained
    for name in ("norm", "head", "stem_bias"):  # airbench94_muon's decay: 0.004 per step on what SGD trains
        g = groups[name]
        assert not g["muon"] and g["momentum"] == 0.85 and g["lr"] * g["weight_decay"] == pytest.approx(0.004)
    assert groups["norm"]["lr"] == pytest.approx(0.053 * 2000)


def test_a_muon_run_learns_and_a_killed_one_resumes_to_the_same_weights(tmp_path, train_here):
    args = [*TINY, "--optimizer", "muon", "--muon-lr", "0.05", "--epochs", "4", "--train-subset", "1000"]
    ref = tmp_path / "ref"
    assert train_here([*args, "--output-dir", str(ref)]).returncode == 0  # (the process killed below is real)
    assert metrics(ref)[-1]["test_acc"] > 0.3  # chance is 0.1
    out = tmp_path / "run"  # killed after a checkpoint (Muon's momentum buffers in it), then rerun
    proc = subprocess.Popen([sys.executable, "-m", "cifar_dist.train", *args, "--output-dir", str(out)],
                            cwd=tmp_path, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert wait_for_file(out / "checkpoints" / "epoch-0001", timeout=120, poll=0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if (out / "summary.json").exists():
        pytest.skip("the run finished before the kill landed")
    r = train_here([*args, "--output-dir", str(out)])
    assert r.returncode == 0 and "resumed from" in r.stdout
    assert [m["epoch"] for m in metrics(out)] == [1, 2, 3, 4]
    assert summary(out)["rank_weight_digests"] == summary(ref)["rank_weight_digests"]

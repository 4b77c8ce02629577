"""The fast path and the `fast` preset: whitening stem, convpool stages, reflect crops, 6-view TTA,
lookahead EMA, the stem-bias freeze, per-group learning rates, --eval-every and the FLOP count."""
import pytest
import torch
from safetensors.torch import load_file

from cifar_dist import data as D
from cifar_dist import flops as FL
from cifar_dist.config import resolve
from cifar_dist.evaluate import predict
from cifar_dist.model import ModelSpec, SpecError, build_model, check_spec, count_params, output_size
from cifar_dist.optim import Lookahead, lr_factor, lr_factors, make_optimizer

from conftest import metrics, summary

pytestmark = pytest.mark.timeout(300)


def test_fast_preset_is_airbench_shaped():
    cfg = resolve(["--preset", "fast", "--recipe", "fast-sgd"])
    assert cfg.batch_size == 1024 and cfg.epochs <= 10 and cfg.lookahead
    assert resolve(["--preset", "fast"]).recipe == "fast" and resolve(["--preset", "fast"]).optimizer == "muon"
    model = build_model(cfg.model)
    assert count_params(model) == 1_972_792
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 1_971_352  # stem and BN scales fixed
    assert output_size(cfg.model) == 3  # 32 -> 31 (2x2 stem) -> 15 -> 7 -> 3
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert resolve(["--preset", "fast", "--recipe", "default"]).batch_size == 256  # a recipe flag still wins


def test_best_preset_is_airbench96_shaped():
    cfg = resolve(["--preset", "best"])
    assert cfg.recipe == "best" and (cfg.batch_size, cfg.epochs, cfg.cutout, cfg.crop_padding) == (1024, 31, 12, 4)
    m = cfg.model
    assert (m.stem, m.stage, m.block, m.act, m.head, m.relu_after_add, m.bn_momentum, m.bn_eps, m.bn_weight) == (
        "whiten", "convpool", "basic", "gelu", "max", True, 0.1, 1e-12, False)
    assert (cfg.crop_mode, cfg.flip, cfg.tta, cfg.lookahead, cfg.label_smoothing, cfg.norm_lr_scale, cfg.decay_all,
            cfg.nesterov, cfg.momentum, cfg.whiten_bias_epochs) == (
        "reflect", "alternate", "flip-translate", True, 0.2, 64.0, True, True, 0.85, 3)
    assert cfg.lr * (1 + 1 / (1 - cfg.momentum)) == pytest.approx(9.0)  # airbench: lr 9.0 per 1024
    assert cfg.lr * cfg.weight_decay * (1 + 1 / (1 - cfg.momentum)) == pytest.approx(0.012)  # decay per 1024
    model = build_model(cfg.model)
    w = [24, 128, 512, 512]  # whitening stem, then per stage: conv + a residual block of two convs, BN shifts
    stages = sum(9 * w[i] * w[i + 1] + 2 * 9 * w[i + 1] ** 2 + 3 * w[i + 1] for i in range(3))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 24 + stages + 512 * 10
    assert sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()) == 10 and output_size(cfg.model) == 3
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    f = lr_factor(cfg, 1000)
    assert f(0) == pytest.approx(0.2 + 0.8 / 100) and f(99) == pytest.approx(1.0) and f(1000) == pytest.approx(0.0)


def test_resnet9_shape_builds_with_blockless_convpool_stages():
    spec = ModelSpec(stem_width=16, stage="convpool", widths=[32, 64, 128], blocks=[1, 0, 1], strides=[2, 2, 2])
    model = build_model(spec)
    assert len(model.blocks) == 5  # convpool, block, convpool, convpool, block
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(SpecError, match="at least one block"):
        check_spec(ModelSpec(widths=[8], blocks=[0], strides=[1]))
    with pytest.raises(SpecError, match="stem_width must be 24"):
        check_spec(ModelSpec(stem="whiten", stem_kernel=2, stem_width=32))


def test_whitening_stem_decorrelates_patches():
    torch.manual_seed(0)
    mix = torch.tensor([[1.0, 0.8, 0.6], [0.0, 0.5, 0.3], [0.0, 0.0, 0.2]])  # strongly correlated channels
    images = torch.einsum("ij,njhw->nihw", mix, torch.randn(64, 3, 32, 32)) + 0.5
    model = build_model(resolve(["--preset", "fast"]).model)
    model.init_whitening(images)
    conv = model.stem[0]
    assert not conv.weight.requires_grad and not conv.bias.any()  # the bias starts at zero (and trains)
    half = torch.nn.functional.conv2d(images, conv.weight[:12])  # the other half is its negative
    assert torch.allclose(conv.weight[12:], -conv.weight[:12])
    flat = half.transpose(0, 1).reshape(12, -1)
    covariance = flat @ flat.T / flat.shape[1]
    assert torch.allclose(covariance, torch.eye(12), atol=0.02)


def test_reflect_crop_is_a_window_of_the_mirrored_image():
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    out = D.augment(images, 2, torch.randint(0, 5, (8, 2), generator=torch.Generator().manual_seed(0)), None, "reflect")
    assert out.shape == images.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(images, (2,) * 4, mode="reflect")
    for i in range(8):
        windows = padded[i].unfold(1, 32, 1).unfold(2, 32, 1)
        assert any(torch.equal(windows[:, a, b], out[i]) for a in range(5) for b in range(5))
    assert (out == 0).float().mean() < 0.01  # no zero borders


def test_six_view_tta_weights_and_shape():
    torch.manual_seed(0)
    model = build_model(resolve(["--preset", "seed2"]).model).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        out = predict(model, x, "flip-translate")
        padded = torch.nn.functional.pad(x, (1,) * 4, mode="reflect")
        views = [x, padded[..., :32, :32], padded[..., 2:, 2:]]
        expected = sum(w * (model(v) + model(v.flip(-1))) / 2 for w, v in zip((0.5, 0.25, 0.25), views))
    assert out.shape == (3, 10) and torch.allclose(out, expected, atol=1e-5)


def test_lookahead_pulls_weights_to_the_ema_and_ends_on_it():
    net = torch.nn.Linear(4, 2)
    look = Lookahead(net, total_steps=20)
    start = net.weight.detach().clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    look.update(3)  # not a multiple of 5: nothing happens
    assert torch.equal(net.weight, start + 1)
    look.update(10)  # decay 0.95^5 * 0.5^3: the EMA moves most of the way, the weights jump to it
    decay = 0.95 ** 5 * 0.125
    assert torch.allclose(net.weight, start + (1 - decay), atol=1e-6)
    assert torch.allclose(look.ema["weight"], net.weight)
    with torch.no_grad():
        net.weight.add_(5.0)
    look.update(20)  # the last step: decay 1, the weights become the EMA, whatever they were
    assert torch.allclose(net.weight, start + (1 - decay), atol=1e-6)


def test_schedule_and_parameter_groups_of_the_fast_recipe():
    cfg = resolve(["--preset", "fast", "--recipe", "fast-sgd", "--whiten-bias-epochs", "2"])
    f = lr_factor(cfg, 100)
    assert f(0) == pytest.approx(0.2 + 0.8 / 23) and f(22) == pytest.approx(1.0) and f(100) == pytest.approx(0.07)
    model = build_model(cfg.model)
    opt = make_optimizer(cfg, model)
    groups = {g["name"]: g for g in opt.param_groups}
    assert set(groups) == {"weights", "norm", "head", "stem_bias"}
    assert groups["norm"]["lr"] == pytest.approx(64 * cfg.lr)
    for g in groups.values():  # decay_all: every parameter decays at the same rate per step
        assert g["lr"] * g["weight_decay"] == pytest.approx(cfg.lr * cfg.weight_decay)
    factors = dict(zip(groups, lr_factors(cfg, opt, steps_per_epoch=10)))
    assert factors["stem_bias"](19) == factors["weights"](19) > 0 and factors["stem_bias"](20) == 0
    default = {g["name"] for g in make_optimizer(resolve([]), build_model(resolve([]).model)).param_groups}
    assert default == {"weights", "biases", "norm", "head", "head_bias"}


def test_fast_run_evaluates_the_ema_weights_freezes_the_stem_and_counts_flops(tmp_path, train_here):
    out = tmp_path / "run"
    # fast's network at a quarter of its widths (a seventh of its FLOPs): every part of it (the whitening
    # stem, its frozen bias, the lookahead EMA) is there, and the test takes seconds, not a minute
    narrow = ["--preset", "fast", "--widths", "32,64,64"]
    args = [*narrow, "--recipe", "fast-sgd", "--dataset", "synthetic", "--train-subset", "1000", "--test-subset", "200",
            "--epochs", "3", "--batch-size", "100", "--whiten-bias-epochs", "1", "--eval-every", "2",
            "--keep-checkpoints", "3", "--output-dir", str(out)]
    r = train_here(args)
    assert r.returncode == 0, r.stderr
    rows = metrics(out)
    assert ["test_acc" in m for m in rows] == [False, True, True]  # every 2nd epoch and the last
    s = summary(out)
    assert s["test_acc"] > 0.5 and s["best_test_acc"] == max(rows[1]["test_acc"], rows[2]["test_acc"])
    forward, training = FL.per_image(resolve(narrow).model)
    assert s["train_flops"] == training * 3 * (1000 // 100) * 100 and s["flops_per_image_forward"] == forward
    assert s["eval_flops"] == forward * 6 * 200 * 2
    ckpt = {e: out / "checkpoints" / f"epoch-000{e}" for e in (1, 2, 3)}
    weights = {e: load_file(ckpt[e] / "model.safetensors") for e in ckpt}
    final = torch.load(out / "model.pt")
    ema = torch.load(ckpt[3] / "custom_checkpoint_2.pkl", weights_only=False)  # scheduler, state, lookahead
    for k, v in ema.items():  # the evaluated and saved weights are the lookahead EMA
        assert torch.equal(final[k], v), k
    assert torch.equal(weights[1]["stem.0.weight"], final["stem.0.weight"])  # whitening: fixed
    assert torch.equal(weights[1]["stem.0.bias"], final["stem.0.bias"])  # bias frozen after epoch 1
    assert not torch.equal(weights[1]["blocks.1.0.weight"], final["blocks.1.0.weight"])  # the rest trains

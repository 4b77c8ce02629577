import pytest
import torch

from cifar_dist.config import resolve
from cifar_dist.model import ModelSpec, SpecError, build_model, check_spec, count_params


@pytest.mark.parametrize("preset, params", [("seed2", 347_498), ("seed3", 389_962), ("resnet18", 11_173_962)])
def test_preset_parameter_counts_and_output_shape(preset, params):
    model = build_model(resolve(["--preset", preset]).model)
    assert count_params(model) == params
    assert model(torch.randn(3, 3, 32, 32)).shape == (3, 10)


def test_seed3_is_the_tutorial_architecture():
    model = build_model(resolve(["--preset", "seed3"]).model)
    assert isinstance(model.stem[2], torch.nn.AvgPool2d)
    last = model.blocks[2]
    assert last.conv1[0].stride == (1, 1) and last.conv2[0].stride == (2, 2)  # stride on the second conv
    assert last.shortcut[0].stride == (2, 2)
    assert model.head[1].in_features == 128 * 8 * 8


@pytest.mark.parametrize("spec", [
    ModelSpec(stem_width=12, widths=[12, 24, 48, 96], blocks=[3, 1, 2, 1], strides=[1, 2, 2, 2], head="gap"),
    ModelSpec(stem_width=8, stem_kernel=5, stem_pool="max", widths=[20], blocks=[2], strides=[2], head="flatten"),
    ModelSpec(stem_width=16, widths=[16, 16], blocks=[1, 4], strides=[1, 1], stride_conv="second",
              relu_after_add=False, conv_bias=True),
])
def test_searched_style_configs_build_and_train(spec):
    torch.manual_seed(0)
    model = build_model(spec)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    losses = []
    for _ in range(5):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("spec, message", [
    (ModelSpec(widths=[8, 16], blocks=[1], strides=[1, 2]), "same length"),
    (ModelSpec(widths=[8, 0], blocks=[1, 1], strides=[1, 2]), "positive"),
    (ModelSpec(widths=[8, 16], blocks=[1, 0], strides=[1, 2]), "at least one block"),
    (ModelSpec(widths=[8], blocks=[1], strides=[3]), "1 or 2"),
    (ModelSpec(head="pool"), "head"),
])
def test_invalid_specs_are_named(spec, message):
    with pytest.raises(SpecError, match=message):
        check_spec(spec)
    with pytest.raises(SpecError):
        build_model(spec)


def test_tta_averages_the_views():
    from cifar_dist.evaluate import predict

    torch.manual_seed(0)
    model = build_model(resolve(["--preset", "seed2"]).model).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        plain, mirrored = model(x), model(x.flip(-1))
        assert torch.equal(predict(model, x, "none"), plain)
        flip = predict(model, x, "flip")
        assert torch.allclose(flip, (plain + mirrored) / 2, atol=1e-6)  # the mean of the image and its mirror
        assert torch.allclose(flip, predict(model, x.flip(-1), "flip"), atol=1e-5)  # hence mirror-invariant
        assert not torch.allclose(flip, plain, atol=1e-4)

import numpy as np
import pytest
import torch

from cifar_dist import data as D
from cifar_dist.config import Config, resolve

from conftest import write_bin, write_cifar100, write_py


@pytest.mark.parametrize("layout, writer", [("cifar-10-batches-bin", write_bin), ("cifar-10-batches-py", write_py)])
def test_loaders_round_trip_pixels_and_labels(tmp_path, layout, writer):
    written = writer(tmp_path / layout, n=20)
    train, test, classes = D.load_cifar10(tmp_path, records=20)
    images = np.concatenate([written[f"data_batch_{k}"][0] for k in range(1, 6)])
    labels = np.concatenate([written[f"data_batch_{k}"][1] for k in range(1, 6)])
    assert train.images.dtype == torch.uint8 and train.images.shape == (100, 3, 32, 32)
    assert np.array_equal(train.images.numpy(), images)
    assert np.array_equal(train.labels.numpy(), labels)
    assert np.array_equal(test.images.numpy(), written["test_batch"][0])
    assert np.array_equal(test.labels.numpy(), written["test_batch"][1])
    assert classes[0] == "airplane" and len(classes) == 10


def test_truncated_binary_file_is_rejected_by_name(tmp_path):
    folder = tmp_path / "cifar-10-batches-bin"
    write_bin(folder, n=20)
    path = folder / "data_batch_3.bin"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(D.DataError, match="data_batch_3.bin has 61360 bytes"):
        D.load_cifar10(tmp_path, records=20)
    with pytest.raises(D.DataError, match="data_batch_1.bin has 61460 bytes, expected 30730000"):
        D.load_cifar10(tmp_path)  # the official size is the default expectation


def test_truncated_python_file_and_bad_labels(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_py(folder, n=20)
    path = folder / "test_batch"
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(D.DataError, match="test_batch is not a readable"):
        D.load_cifar10(tmp_path, records=20)
    rec = np.zeros((3, D.RECORD), dtype=np.uint8)
    rec[1, 0] = 12
    (tmp_path / "bad.bin").write_bytes(rec.tobytes())
    with pytest.raises(D.DataError, match="label 12"):
        D.read_bin(tmp_path / "bad.bin", records=None)


def test_missing_data_names_the_folder_and_the_file(tmp_path):
    with pytest.raises(D.DataError, match="no CIFAR-10 in"):
        D.load_cifar10(tmp_path)
    write_bin(tmp_path / "cifar-10-batches-bin", n=5)
    (tmp_path / "cifar-10-batches-bin" / "data_batch_4.bin").unlink()
    with pytest.raises(D.DataError, match="missing CIFAR-10 file .*data_batch_4.bin"):
        D.load_cifar10(tmp_path, records=5)


def test_synthetic_is_balanced_and_deterministic():
    a, b = D.synthetic()[0], D.synthetic()[0]
    assert torch.equal(a.images, b.images) and a.images.dtype == torch.uint8
    assert torch.bincount(a.labels).tolist() == [200] * 10


def cfg(**kw) -> Config:
    """The real config of a run, with the data settings these tests vary."""
    return resolve([], dict(dict(seed=0, batch_size=40, grad_accum=1, crop_padding=4, flip="random",
                                 crop_mode="zeros", cutout=0), **kw))


def test_augment_keeps_shape_dtype_labels_and_content():
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    shifts = torch.randint(0, 9, (16, 2), generator=torch.Generator().manual_seed(0))
    out = D.augment(images, 4, shifts, None)
    assert out.shape == images.shape and out.dtype == torch.uint8
    assert not torch.equal(out, images)  # shifted
    assert torch.equal(D.augment(images, 4, torch.full((16, 2), 4), None), images)  # the centre window
    flipped = D.augment(images, 0, None, torch.ones(16, dtype=torch.bool))
    assert torch.equal(flipped, images.flip(-1))
    # every crop is a window of the zero-padded image
    padded = torch.nn.functional.pad(images, (4,) * 4)
    for i in range(16):
        windows = padded[i].unfold(1, 32, 1).unfold(2, 32, 1)  # (3, 9, 9, 32, 32)
        assert any(torch.equal(windows[:, a, b], out[i]) for a in range(9) for b in range(9))


def test_train_batches_keep_labels_with_their_images():
    split = D.Split(torch.arange(100, dtype=torch.uint8).view(100, 1, 1, 1).expand(100, 3, 32, 32).contiguous(),
                    torch.arange(100))
    for b in D.train_batches(split, cfg(crop_padding=0), epoch=0, rank=0, world=1):
        assert torch.equal(b.images[:, 0, 0, 0].long(), b.labels) and torch.equal(b.ids, b.labels)


def test_ranks_get_disjoint_shards_and_eval_counts_each_image_once():
    split = D.Split(torch.zeros(103, 3, 32, 32, dtype=torch.uint8), torch.arange(103))
    seen = [torch.cat([b.labels for b in D.train_batches(split, cfg(), 0, r, 2)]) for r in range(2)]
    assert len(seen[0]) == len(seen[1]) == 40  # 2 steps of 40 global, 20 per rank
    assert not set(seen[0].tolist()) & set(seen[1].tolist())
    shards = [torch.cat([y for _, y in D.eval_batches(split, 7, r, 3)]) for r in range(3)]
    assert sorted(torch.cat(shards).tolist()) == list(range(103))


def test_epoch_order_is_a_function_of_seed_and_epoch():
    split = D.Split(torch.zeros(200, 3, 32, 32, dtype=torch.uint8), torch.arange(200))
    order = lambda e, s=0: torch.cat([b.labels for b in D.train_batches(split, cfg(seed=s), e, 0, 1)])
    assert torch.equal(order(3), order(3))
    assert not torch.equal(order(3), order(4)) and not torch.equal(order(3), order(3, s=1))


def test_alternating_flip_alternates():
    def flipped(epoch: int) -> torch.Tensor:  # by image id
        plan = D.epoch_plan(500, cfg(flip="alternate", batch_size=50), epoch)
        return plan.flips[plan.order.argsort()]
    masks = [flipped(e) for e in range(4)]
    assert 150 < int(masks[0].sum()) < 350
    assert torch.equal(masks[1], ~masks[0]) and torch.equal(masks[2], masks[0]) and torch.equal(masks[3], ~masks[0])
    assert D.epoch_plan(500, cfg(flip="none", batch_size=50), 0).flips is None


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_any_world_size_trains_the_same_global_batches_with_the_same_augmentations(grad_accum):
    """The plan of an epoch is a function of (seed, epoch): 1, 2 or 4 ranks, each taking its slice, train
    the same images, augmented the same way, in the same global batches; and a resume from global batch k
    continues it."""
    split = D.Split(torch.randint(0, 256, (203, 3, 32, 32), dtype=torch.uint8), torch.arange(203) % 10)
    c = cfg(batch_size=40, grad_accum=grad_accum, cutout=8, crop_mode="reflect")

    def global_batches(world: int, start: int = 0) -> list[tuple[list[int], torch.Tensor]]:
        ranks = [list(D.train_batches(split, c, 3, r, world, (0.5, 0.5, 0.5), start)) for r in range(world)]
        steps = [ranks[r][k:k + grad_accum] for r in range(world) for k in range(0, len(ranks[r]), grad_accum)]
        per_step = len(steps) // world  # steps[r * per_step + k]: rank r's micro-batches of global batch k
        return [(sum((b.ids.tolist() for r in range(world) for b in steps[r * per_step + k]), []),
                 torch.cat([b.images for r in range(world) for b in steps[r * per_step + k]]))
                for k in range(per_step)]

    one = global_batches(1)
    assert len(one) == 5 and len({i for ids, _ in one for i in ids}) == 200
    for world in (2, 4):
        other = global_batches(world)
        assert [ids for ids, _ in other] == [ids for ids, _ in one]
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(other, one))
    resumed = global_batches(2, start=3)
    assert [ids for ids, _ in resumed] == [ids for ids, _ in one[3:]]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(resumed, one[3:]))


def test_validation_split_is_fixed_by_seed_and_disjoint():
    c = resolve(["--dataset", "synthetic", "--val-size", "300", "--seed", "5"])
    a, b = D.load_data(c), D.load_data(c)
    assert len(a.val) == 300 and len(a.train) == 1700
    assert torch.equal(a.val.images, b.val.images)
    assert abs(a.mean[0] - a.train.images[:, 0].float().mean().item() / 255) < 1e-4


def test_cutout_blanks_one_square_inside_each_image_with_the_mean():
    split = D.Split(torch.full((64, 3, 32, 32), 200, dtype=torch.uint8), torch.arange(64) % 10)
    mean = (0.2, 0.4, 0.6)  # -> uint8 51, 102, 153
    # a constant image is unchanged by reflect crops and flips: a square cut before them would be shifted out
    c = cfg(batch_size=32, crop_padding=4, crop_mode="reflect", flip="random", cutout=12)
    batches = list(D.train_batches(split, c, 0, 0, 1, mean))
    images = torch.cat([b.images for b in batches])
    assert images.shape == (64, 3, 32, 32) and images.dtype == torch.uint8
    assert sorted(torch.cat([b.labels for b in batches]).tolist()) == sorted(split.labels.tolist())  # labels kept
    corners = set()
    for img in images:
        blank = img != 200
        assert int(blank[0].sum()) == 144 and torch.equal(blank[0], blank[1]) and torch.equal(blank[1], blank[2])
        rows, cols = blank[0].any(1).nonzero().flatten(), blank[0].any(0).nonzero().flatten()
        assert len(rows) == len(cols) == 12 and rows[-1] - rows[0] == cols[-1] - cols[0] == 11  # one 12x12 square
        assert img[:, blank[0]].T.tolist() == [[51, 102, 153]] * 144
        corners.add((int(rows[0]), int(cols[0])))
    assert len(corners) > 20  # placed at random, anywhere inside


@pytest.mark.parametrize("layout", ["bin", "py"])
def test_cifar100_loaders_round_trip_pixels_fine_labels_and_names(tmp_path, layout):
    written = write_cifar100(tmp_path, layout, 30, 20)
    train, test, classes = D.load_cifar100(tmp_path, records={"train": 30, "test": 20})
    assert np.array_equal(train.images.numpy(), written["train"][0])
    assert np.array_equal(train.labels.numpy(), written["train"][1])  # the fine labels, not the coarse
    assert np.array_equal(test.images.numpy(), written["test"][0]) and test.labels.max() < 100
    assert classes == [f"fine{i:02d}" for i in range(100)]


@pytest.mark.parametrize("layout", ["bin", "py"])
def test_cifar100_missing_and_truncated_files_are_named(tmp_path, layout):
    with pytest.raises(D.DataError, match="no CIFAR-100 in"):
        D.load_cifar100(tmp_path)
    write_cifar100(tmp_path, layout, 30, 20)
    records = {"train": 30, "test": 20}
    folder = tmp_path / ("cifar-100-binary" if layout == "bin" else "cifar-100-python")
    name = "test.bin" if layout == "bin" else "test"
    (folder / name).write_bytes((folder / name).read_bytes()[:-500])
    expected = "test.bin has 60980 bytes, expected 61480" if layout == "bin" else "test is not a readable CIFAR-100"
    with pytest.raises(D.DataError, match=expected):
        D.load_cifar100(tmp_path, records=records)
    (folder / name).unlink()
    with pytest.raises(D.DataError, match=f"missing CIFAR-100 file .*{name}"):
        D.load_cifar100(tmp_path, records=records)
    with pytest.raises(D.DataError, match="train.* expected 50000|train.bin has .* expected 153700000"):
        D.load_cifar100(tmp_path)  # the official sizes are the default expectation


def test_cifar100_builds_every_preset_with_100_classes():
    from cifar_dist.model import build_model
    from cifar_dist.recipes import PRESETS

    for preset in PRESETS:
        cfg = resolve(["--preset", preset, "--dataset", "cifar100"])
        assert cfg.model.num_classes == 100
        assert build_model(cfg.model)(torch.zeros(2, 3, 32, 32)).shape == (2, 100)
    assert resolve(["--dataset", "cifar100", "--num-classes", "128"]).model.num_classes == 128

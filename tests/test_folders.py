"""--dataset folder: the user's own pictures, one folder per class (or train/ beside test/ or val/)."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from cifar_dist import folders, predict, train
from cifar_dist.config import resolve
from cifar_dist.model import build_model
from cifar_dist.predict import load_image
from cifar_dist.recipes import PRESETS

from conftest import accelerate_launch, assert_one_line_error, summary

pytestmark = pytest.mark.timeout(300)
SMALL = ["--preset", "seed3", "--stem-width", "8", "--widths", "8,16", "--blocks", "1,1", "--strides", "1,2",
         "--head", "gap", "--batch-size", "12", "--epochs", "4", "--mixed-precision", "no", "--lr", "0.05"]
COLOURS = {"cat": (200, 80, 40), "dog": (40, 80, 200), "fish": (40, 200, 80)}


def photos(root, per_class=15, classes=COLOURS, seed=0):
    """Pictures a classifier can tell apart (a colour per class), of several sizes, modes and formats."""
    rng = np.random.default_rng(seed)
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = np.clip(rng.normal(COLOURS[name], 30, size=(40 + 3 * i, 56, 3)), 0, 255).astype(np.uint8)
            picture = Image.fromarray(pixels).convert("RGBA" if i % 5 == 4 else "RGB")
            picture.save(root / name / f"{i:03d}.{['png', 'jpg', 'webp', 'bmp', 'png'][i % 5]}")
    return root


def test_one_folder_per_class_is_split_by_class_the_same_every_time(tmp_path, in_process):
    root = photos(tmp_path / "pics")
    (root / "cat" / "notes.txt").write_text("not a picture: left alone")
    out = tmp_path / "run"
    r = in_process(train.main, ["--dataset", "folder", "--data-dir", str(root), *SMALL, "--output-dir", str(out)])
    assert r.returncode == 0, r.stderr
    assert (f"folder {root} at 32x32: 3 classes (cat 12, dog 12, fish 12 training pictures), a 0.2 test split of each class "
            "(seed 0); decoded now") in r.stdout
    s = summary(out)
    assert s["classes"] == ["cat", "dog", "fish"] and s["images"] == {"train": 36, "test": 9}
    assert s["config"]["model"]["num_classes"] == 3 and s["test_acc"] > 0.6  # it learned the colours
    labels = torch.arange(3).repeat_interleave(15)
    assert [t.tolist() for t in folders.stratified(labels, 0.2, 0)] == \
           [t.tolist() for t in folders.stratified(labels, 0.2, 0)]  # the same split on every rank and rerun
    tr, te = folders.stratified(labels, 0.2, 0)
    assert sorted(labels[te].tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 2] and len(set(tr.tolist()) & set(te.tolist())) == 0


def test_train_beside_val_uses_val_as_the_test_set_and_prepares_pictures_as_predict_does(tmp_path, in_process):
    root = tmp_path / "pics"
    photos(root / "train")
    photos(root / "val", per_class=4, seed=1)
    out = tmp_path / "run"
    r = in_process(train.main, ["--dataset", "folder", "--data-dir", str(root), *SMALL, "--output-dir", str(out)])
    assert r.returncode == 0, r.stderr
    assert "val/ as the test set" in r.stdout and summary(out)["images"] == {"train": 45, "test": 12}
    assert "folder " in (out / "model_card.md").read_text()
    cached = tmp_path / "cache"
    files = folders.listing(root / "val", ["cat", "dog", "fish"])
    images, labels, _, hit = folders.read(files, 32, cached, False, "val")
    assert not hit and labels.tolist() == [0, 1, 2] * 4  # in the order of the file names, then the class
    for k in (0, 4, 7):  # a picture's pixels are predict's, whatever its format or mode
        assert torch.equal(images[k].float() / 255, load_image(files[k][0], 32))


def test_the_decoded_set_is_cached_and_a_changed_picture_decodes_it_again(tmp_path):
    root = photos(tmp_path / "pics", per_class=6)
    cache = tmp_path / "cache"
    first = folders.load(root, 32, 0.2, 0, False, cache)
    second = folders.load(root, 32, 0.2, 0, False, cache)
    assert first[3].endswith("decoded now") and second[3].endswith("; cached")
    assert torch.equal(first[0][0], second[0][0]) and torch.equal(first[1][1], second[1][1])
    changed = root / "dog" / "002.webp"
    Image.new("RGB", (32, 32), (0, 0, 0)).save(changed)
    os.utime(changed, ns=(1, 1))  # another size and time: another key
    third = folders.load(root, 32, 0.2, 0, False, cache)
    assert third[3].endswith("decoded now") and not torch.equal(third[0][0], first[0][0])


def test_image_size_trains_caches_and_predicts_at_that_resolution(tmp_path, in_process):
    root = photos(tmp_path / "pics")
    out = tmp_path / "run"
    r = in_process(train.main, ["--dataset", "folder", "--data-dir", str(root), *SMALL, "--image-size", "48",
                                "--output-dir", str(out)])
    assert r.returncode == 0, r.stderr
    assert f"folder {root} at 48x48: 3 classes" in r.stdout
    s = summary(out)
    assert s["config"]["model"]["image_size"] == 48 and s["test_acc"] > 0.6
    assert "(8, 48, 48)" in (out / "model_summary.txt").read_text()  # the stem's output
    assert "- input: 48x48 RGB" in (out / "model_card.md").read_text()
    cache = tmp_path / "cache"  # each resolution its own cache entry
    (x48, _), _, _, note = folders.load(root, 48, 0.2, 0, False, cache)
    (x32, _), _, _, note32 = folders.load(root, 32, 0.2, 0, False, cache)
    assert x48.shape[1:] == (3, 48, 48) and x32.shape[1:] == (3, 32, 32) and note32.endswith("decoded now")
    picture = root / "dog" / "003.bmp"  # 49 x 56 pixels: scaled to 48 and cropped, as in training
    assert load_image(picture, 48).shape == (3, 48, 48)
    answer = in_process(predict.main, [str(out), str(picture), "--top-k", "1"])
    assert answer.returncode == 0, answer.stderr
    assert answer.stdout.strip() == f"{picture}: dog " + answer.stdout.split()[-1]


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_builds_for_another_image_size(preset):
    cfg = resolve(["--preset", preset, "--dataset", "synthetic", "--image-size", "64"])
    logits = build_model(cfg.model).eval()(torch.zeros(2, 3, 64, 64))
    assert logits.shape == (2, 10)


@pytest.mark.parametrize("flags, text", [
    (["--preset", "seed2", "--image-size", "96"], "a flatten head cannot take 96x96 images here: its last "
                                                  "96x96x32 feature map makes 294,912 inputs"),
    (["--image-size", "4"], "image_size must be between 8 and 512, got 4"),
    (["--preset", "fast", "--image-size", "8"], "the strides [2, 2, 2] shrink a 8x8 image to nothing"),
])
def test_an_image_size_a_network_cannot_take_is_one_line(tmp_path, main_in_process, flags, text):
    root = photos(tmp_path / "pics", per_class=3)
    out = tmp_path / "run"
    code, err = main_in_process(train.main, ["--dataset", "folder", "--data-dir", str(root), *flags,
                                             "--output-dir", str(out)])
    assert_one_line_error(code, err, text)
    assert not out.exists()


def test_cifar_is_32_pixels_and_refuses_another_image_size(tmp_path, main_in_process):
    code, err = main_in_process(train.main, ["--image-size", "64", "--output-dir", str(tmp_path / "run")])
    assert_one_line_error(code, err, "image_size 64 needs --dataset folder (or synthetic): CIFAR's pictures are 32x32")


def broken(root):
    photos(root)
    (root / "dog" / "999.jpg").write_bytes(b"\xff\xd8 not really a jpeg")


@pytest.mark.parametrize("make, flags, text", [
    (lambda r: r.mkdir(), [], "has no class folders: put each class's pictures in a folder of its own"),
    (lambda r: photos(r, classes=["cat"]), [], "has a single class folder (cat): a classifier needs two or more"),
    (lambda r: (photos(r), (r / "eel").mkdir()), [], "eel has no pictures"),
    (lambda r: (photos(r / "train"), photos(r / "test", classes=["cat"]), (r / "test" / "eel").mkdir()),
     [], "test/eel is a class the training pictures do not have"),
    (broken, [], "999.jpg is not a readable image"),
    (lambda r: None, [], "is not a folder"),
    (lambda r: photos(r), ["--data-dir", ""], "--dataset folder needs --data-dir"),
    (lambda r: photos(r), ["--batch-size", "100"], "batch_size 100 is larger than the training set (36 images)"),
    (lambda r: photos(r), ["--test-fraction", "1"], "test_fraction must be between 0 and 1, got 1.0"),
])
def test_a_bad_folder_is_one_line_and_nothing_written(tmp_path, main_in_process, make, flags, text):
    root = tmp_path / "pics"
    make(root)
    out = tmp_path / "run"
    code, err = main_in_process(train.main, ["--dataset", "folder", "--data-dir", str(root), *SMALL,
                                             "--output-dir", str(out), *flags])
    assert_one_line_error(code, err, text)
    assert not out.exists()


def test_skip_bad_images_goes_on_and_counts_them(tmp_path, in_process):
    root = tmp_path / "pics"
    broken(root)
    out = tmp_path / "run"
    r = in_process(train.main, ["--dataset", "folder", "--data-dir", str(root), *SMALL, "--skip-bad-images",
                                "--output-dir", str(out)])
    assert r.returncode == 0, r.stderr
    assert "1 unreadable skipped" in r.stdout and summary(out)["images"] == {"train": 36, "test": 9}


def test_two_processes_train_on_a_folder(tmp_path):
    root = photos(tmp_path / "pics")
    out = tmp_path / "run"
    r = accelerate_launch(["--dataset", "folder", "--data-dir", str(root), *SMALL, "--output-dir", str(out)], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    s = summary(out)
    assert s["world_size"] == 2 and s["rank_weight_digests"][0] == s["rank_weight_digests"][1]
    assert r.stdout.count("folder ") == 1 and s["classes"] == ["cat", "dog", "fish"]


def test_a_search_takes_a_folder_and_checks_it_before_any_trial(tmp_path):
    from cifar_dist.search.cli import base_overrides, check_args, parse_args
    from cifar_dist.search.space import SearchError

    root = photos(tmp_path / "pics")
    args = parse_args(["--dataset", "folder", "--data-dir", str(root), "--val-size", "9"])
    check_args(args)
    assert base_overrides(args, "s")["data_dir"] == str(root.resolve())
    with pytest.raises(SearchError, match="--val-size 45 leaves no training images: the folder training set has 45"):
        check_args(parse_args(["--dataset", "folder", "--data-dir", str(root), "--val-size", "45"]))
    with pytest.raises(SearchError, match=r"has a single class folder \(pics\)"):
        check_args(parse_args(["--dataset", "folder", "--data-dir", str(tmp_path), "--val-size", "9"]))


def test_cifar_written_as_folders_reads_back_as_the_binary_files_in_their_order(tmp_path):
    """bench/folders.py's writer: the official order in the names, so pixels, labels and order are equal."""
    from bench.folders import write_folders
    from cifar_dist.data import load_cifar10

    from conftest import write_bin

    write_bin(tmp_path / "cifar" / "cifar-10-batches-bin", n=60)
    train, test, classes = load_cifar10(tmp_path / "cifar", records=60)
    write_folders(train, classes, tmp_path / "png" / "train")
    write_folders(test, classes, tmp_path / "png" / "test")
    (x, y), (tx, ty), names, note = folders.load(tmp_path / "png", 32, 0.2, 0, False, tmp_path / "cache")
    assert names == classes and "test/ as the test set" in note
    assert torch.equal(x, train.images) and torch.equal(y, train.labels)
    assert torch.equal(tx, test.images) and torch.equal(ty, test.labels)

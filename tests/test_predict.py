"""Everyday use of a finished run: `python -m cifar_dist.predict` on image files (the real CLI), its
answers against the model's own, through ONNX too; every bad input refused with one line; the model card."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from cifar_dist import data as D
from cifar_dist import predict as P
from cifar_dist.evaluate import predict
from cifar_dist.export import load_run

from conftest import TINY, assert_one_line_error, env, train_once
from conftest import run as run_command

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path, torch.Tensor]:
    """A finished 1-epoch synthetic run, and the first 12 images of its test split written as PNGs (in a
    folder and a subfolder) with their pixels."""
    tmp = tmp_path_factory.mktemp("predict")
    train_once([*TINY, "--epochs", "1", "--output-dir", str(tmp / "run")])
    images = D.synthetic()[1].images[:12]
    for i, image in enumerate(images):
        folder = tmp / "images" / ("more" if i >= 8 else "")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i:02d}.png")
    return tmp / "run", tmp / "images", images


def predict_cli(args: list[str], cwd: Path) -> list[dict]:
    r = run_command([sys.executable, "-m", "cifar_dist.predict", *args, "--json"], 240, cwd=cwd, env=env())
    assert r.returncode == 0, r.stderr[-2000:]
    return [json.loads(line) for line in r.stdout.splitlines()]


def test_predictions_on_image_files_are_the_models_own(trained, tmp_path):
    run, folder, images = trained
    # 03.png named again beside its folder: answered once
    answers = predict_cli([str(run), str(folder), str(folder / "03.png"), "--top-k", "3"], tmp_path)
    assert [Path(a["path"]).name for a in answers] == [f"{i:02d}.png" for i in range(8)] + \
        [f"{i:02d}.png" for i in range(8, 12)]  # the folder's files, then its subfolder's
    model, cfg = load_run(run)
    with torch.no_grad():
        probs = predict(model, images.float() / 255, cfg.tta).softmax(1)
    classes = json.loads((run / "summary.json").read_text())["classes"]
    for answer, p in zip(answers, probs):
        assert len(answer["top"]) == 3
        assert answer["top"][0]["class"] == classes[int(p.argmax())]
        assert answer["top"][0]["probability"] == pytest.approx(float(p.max()), abs=1e-5)
        assert [t["probability"] for t in answer["top"]] == sorted((t["probability"] for t in answer["top"]),
                                                                   reverse=True)


def test_onnx_gives_the_same_answers_as_model_pt(trained, tmp_path):
    run, folder, _ = trained
    r = run_command([sys.executable, "-m", "cifar_dist.export", str(run)], 240, cwd=tmp_path, env=env())
    assert r.returncode == 0, r.stderr[-2000:]
    assert "[torch.onnx]" not in r.stdout + r.stderr and len(r.stdout.splitlines()) <= 2  # its own lines only
    pt, onnx = predict_cli([str(run), str(folder)], tmp_path), predict_cli([str(run), str(folder), "--onnx"], tmp_path)
    for a, b in zip(pt, onnx):
        assert [t["class"] for t in a["top"]] == [t["class"] for t in b["top"]]
        assert [t["probability"] for t in a["top"]] == pytest.approx([t["probability"] for t in b["top"]], abs=1e-4)


def test_any_size_is_scaled_and_centre_cropped_like_a_cifar_photo(tmp_path):
    wide = torch.zeros(3, 64, 192, dtype=torch.uint8)
    wide[0, :, 64:128] = 255  # a red middle third: scaled to 32x96, its centre 32x32 is all red
    Image.fromarray(wide.permute(1, 2, 0).numpy()).save(tmp_path / "wide.jpg", quality=95)
    x = P.load_image(tmp_path / "wide.jpg", 32)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert x[0, :, 2:-2].min() > 0.9 and x[1:].max() < 0.1


@pytest.mark.parametrize("case, text", [
    ("text file", "notes.txt is not a picture (.png, .jpg, .jpeg, .webp, .bmp)"),
    ("truncated", "broken.png is not a readable image"),
    ("no model", "model.pt is missing"),
    ("no onnx", "export it with `python -m cifar_dist.export"),
    ("top-k 0", "--top-k must be in 1..10 (the run's classes), got 0"),
    ("top-k 11", "--top-k must be in 1..10 (the run's classes), got 11"),
    ("missing path", "nowhere.png does not exist"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_written(trained, tmp_path, main_in_process, case, text):
    run, folder, _ = trained
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "broken.png").write_bytes((folder / "00.png").read_bytes()[:60])
    empty_run = tmp_path / "empty-run"
    empty_run.mkdir()
    for name in ("config.yaml", "summary.json"):
        (empty_run / name).write_bytes((run / name).read_bytes())
    argv = {"text file": [str(run), str(tmp_path / "notes.txt")],
            "truncated": [str(run), str(tmp_path / "broken.png")],
            "no model": [str(empty_run), str(folder)],
            "no onnx": [str(run), str(folder), "--onnx"],
            "top-k 0": [str(run), str(folder), "--top-k", "0"],
            "top-k 11": [str(run), str(folder), "--top-k", "11"],
            "missing path": [str(run), str(tmp_path / "nowhere.png")]}[case]
    if case == "no onnx":
        (run / "model.onnx").unlink(missing_ok=True)
    before = sorted(p.name for p in run.iterdir())
    code, err = main_in_process(P.main, argv)
    assert_one_line_error(code, err, text)
    assert sorted(p.name for p in run.iterdir()) == before


def test_model_card_holds_what_the_run_is(trained):
    run, _, _ = trained
    card, summary = (run / "model_card.md").read_text(), json.loads((run / "summary.json").read_text())
    for fact in ("preset `seed3`", f"{summary['params']:,} parameters", "MFLOP per image forward",
                 "synthetic: 2,000 training images", "500 test images", f"{summary['test_acc']:.2%}",
                 "Per class (test, lowest first)", "precision no", "1 process(es) on cpu", summary["hardware"],
                 f"python -m cifar_dist.train --config {run}/config.yaml", "![loss and accuracy per epoch](curves.png)"):
        assert fact in card, fact
    assert "Traceback" not in card


def test_a_phone_photo_is_turned_upright_and_transparency_is_on_white(tmp_path):
    """EXIF orientation 6 (the camera held sideways): the picture is rotated upright before scaling; a
    transparent PNG's invisible pixels count as white, not as the colour stored under them."""
    tall = Image.new("RGB", (64, 32), "blue")  # stored landscape, left half blue, right half red
    tall.paste((255, 0, 0), (32, 0, 64, 32))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    tall.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    x = P.load_image(tmp_path / "phone.jpg", 32)  # upright: 32 wide, 64 tall, blue on top; the centre crop straddles
    assert x[2, 2, 16] > 0.8 and x[0, -3, 16] > 0.8  # blue at the top, red at the bottom: turned, not squashed
    clear = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    clear.save(tmp_path / "clear.png")
    assert P.load_image(tmp_path / "clear.png", 32).min() > 0.99

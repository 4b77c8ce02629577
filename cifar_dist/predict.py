"""Classify your own images with a finished run:

    python -m cifar_dist.predict RUN_DIR IMAGE_OR_FOLDER... [--top-k 3] [--onnx] [--json]

Any PNG, JPEG, WebP or BMP of any size; a folder is searched recursively. Each image is scaled (its shorter side to
32 pixels, Lanczos) and centre-cropped to 32x32, as CIFAR's photos were made; the run's own normalisation
and test-time augmentation are applied, with `model.pt` on the best device at hand or, with --onnx, the
exported `model.onnx` through onnxruntime. One line per image (path, then the top-k classes with their
probabilities), or with --json one JSON object per line.
"""
from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from cifar_dist import folders
from cifar_dist.config import ConfigError, OneLineParser
from cifar_dist.evaluate import predict
from cifar_dist.export import load_run

PROG = "cifar_dist.predict"
PICTURES = ", ".join(folders.SUFFIXES)
BATCH = 256


def image_paths(paths: list[Path]) -> list[Path]:
    """The images named, and those under the folders named (recursively, sorted)."""
    found = []
    for path in paths:
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in folders.SUFFIXES)
        elif not path.exists():
            raise ConfigError(f"{path} does not exist")
        elif path.suffix.lower() not in folders.SUFFIXES:
            raise ConfigError(f"{path} is not a picture ({PICTURES})")
        else:
            found.append(path)
    once: dict[Path, Path] = {}  # a picture named alone and inside a folder given too: answered once
    for path in found:
        once.setdefault(path.resolve(), path)
    found = list(once.values())
    if not found:
        raise ConfigError(f"no pictures ({PICTURES}) in {', '.join(map(str, paths))}")
    return found


def load_image(path: Path, side: int) -> torch.Tensor:
    """(3, side, side) floats in [0, 1], prepared as a folder dataset's pictures are (cifar_dist.folders.decode)."""
    try:
        return torch.from_numpy(folders.decode(path, side)).permute(2, 0, 1).float() / 255
    except folders.FolderError as e:
        raise ConfigError(str(e)) from None


Classifier = tuple[Callable[[torch.Tensor], torch.Tensor], str, list[str], int]


def classifier(run: Path, onnx: bool) -> Classifier:
    """The run's model as images -> logits (normalisation built in), its TTA, its classes and the side of
    the images it takes."""
    model, cfg = load_run(run)
    summary = json.loads((run / "summary.json").read_text())
    classes = summary.get("classes") or list(summary[f"per_class_{summary.get('main_split', 'test')}_acc"])
    if onnx:
        if not (run / "model.onnx").is_file():
            raise ConfigError(f"{run / 'model.onnx'} is missing: export it with `python -m cifar_dist.export {run}`")
        import onnxruntime

        session = onnxruntime.InferenceSession(str(run / "model.onnx"), providers=["CPUExecutionProvider"])
        return (lambda x: torch.from_numpy(session.run(None, {"images": x.contiguous().numpy()})[0]), cfg.tta, classes,
                cfg.model.image_size)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device)
    return (lambda x: model(x.to(device)).cpu()), cfg.tta, classes, cfg.model.image_size


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="a finished run's output directory")
    p.add_argument("images", type=Path, nargs="+", help=f"pictures ({PICTURES}), or folders of them")
    p.add_argument("--top-k", type=int, default=3, help="classes to show per image (default 3)")
    p.add_argument("--onnx", action="store_true", help="use model.onnx through onnxruntime (after cifar_dist.export)")
    p.add_argument("--json", action="store_true", help="one JSON object per image, for scripts")
    args = p.parse_args(argv)
    try:
        model, tta, classes, side = classifier(args.run, args.onnx)
        if not 1 <= args.top_k <= len(classes):
            raise ConfigError(f"--top-k must be in 1..{len(classes)} (the run's classes), got {args.top_k}")
        paths = image_paths(args.images)
        images = torch.stack([load_image(path, side) for path in paths])  # every file read before any answer
    except ConfigError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    with torch.no_grad():
        probs = torch.cat([predict(model, x, tta).softmax(1) for x in images.split(BATCH)])
    top = probs[:, :len(classes)].topk(args.top_k, dim=1)
    for path, values, indices in zip(paths, top.values.tolist(), top.indices.tolist()):
        ranked = [(classes[i], p) for i, p in zip(indices, values)]
        if args.json:
            print(json.dumps(dict(path=str(path), top=[{"class": c, "probability": round(p, 6)} for c, p in ranked])))
        else:
            print(f"{path}: " + ", ".join(f"{c} {p:.3f}" for c, p in ranked))
    return 0


if __name__ == "__main__":
    sys.exit(main())

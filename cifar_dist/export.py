"""Export a finished run to ONNX: `python -m cifar_dist.export <output-dir>` writes
`<output-dir>/model.onnx` (one file, dynamic batch; opens in Netron), checks it with onnx.checker and
compares onnxruntime's outputs with PyTorch's on test images.

The exported graph takes float32 RGB images in [0, 1], shape (N, 3, S, S), S the run's --image-size (32
unless set): the run's normalisation is built in, so callers need no statistics.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from cifar_dist import data as D
from cifar_dist.config import Config, ConfigError, OneLineParser, resolve
from cifar_dist.model import build_model

PROG = "cifar_dist.export"


def load_run(run: Path) -> tuple[torch.nn.Module, Config]:
    """A finished run's model (weights loaded, eval mode, normalisation built in) and its config."""
    for name in ("config.yaml", "model.pt", "summary.json"):
        if not (run / name).is_file():
            raise ConfigError(f"{run / name} is missing: is {run} a finished cifar-dist run?")
    cfg = resolve(["--config", str(run / "config.yaml")])
    norm = json.loads((run / "summary.json").read_text())["normalization"]
    model = build_model(cfg.model)
    model.load_state_dict(torch.load(run / "model.pt", map_location="cpu"))
    return torch.nn.Sequential(D.Normalize(norm["mean"], norm["std"], scale=1.0), model).eval(), cfg


def export(run: Path, batch: int = 64) -> tuple[float, float]:
    """Write run/model.onnx; return the largest |onnxruntime - PyTorch| difference on test images,
    absolute and relative to the largest logit (float32 rounding grows with the logits' size)."""
    import onnx
    import onnxruntime

    model, cfg = load_run(run)
    images = D.load_data(cfg).test.images[:batch].float() / 255
    path = run / "model.onnx"
    torch.onnx.export(model, (images[:2],), str(path), dynamo=True, external_data=False, verbose=False,
                      input_names=["images"], output_names=["logits"],
                      dynamic_shapes=({0: torch.export.Dim("batch")},))
    onnx.checker.check_model(onnx.load(str(path)))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": images.numpy()})[0]
    with torch.no_grad():
        want = model(images).numpy()
    diff = float(np.abs(got - want).max())
    return diff, diff / max(1.0, float(np.abs(want).max()))


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="a finished run's output directory")
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="largest allowed |ONNX - PyTorch| difference, relative to max(1, largest |logit|)")
    args = p.parse_args(argv)
    try:
        diff, rel = export(args.run)
    except (ConfigError, D.DataError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.run / 'model.onnx'}: onnx.checker passed; max |onnxruntime - pytorch| = {diff:.2e} "
          f"({rel:.2e} relative to the largest logit) on test images")
    if rel > args.tolerance:
        print(f"{PROG}: error: ONNX outputs differ from PyTorch's by {rel:.2e} > {args.tolerance}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

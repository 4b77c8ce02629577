"""What the network sees and how training went: feature maps of the stem and every block, input samples,
the confusion matrix and the curves. Every picture is a uint8 HWC array, saved as PNG under the run's
directory and handed to the trackers."""
from __future__ import annotations

from pathlib import Path
from typing import cast

import numpy as np
import torch
from accelerate import Accelerator
from PIL import Image

from cifar_dist import tracking
from cifar_dist.distributed import unwrap
from cifar_dist.model import ResNet, forward_outputs
from cifar_dist.rundir import replacing


def layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The stem, then every residual block, of any architecture in the family."""
    net = cast(ResNet, model)
    return [("stem", net.stem)] + [(f"block{i}", b) for i, b in enumerate(net.blocks)]


def to_uint8(grid: torch.Tensor) -> np.ndarray:
    """CHW float in [0, 1] -> HWC uint8."""
    return (grid.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


@torch.no_grad()
def feature_maps(model: torch.nn.Module, images: torch.Tensor, channels: int = 8) -> dict[str, np.ndarray]:
    """For each layer, one grid: a row per input image, its first `channels` maps (each scaled to
    its own min..max, upsampled to 32x32 so deep, small maps stay visible)."""
    grids = {}
    for name, fmap in forward_outputs(model, dict(layers(model)), images):
        maps = fmap[:, :channels].float()
        n, k = maps.shape[:2]
        title = (f"{name}: channels 1-{k} of {fmap.shape[1]}, {fmap.shape[2]}x{fmap.shape[3]} "
                 f"({'upsampled, ' if maps.shape[-1] < 32 else ''}each map scaled to its own range), one image a row")
        lo = maps.amin(dim=(2, 3), keepdim=True)
        hi = maps.amax(dim=(2, 3), keepdim=True)
        maps = (maps - lo) / (hi - lo).clamp_min(1e-6)
        maps = torch.nn.functional.interpolate(maps, size=32, mode="nearest") if maps.shape[-1] < 32 else maps
        grid = to_uint8(tile(maps, pad=2))
        grids[name] = titled(grid, title)
    return grids


def tile(maps: torch.Tensor, pad: int) -> torch.Tensor:
    """(rows, columns, H, W) maps in [0, 1] -> one RGB grid, `pad` white pixels around and between them:
    torchvision's make_grid, without importing torchvision for it (0.7 CPU-seconds of every run's start)."""
    rows, cols, h, w = maps.shape
    padded = torch.nn.functional.pad(maps, (0, pad, 0, pad), value=1.0)  # each map with the gap after it
    grid = padded.permute(0, 2, 1, 3).reshape(rows * (h + pad), cols * (w + pad))
    return torch.nn.functional.pad(grid, (pad, 0, pad, 0), value=1.0).expand(3, -1, -1)  # and the first border


def titled(array: np.ndarray, title: str, scale: int = 2) -> np.ndarray:
    """The picture enlarged `scale` times (pixels kept sharp) under a line of text saying what it shows."""
    from PIL import ImageDraw

    picture = Image.fromarray(array).resize((array.shape[1] * scale, array.shape[0] * scale), Image.Resampling.NEAREST)
    width = max(picture.width, 6 * len(title) + 8)  # PIL's default font: about 6 pixels a character
    canvas = Image.new("RGB", (width, picture.height + 16), "white")
    canvas.paste(picture.convert("RGB"), (0, 16))
    ImageDraw.Draw(canvas).text((4, 2), title, fill="black")
    return np.asarray(canvas)


def publish(accelerator: Accelerator, trackers: list[str], pictures: dict[str, np.ndarray], folder: Path,
            step: int, prefix: str = "") -> None:
    """Main process: each picture as folder/<name>.png and to the trackers as <prefix><name>."""
    for name, array in pictures.items():
        save_png(array, folder / f"{name}.png")
    tracking.log_images(accelerator, trackers, {f"{prefix}{k}": v for k, v in pictures.items()}, step)


def log_feature_maps(accelerator: Accelerator, trackers: list[str], model: torch.nn.Module, images: torch.Tensor,
                     channels: int, folder: Path, step: int) -> None:
    """Main process: feature-map grids of the stem and every block, as PNGs and to the trackers."""
    grids = feature_maps(unwrap(accelerator, model), images, channels)
    publish(accelerator, trackers, grids, folder, step, prefix="features/")


def save_png(array: np.ndarray, path: Path) -> None:
    """Written whole or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display on cluster nodes), imported when first drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_to_array(fig) -> np.ndarray:
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def sample_grid(images: torch.Tensor, labels: torch.Tensor, classes: list[str], per_row: int = 8,
                scale: int = 4, predicted: torch.Tensor | None = None) -> np.ndarray:
    """Input samples (uint8 NCHW), each enlarged `scale` times (nearest: the pixels the network sees)
    above its class name; with `predicted` (a trained run's answers), the answer, in red under the true
    class where it is wrong. Drawn with Pillow, not matplotlib: every run draws it at its start, and a
    grid of subplots took over a second of CPU there."""
    from PIL import ImageDraw

    n, (h, w) = len(images), images.shape[-2:]
    line = 14
    caption = line * (1 if predicted is None else 2)
    rows, cell_w, cell_h, gap = (n + per_row - 1) // per_row, w * scale, h * scale, 4
    canvas = Image.new("RGB", (per_row * (cell_w + gap) + gap, rows * (cell_h + caption + gap) + gap), "white")
    draw = ImageDraw.Draw(canvas)
    for i in range(n):
        x, y = gap + (i % per_row) * (cell_w + gap), gap + (i // per_row) * (cell_h + caption + gap)
        picture = Image.fromarray(images[i].permute(1, 2, 0).cpu().numpy())
        canvas.paste(picture.resize((cell_w, cell_h), Image.Resampling.NEAREST), (x, y))
        true = classes[int(labels[i])]
        if predicted is None:
            draw.text((x + cell_w / 2, y + cell_h + line / 2), true, fill="black", anchor="mm")
            continue
        answer = classes[int(predicted[i])]
        right = answer == true
        draw.text((x + cell_w / 2, y + cell_h + line / 2), f"{answer}" if right else f"said {answer}",
                  fill="black" if right else "red", anchor="mm")
        if not right:
            draw.text((x + cell_w / 2, y + cell_h + 3 * line / 2), f"is {true}", fill="gray", anchor="mm")
    return np.asarray(canvas)


@torch.no_grad()
def predictions(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The classes a model answers for normalised images, in eval mode (its training mode kept)."""
    was_training = model.training
    model.eval()
    try:
        return model.forward(images).argmax(1)  # not __call__: as forward_outputs, past a compiled wrapper
    finally:
        model.train(was_training)


MAX_ANNOTATED_CLASSES = 20  # beyond, a confusion matrix's cell numbers are unreadable


def confusion_figure(matrix: np.ndarray, classes: list[str]) -> np.ndarray:
    """Confusion matrix (rows: true class, columns: predicted), with per-class accuracy. Many classes
    (CIFAR-100): no numbers in the cells, small labels, and beside it the per-class accuracy sorted."""
    plt = pyplot()
    per_class = matrix.diagonal() / matrix.sum(1).clip(min=1)
    many = len(classes) > MAX_ANNOTATED_CLASSES
    fig, axes = plt.subplots(1, 2 if many else 1, figsize=(22, 16) if many else (7, 6),
                             gridspec_kw=dict(width_ratios=[3, 1]) if many else None)
    ax = axes[0] if many else axes
    ax.imshow(matrix, cmap="Blues")
    size = 4 if many else 8
    ax.set_xticks(range(len(classes)), classes, rotation=90 if many else 45, ha="center" if many else "right",
                  fontsize=size)
    ax.set_yticks(range(len(classes)), [f"{c} ({a:.0%})" for c, a in zip(classes, per_class)], fontsize=size)
    if many:
        order = np.argsort(per_class)
        axes[1].barh(range(len(classes)), per_class[order], color="tab:blue")
        axes[1].set_yticks(range(len(classes)), [classes[i] for i in order], fontsize=size)
        axes[1].set_xlim(0, 1)
        axes[1].set_title("per-class accuracy, sorted")
    if not many:
        for (i, j), v in np.ndenumerate(matrix):
            ax.text(j, i, int(v), ha="center", va="center", fontsize=7,
                    color="white" if v > matrix.max() / 2 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true (per-class accuracy)")
    ax.set_title(f"test accuracy {matrix.diagonal().sum() / max(matrix.sum(), 1):.2%}")
    fig.tight_layout()
    array = figure_to_array(fig)
    plt.close(fig)
    return array


def curves_figure(history: list[dict]) -> np.ndarray:
    """Loss and accuracy per epoch, train and test (and validation when held out)."""
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for split in ("train", "val", "test"):
        done = [m for m in history if f"{split}_loss" in m]  # (--eval-every skips epochs)
        if done:
            epochs = [m["epoch"] for m in done]
            ax1.plot(epochs, [m[f"{split}_loss"] for m in done], marker="o", ms=3, label=split)
            ax2.plot(epochs, [100 * m[f"{split}_acc"] for m in done], marker="o", ms=3, label=split)
    ax1.set(xlabel="epoch", ylabel="loss", title="loss")
    last = next((m for m in reversed(history) if "test_acc" in m or "val_acc" in m), None)
    final = "test" if last and "test_acc" in last else "val"
    title = f"accuracy (last {final} {100 * last[f'{final}_acc']:.2f}%)" if last else "accuracy"
    ax2.set(xlabel="epoch", ylabel="accuracy (%)", title=title)
    from matplotlib.ticker import MaxNLocator

    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole: no tick at 1.2
    fig.tight_layout()
    array = figure_to_array(fig)
    plt.close(fig)
    return array


def search_figure(reports: dict[str, list[dict]], sizes: dict[str, tuple[int | None, float | None, str]],
                  best: str | None) -> np.ndarray:
    """A search at a glance. Left: validation accuracy per trial per epoch, one line per trial, in the
    order it reported: a PBT exploit (the trial goes on from a top trial's checkpoint) is a dotted jump
    to a triangle; a trial that stopped early ends in a cross. Right: each trial's last validation
    accuracy against its parameters, the best one starred. `reports`: trial -> its reports (epoch,
    val_acc, exploits); `sizes`: trial -> (parameters, last val acc, status)."""
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    colors = plt.get_cmap("tab20").colors
    for i, (trial, rows) in enumerate(sorted(reports.items())):
        rows = [r for r in rows if "val_acc" in r]
        color, wide = colors[i % len(colors)], 2.5 if trial == best else 1.0
        for life in sorted({r["exploits"] for r in rows}):
            part = [r for r in rows if r["exploits"] == life]
            ax1.plot([r["epoch"] for r in part], [100 * r["val_acc"] for r in part], color=color, lw=wide,
                     marker="o", ms=3, label=trial if life == 0 else None)
            before = [r for r in rows if r["exploits"] < life]
            if before:  # the jump: from this trial's last own report to its first on the copied weights
                jump = before[-1], part[0]
                ax1.plot([r["epoch"] for r in jump], [100 * r["val_acc"] for r in jump], color=color, ls=":", lw=1)
                ax1.plot(part[0]["epoch"], 100 * part[0]["val_acc"], "^", color=color, ms=8)
        if rows and sizes.get(trial, (None, None, ""))[2] == "stopped early":
            ax1.plot(rows[-1]["epoch"], 100 * rows[-1]["val_acc"], "x", color=color, ms=9, mew=2)
    ax1.plot([], [], "k^", label="exploit: copied a top trial")
    ax1.plot([], [], "kx", label="stopped early")
    ax1.set(xlabel="epoch", ylabel="validation accuracy (%)", title="validation accuracy per trial")
    ax1.xaxis.get_major_locator().set_params(integer=True)
    ax1.legend(fontsize=7, ncol=2)
    points = [(trial, p, acc) for trial, (p, acc, _) in sizes.items() if p and acc is not None]
    for trial, p, acc in points:
        ax2.scatter(p, 100 * acc, s=160 if trial == best else 30, marker="*" if trial == best else "o",
                    color="tab:red" if trial == best else "tab:blue", zorder=3)
        if trial == best:
            ax2.annotate(f"best {trial}: {acc:.2%}", (p, 100 * acc), textcoords="offset points", xytext=(6, 6),
                         fontsize=8)
    ax2.set_xscale("log")
    ax2.set(xlabel="parameters", ylabel="last validation accuracy (%)", title="accuracy against model size")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    array = figure_to_array(fig)
    plt.close(fig)
    return array

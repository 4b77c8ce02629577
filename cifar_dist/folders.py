"""A folder of the user's own labelled pictures as a dataset (--dataset folder --data-dir PATH).

Two layouts: one subfolder per class (PATH/cat/*.jpg, PATH/dog/*.png), split here into training and test
images by a seeded, class-stratified draw (--test-fraction); or PATH/train/<class>/ beside PATH/test/<class>/
(or PATH/val/<class>/). Class names are the folder names, sorted; a model gets their number.

Every picture is prepared exactly as `cifar_dist.predict` prepares one (upright by its EXIF orientation,
transparency on white, the shorter side scaled to the run's --image-size, 32 by default, the centre
cropped), so a trained run predicts on new photos the way it was trained. The decoded set is cached as uint8
tensors, keyed by the files' paths, sizes and modification times and the resolution: the second run starts
in seconds, and from there trains exactly like CIFAR (on the device, augmented in batches).
"""
from __future__ import annotations

import hashlib
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

# What Pillow reads that people keep their pictures in.
SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CACHE_VERSION = 1  # a change in how pictures are prepared makes every cache entry stale


class FolderError(ValueError):
    """A folder that is not a dataset, or a picture that cannot be read; the message names it."""


def decode(path: Path, size: int = 32) -> np.ndarray:
    """(size, size, 3) uint8: upright (EXIF), transparency on white, the shorter side scaled to `size`, the
    centre cropped. A file Pillow cannot read raises FolderError naming it."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)  # a phone photo the way up it was shot
            if image.mode in ("RGBA", "LA", "P", "PA"):  # transparency on white, not on what lies under it
                image = image.convert("RGBA")
                image = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image)
            image = image.convert("RGB")  # decodes the whole file: a truncated one fails here
    except Exception as e:  # Pillow raises many kinds for a bad file
        raise FolderError(f"{path} is not a readable image ({type(e).__name__}: {str(e)[:80]})") from None
    w, h = image.size
    if (w, h) != (size, size):
        scale = size / min(w, h)
        image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.Resampling.LANCZOS)
        w, h = image.size
        left, top = (w - size) // 2, (h - size) // 2
        image = image.crop((left, top, left + size, top + size))
    return np.array(image, dtype=np.uint8)  # a copy torch may write to


def layout(root: Path) -> tuple[Path, Path | None]:
    """The training folder and the test folder (None: split the training folder)."""
    if not root.is_dir():
        raise FolderError(f"{root} is not a folder")
    if (root / "train").is_dir():
        tests = [root / name for name in ("test", "val") if (root / name).is_dir()]
        return root / "train", tests[0] if tests else None
    return root, None


def class_names(folder: Path) -> list[str]:
    """The class folders' names, sorted; at least two, none empty."""
    names = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not names:
        raise FolderError(f"{folder} has no class folders: put each class's pictures in a folder of its own "
                          f"({folder}/cat/*.jpg, {folder}/dog/*.jpg, ...)")
    if len(names) == 1:
        raise FolderError(f"{folder} has a single class folder ({names[0]}): a classifier needs two or more")
    for name in names:
        if not pictures(folder / name):
            raise FolderError(f"class folder {folder / name} has no pictures ({', '.join(SUFFIXES)})")
    return names


def pictures(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)


def listing(folder: Path, classes: list[str]) -> list[tuple[Path, int]]:
    """Every picture under the class folders of `folder`, with its class number; refuses a class `classes`
    does not hold (a test class that is not a training class)."""
    present = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if unknown := [name for name in present if name not in classes]:
        raise FolderError(f"{folder / unknown[0]} is a class the training pictures do not have")
    found = [(path, classes.index(name)) for name in present for path in pictures(folder / name)]
    # in the order of the file names across classes: pictures named by their index (CIFAR written out as
    # folders: bench/folders.py) keep their original order, and with it a run's data order
    return sorted(found, key=lambda item: (str(item[0].relative_to(folder / classes[item[1]])), item[1]))


def cache_key(files: list[tuple[Path, int]], size: int) -> str:
    digest = hashlib.sha256(f"v{CACHE_VERSION} {size}".encode())
    for path, label in files:
        st = path.stat()
        digest.update(f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0{label}\n".encode())
    return digest.hexdigest()[:24]


def decode_all(files: list[Path], size: int, skip_bad: bool, what: str) -> tuple[np.ndarray, list[int]]:
    """The pictures decoded on every core, with a progress line; the indices of those skipped."""
    images = np.zeros((len(files), size, size, 3), dtype=np.uint8)
    bad: list[int] = []
    start = shown = time.monotonic()  # a line every 5 s, and the last
    workers = max(1, min(len(os.sched_getaffinity(0)), 1 + len(files) // 256))
    with ProcessPoolExecutor(workers) as pool:
        for i, result in enumerate(pool.map(_decode_or_error, files, [size] * len(files), chunksize=64)):
            if isinstance(result, str):
                if not skip_bad:
                    raise FolderError(f"{result}; --skip-bad-images goes on without it")
                bad.append(i)
            else:
                images[i] = result
            if time.monotonic() - shown > 5 or i + 1 == len(files):
                shown = time.monotonic()
                rate = (i + 1) / max(1e-9, shown - start)
                print(f"decoding {what}: {i + 1:,}/{len(files):,} pictures ({rate:,.0f}/s, {workers} process(es))",
                      file=sys.stderr, flush=True)
    return images, bad


def _decode_or_error(path: Path, size: int) -> np.ndarray | str:
    try:
        return decode(path, size)
    except FolderError as e:
        return str(e)


def read(files: list[tuple[Path, int]], size: int, cache: Path, skip_bad: bool,
         what: str) -> tuple[torch.Tensor, torch.Tensor, list[str], bool]:
    """(N, 3, size, size) uint8 images and their labels, from the cache when the files are unchanged; the
    paths of the pictures skipped; whether it came from the cache."""
    entry = cache / f"{cache_key(files, size)}-{'skip' if skip_bad else 'all'}.pt"
    if entry.exists():
        saved = torch.load(entry)
        return saved["images"], saved["labels"], saved["skipped"], True
    images, bad = decode_all([path for path, _ in files], size, skip_bad, what)
    keep = np.setdiff1d(np.arange(len(files)), bad)
    pixels = torch.from_numpy(images[keep]).permute(0, 3, 1, 2).contiguous()
    labels = torch.tensor([files[i][1] for i in keep], dtype=torch.int64)
    skipped = [str(files[i][0]) for i in bad]
    cache.mkdir(parents=True, exist_ok=True)
    partial = entry.with_suffix(f".{os.getpid()}.tmp")
    torch.save(dict(images=pixels, labels=labels, skipped=skipped), partial)
    os.replace(partial, entry)  # a cache entry is whole or absent
    return pixels, labels, skipped, False


def stratified(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Training and test indices: of each class, round(fraction x its count) test images (at least one,
    and one left to train on), drawn by `seed`: the same on every rank and every rerun."""
    g = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in labels.unique(sorted=True).tolist():
        members = (labels == c).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=g)]
        k = min(len(members) - 1, max(1, round(fraction * len(members))))
        test.append(members[:k])
        train.append(members[k:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


Tensors = tuple[torch.Tensor, torch.Tensor]


def load(root: Path, size: int, test_fraction: float, seed: int, skip_bad: bool,
         cache: Path) -> tuple[Tensors, Tensors, list[str], str]:
    """The folder's training and test pictures (images, labels), the class names, and one line saying
    where they came from (the start line's, the model card's)."""
    train_dir, test_dir = layout(root)
    classes = class_names(train_dir)
    images, labels, skipped, cached = read(listing(train_dir, classes), size, cache, skip_bad, str(train_dir))
    if test_dir is None:
        tr, te = stratified(labels, test_fraction, seed)
        test, train = (images[te], labels[te]), (images[tr], labels[tr])
        how = f"a {test_fraction:g} test split of each class (seed {seed})"
    else:
        test_images, test_labels, more, hit = read(listing(test_dir, classes), size, cache, skip_bad, str(test_dir))
        test, train, skipped, cached = (test_images, test_labels), (images, labels), skipped + more, cached and hit
        how = f"{test_dir.name}/ as the test set"
    counts = ", ".join(f"{name} {int((train[1] == i).sum()):,}" for i, name in enumerate(classes))
    note = (f"folder {root} at {size}x{size}: {len(classes)} classes ({counts} training pictures), {how}"
            f"{f', {len(skipped)} unreadable skipped' if skipped else ''}; {'cached' if cached else 'decoded now'}")
    return train, test, classes, note

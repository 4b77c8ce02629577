"""CIFAR-10 and CIFAR-100 as uint8 tensors on the training device, augmented there in batches.

Reads the official binary layout (`cifar-10-batches-bin/`, our reader: torchvision has none) or the
python layout (`cifar-10-batches-py/`, torchvision's `CIFAR10`), validating every file; CIFAR-100's
(`cifar-100-binary/`, `cifar-100-python/`: fine labels) likewise; or generates a small synthetic set with
a learnable class signal. No per-image PIL work: crops and flips are done on
whole batches, on the device.
"""
from __future__ import annotations

import functools
import os
import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cifar_dist.config import Config

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
RECORD = 1 + 3 * 32 * 32  # binary layout: label byte + 3072 pixel bytes (R, G, B planes)
PER_FILE = 10000
TRAIN_FILES, TEST_FILES = [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"]


class DataError(ValueError):
    """Missing or malformed data; the message names the file."""


@dataclass
class Split:
    images: torch.Tensor  # uint8 (N, 3, side, side): 32 for CIFAR, --image-size for a folder
    labels: torch.Tensor  # int64 (N,)

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device) -> Split:
        return Split(self.images.to(device), self.labels.to(device))

    def take(self, idx: torch.Tensor) -> Split:
        return Split(self.images[idx], self.labels[idx])


@dataclass
class Data:
    train: Split
    test: Split
    val: Split | None
    classes: list[str]
    mean: tuple[float, ...]  # per channel, in [0, 1]
    std: tuple[float, ...]
    note: str = ""  # where the images came from, when that is not a file layout of CIFAR's (a folder)


# --- reading files ------------------------------------------------------------------------------

def read_bin(path: Path, records: int | None = PER_FILE) -> Split:
    """One binary-layout batch file; `records=None` accepts any whole number of records."""
    if not path.is_file():
        raise DataError(f"missing CIFAR-10 file {path}")
    size = path.stat().st_size
    if (records is not None and size != records * RECORD) or size == 0 or size % RECORD:
        want = f"{records * RECORD} bytes ({records} records of {RECORD})" if records else f"a multiple of {RECORD}"
        raise DataError(f"{path} has {size} bytes, expected {want}: truncated or not CIFAR-10")
    raw = np.fromfile(path, dtype=np.uint8).reshape(-1, RECORD)
    return _split(raw[:, 1:], raw[:, 0], path)


@functools.cache
def _torchvision_reader() -> type:
    """torchvision's CIFAR10 reader of the python layout, imported when first needed (torchvision takes
    ~1.5 s to import; runs on the binary layout never need it). Our checks replace its integrity check:
    each file present, and the official files' MD5s (torchvision's own list), so a bad file is named;
    files of another size (made by tests, or cut down by hand) are checked by their record count."""
    from torchvision.datasets import CIFAR10
    from torchvision.datasets.utils import check_integrity

    class Reader(CIFAR10):
        def __init__(self, folder: Path, train: bool, records: int | None):
            self.folder, self.records, self.base_folder = folder, records, folder.name
            super().__init__(str(folder.parent), train=train)

        def _check_integrity(self) -> bool:
            for name, md5 in self.train_list if self.train else self.test_list:
                path = self.folder / name
                if not path.is_file():
                    raise DataError(f"missing CIFAR-10 file {path}")
                if self.records == PER_FILE and not check_integrity(str(path), md5):
                    raise DataError(f"{path} fails torchvision's MD5 check: truncated or not CIFAR-10")
            return True

        def _load_meta(self) -> None:
            self.classes = CLASSES

    return Reader


def read_py(folder: Path, train: bool, records: int | None = PER_FILE) -> Split:
    """The training (5 files) or test (1 file) batches of the python layout, read by torchvision."""
    files = TRAIN_FILES if train else TEST_FILES
    try:
        ds = _torchvision_reader()(folder, train, records)
    except DataError:
        raise
    except Exception as e:  # a truncated pickle fails in many ways
        where = folder / files[0] if len(files) == 1 else f"one of {folder}/{files[0]}..{files[-1]}"
        raise DataError(f"{where} is not a readable CIFAR-10 python batch ({type(e).__name__})") from None
    if records is not None and len(ds.data) != records * len(files):
        raise DataError(f"{folder} holds {len(ds.data)} {'training' if train else 'test'} records, expected "
                        f"{records * len(files)}: truncated or not CIFAR-10")
    return _split(ds.data.transpose(0, 3, 1, 2).reshape(len(ds.data), -1), np.asarray(ds.targets), folder)


def _split(pixels: np.ndarray, labels: np.ndarray, path: Path, classes: int = 10) -> Split:
    if labels.size and labels.max() >= classes:
        raise DataError(f"{path} has label {int(labels.max())}, outside 0..{classes - 1}: not CIFAR-{classes}")
    images = torch.from_numpy(np.ascontiguousarray(pixels).reshape(-1, 3, 32, 32))
    return Split(images, torch.from_numpy(labels.astype(np.int64)))


def _cat(splits: list[Split]) -> Split:
    return Split(torch.cat([s.images for s in splits]), torch.cat([s.labels for s in splits]))


def find_layout(root: Path) -> tuple[str, Path]:
    """('bin' | 'py', folder of batch files) under root, or root itself."""
    for layout, sub, probe in (("bin", "cifar-10-batches-bin", "data_batch_1.bin"),
                               ("py", "cifar-10-batches-py", "data_batch_1")):
        for folder in (root / sub, root):
            if (folder / probe).exists():
                return layout, folder
    raise DataError(f"no CIFAR-10 in {root}: expected cifar-10-batches-bin/ or cifar-10-batches-py/ "
                    "(pass --data-dir, set CIFAR10_DIR, or add --download)")


def load_cifar10(root: Path, records: int | None = PER_FILE) -> tuple[Split, Split, list[str]]:
    layout, folder = find_layout(root)
    if layout == "bin":
        train = _cat([read_bin(folder / f"{f}.bin", records) for f in TRAIN_FILES])
        test = read_bin(folder / "test_batch.bin", records)
        meta = folder / "batches.meta.txt"
        classes = [c for c in meta.read_text().split() if c] if meta.exists() else CLASSES
    else:
        train, test = read_py(folder, True, records), read_py(folder, False, records)
        classes = CLASSES
    return train, test, classes if len(classes) == 10 else CLASSES


# --- CIFAR-100 (fine labels) ------------------------------------------------------------------------

C100_RECORD = 2 + 3 * 32 * 32  # binary layout: coarse label byte, fine label byte, pixels
C100_RECORDS = {"train": 50000, "test": 10000}


def read_bin100(path: Path, records: int) -> Split:
    """train.bin or test.bin of `cifar-100-binary/`: the fine label of each record."""
    if not path.is_file():
        raise DataError(f"missing CIFAR-100 file {path}")
    if (size := path.stat().st_size) != records * C100_RECORD:
        raise DataError(f"{path} has {size} bytes, expected {records * C100_RECORD} ({records} records of "
                        f"{C100_RECORD}): truncated or not CIFAR-100")
    raw = np.fromfile(path, dtype=np.uint8).reshape(-1, C100_RECORD)
    return _split(raw[:, 2:], raw[:, 1], path, classes=100)


def read_py100(path: Path, records: int) -> Split:
    """train or test of `cifar-100-python/`: a pickled dict with 'data' (N, 3072) and 'fine_labels'."""
    if not path.is_file():
        raise DataError(f"missing CIFAR-100 file {path}")
    try:
        with path.open("rb") as f:
            entry = pickle.load(f, encoding="latin1")
        pixels, labels = np.asarray(entry["data"], dtype=np.uint8), np.asarray(entry["fine_labels"])
    except Exception as e:  # a truncated pickle fails in many ways
        raise DataError(f"{path} is not a readable CIFAR-100 python file ({type(e).__name__})") from None
    if len(labels) != records or pixels.shape != (records, 3 * 32 * 32):
        raise DataError(f"{path} holds {len(labels)} records, expected {records}: truncated or not CIFAR-100")
    return _split(pixels, labels, path, classes=100)


def load_cifar100(root: Path, records: dict[str, int] = C100_RECORDS) -> tuple[Split, Split, list[str]]:
    """The binary layout (`cifar-100-binary/`) or the python layout (`cifar-100-python/`), under root or
    root itself; the 100 fine classes."""
    for folder in (root / "cifar-100-binary", root):
        if (folder / "train.bin").exists():
            names = folder / "fine_label_names.txt"
            classes = [c for c in names.read_text().split() if c] if names.exists() else []
            train, test = (read_bin100(folder / f"{k}.bin", records[k]) for k in ("train", "test"))
            return train, test, classes if len(classes) == 100 else [f"class{i}" for i in range(100)]
    for folder in (root / "cifar-100-python", root):
        if (folder / "train").exists():
            train, test = (read_py100(folder / k, records[k]) for k in ("train", "test"))
            return train, test, _fine_names(folder / "meta")
    raise DataError(f"no CIFAR-100 in {root}: expected cifar-100-binary/ or cifar-100-python/ "
                    "(pass --data-dir, set CIFAR100_DIR, or add --download)")


def _fine_names(meta: Path) -> list[str]:
    try:
        with meta.open("rb") as f:
            names = list(pickle.load(f, encoding="latin1")["fine_label_names"])
    except Exception:  # no meta file, or another one: the classes get numbers
        names = []
    return names if len(names) == 100 else [f"class{i}" for i in range(100)]


def download(root: Path, dataset: str = "cifar10") -> None:
    """The real download path (torchvision's, the python layout); needs the internet."""
    import torchvision

    root.mkdir(parents=True, exist_ok=True)
    reader = torchvision.datasets.CIFAR100 if dataset == "cifar100" else torchvision.datasets.CIFAR10
    for train in (True, False):
        reader(str(root), train=train, download=True)


# --- the data a run asks for ----------------------------------------------------------------------

SYNTHETIC_SIZES = (2000, 500)  # training and test images of --dataset synthetic


def synthetic(n_train: int = SYNTHETIC_SIZES[0], n_test: int = SYNTHETIC_SIZES[1], seed: int = 1234,
              size: int = 32) -> tuple[Split, Split, list[str]]:
    """Ten classes, each a smooth random colour pattern, plus noise: learnable in an epoch or two."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.nn.functional.interpolate(torch.randn(10, 3, 4, 4, generator=g), size=size,
                                                mode="bilinear", align_corners=False)

    def make(n: int) -> Split:
        labels = torch.arange(n) % 10
        labels = labels[torch.randperm(n, generator=g)]
        x = 128 + 50 * templates[labels] + 40 * torch.randn(n, 3, size, size, generator=g)
        return Split(x.clamp(0, 255).to(torch.uint8), labels)

    return make(n_train), make(n_test), [f"class{i}" for i in range(10)]


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std in [0, 1], in chunks (the float copy of 50k images would be 600 MB)."""
    s = torch.zeros(3, dtype=torch.float64)
    s2 = torch.zeros(3, dtype=torch.float64)
    for chunk in images.split(5000):
        x = chunk.to(torch.float64).div_(255)
        s += x.sum((0, 2, 3))
        s2 += (x * x).sum((0, 2, 3))
    n = images.shape[0] * images.shape[2] * images.shape[3]
    mean = s / n
    std = (s2 / n - mean**2).clamp_min(1e-12).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())


def data_root(data_dir: str, dataset: str = "cifar10") -> Path:
    env = "CIFAR100_DIR" if dataset == "cifar100" else "CIFAR10_DIR"
    return Path(data_dir or os.environ.get(env) or "data").expanduser()


def load_files(dataset: str, root: Path, download_if_missing: bool) -> tuple[Split, Split, list[str]]:
    """CIFAR-10 or CIFAR-100 from root, downloaded first when asked and missing."""
    load = load_cifar100 if dataset == "cifar100" else load_cifar10
    name = "CIFAR-100" if dataset == "cifar100" else "CIFAR-10"
    if download_if_missing:
        try:
            return load(root)
        except DataError as e:
            if not str(e).startswith("no CIFAR"):
                raise
        try:
            download(root, dataset)
        except Exception as e:  # no network, a bad archive, a full disk: one line, not a traceback
            raise DataError(f"downloading {name} into {root} failed: {e}") from None
    return load(root)


def load_data(cfg: Config) -> Data:
    """The Data a Config asks for: dataset, subsets, validation hold-out, normalisation."""
    note = ""
    if cfg.dataset == "synthetic":
        train, test, classes = synthetic(size=cfg.model.image_size)
    elif cfg.dataset == "folder":
        train, test, classes, note = load_folder(cfg)
    else:
        train, test, classes = load_files(cfg.dataset, data_root(cfg.data_dir, cfg.dataset), cfg.download)
    val = None
    if cfg.val_size:
        if cfg.val_size >= len(train):
            raise DataError(f"val_size {cfg.val_size} leaves no training images (have {len(train)})")
        perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed))
        val, train = train.take(perm[: cfg.val_size]), train.take(perm[cfg.val_size:])
    if cfg.train_subset:
        train = train.take(torch.arange(min(cfg.train_subset, len(train))))
    if cfg.test_subset:
        test = test.take(torch.arange(min(cfg.test_subset, len(test))))
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if cfg.normalize == "imagenet" else channel_stats(train.images)
    return Data(train, test, val, classes, mean, std, note)


def load_folder(cfg: Config) -> tuple[Split, Split, list[str], str]:
    """--dataset folder: the user's pictures, decoded once into the cache folder (cifar_dist.folders)."""
    from cifar_dist import folders
    from cifar_dist.machine import cache_path

    try:
        (x, y), (tx, ty), classes, note = folders.load(Path(cfg.data_dir).expanduser(), cfg.model.image_size,
                                                       cfg.test_fraction, cfg.seed, cfg.skip_bad_images,
                                                       cache_path().parent / "folders")
    except folders.FolderError as e:
        raise DataError(str(e)) from None
    return Split(x, y), Split(tx, ty), classes, note


# --- batches on the device -----------------------------------------------------------------------

def epoch_generator(seed: int, epoch: int, stream: int = 0) -> torch.Generator:
    """Same seed and epoch give the same draws on every rank and after every resume."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch * 1009 + stream)


@dataclass
class EpochPlan:
    """Every random choice of one training epoch, per position in the epoch: the image, its crop shift,
    flip and cutout corner. A function of (seed, epoch) alone, never of the world size or the rank: any
    number of processes trains the same global batches in the same order, each rank a slice of each,
    and a resume on another world size continues the same sequence."""
    order: torch.Tensor  # (positions,) image ids; the last partial global batch is dropped
    shifts: torch.Tensor | None  # (positions, 2) crop offsets (row, column) in 0..2 * padding
    flips: torch.Tensor | None  # (positions,) bool
    corners: torch.Tensor | None  # (positions, 2) cutout top-left corner


def epoch_plan(n: int, cfg: Config, epoch: int) -> EpochPlan:
    """The plan of `n` training images: the order from one generator, the augmentations from another (so
    the order does not depend on which augmentations are on)."""
    g, aug = epoch_generator(cfg.seed, epoch), epoch_generator(cfg.seed, epoch, 1)
    order = torch.randperm(n, generator=g)[: n // cfg.batch_size * cfg.batch_size]
    k = len(order)
    shifts = torch.randint(0, 2 * cfg.crop_padding + 1, (k, 2), generator=aug) if cfg.crop_padding else None
    flips = None
    if cfg.flip == "random":
        flips = torch.rand(k, generator=aug) < 0.5
    elif cfg.flip == "alternate":
        flips = _flip_start(cfg.seed)[order] ^ bool(epoch % 2)
    side = cfg.model.image_size
    corners = torch.randint(0, side - cfg.cutout + 1, (k, 2), generator=aug) if cfg.cutout else None
    return EpochPlan(order, shifts, flips, corners)


@functools.lru_cache(maxsize=4)
def _flip_start(seed: int, n: int = 60_000) -> torch.Tensor:
    """`alternate` flips: each image flips every other epoch from a random start, so over any two epochs
    it is seen both ways (fewer repeats than random flips)."""
    return torch.rand(n, generator=torch.Generator().manual_seed(seed + 77)) < 0.5


def augment(images: torch.Tensor, padding: int, shifts: torch.Tensor | None, flips: torch.Tensor | None,
            mode: str = "zeros") -> torch.Tensor:
    """Random crop (zero or reflect padding, then each image's shift) and flips, for a uint8 batch."""
    if shifts is not None:
        n, c, h, w = images.shape
        dev = images.device
        padded = torch.nn.functional.pad(images, (padding,) * 4, mode="reflect" if mode == "reflect" else "constant")
        dy, dx = shifts.to(dev).T
        rows = (dy[:, None] + torch.arange(h, device=dev))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w, device=dev))[:, None, None, :]
        chans = torch.arange(c, device=dev)[None, :, None, None]
        images = padded[torch.arange(n, device=dev)[:, None, None, None], chans, rows, cols]
    if flips is not None:
        images = torch.where(flips.to(images.device)[:, None, None, None], images.flip(-1), images)
    return images


def cutout(images: torch.Tensor, size: int, fill: torch.Tensor, corners: torch.Tensor) -> torch.Tensor:
    """One size x size square per image at its (top, left) corner, set to `fill` (uint8 per channel: the
    dataset mean, which normalises to zero, as airbench's cutout of normalised images)."""
    _, _, h, w = images.shape
    dev = images.device
    top, left = corners.to(dev).T[:, :, None]
    rows, cols = torch.arange(h, device=dev)[None], torch.arange(w, device=dev)[None]
    inside = (((rows >= top) & (rows < top + size))[:, :, None] & ((cols >= left) & (cols < left + size))[:, None, :])
    return torch.where(inside[:, None], fill.view(1, -1, 1, 1).to(dev), images)


@dataclass
class Batch:
    """One micro-batch of one rank: the images' ids in the training split, augmented, with their labels."""
    ids: torch.Tensor
    images: torch.Tensor  # uint8
    labels: torch.Tensor


def train_batches(split: Split, cfg: Config, epoch: int, rank: int, world: int,
                  mean: tuple[float, ...] = (0.0, 0.0, 0.0), start: int = 0, micro: int = 0) -> Iterator[Batch]:
    """This rank's micro-batches (of `micro` images; 0: its share / --grad-accum) for one epoch, from
    global batch `start` on (a mid-epoch resume).

    Every step consumes one GLOBAL batch of `cfg.batch_size` positions of the epoch's plan; rank r takes
    its own consecutive slice of it, so ranks see disjoint images, every rank takes the same number of
    steps, and the BatchNorm groups (consecutive images) are the same on any world size and micro-batch.
    `mean` (0..1) fills cutouts.
    """
    plan = epoch_plan(len(split), cfg, epoch)
    per_rank = cfg.batch_size // world
    fill = (torch.tensor(mean) * 255).round().to(torch.uint8)
    for step in range(start, len(plan.order) // cfg.batch_size):
        mine = torch.arange(step * cfg.batch_size + rank * per_rank, step * cfg.batch_size + (rank + 1) * per_rank)
        for pos in mine.split(micro or per_rank // cfg.grad_accum):
            ids = plan.order[pos]
            idx = ids.to(split.images.device)
            images = augment(split.images[idx], cfg.crop_padding, _at(plan.shifts, pos), _at(plan.flips, pos),
                             cfg.crop_mode)
            if plan.corners is not None:
                images = cutout(images, cfg.cutout, fill, plan.corners[pos])
            yield Batch(ids, images, split.labels[idx])


def _at(values: torch.Tensor | None, pos: torch.Tensor) -> torch.Tensor | None:
    return None if values is None else values[pos]


def eval_batches(split: Split, batch_size: int, rank: int, world: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's share of an eval set: every image on exactly one rank, none padded or repeated."""
    idx = torch.arange(rank, len(split), world, device=split.images.device)
    for m in idx.split(batch_size):
        yield split.images[m], split.labels[m]


class Normalize(torch.nn.Module):
    """Pixels -> normalised float batch: the one normalisation of training (uint8 batches on the device,
    scale 255, channels-last when asked) and of an exported model (float images in [0, 1], scale 1)."""
    mean: torch.Tensor  # buffers
    std: torch.Tensor

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], channels_last: bool = False,
                 scale: float = 255.0):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * scale, persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * scale, persistent=False)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((x.float() - self.mean) / self.std).contiguous(memory_format=self.memory_format)

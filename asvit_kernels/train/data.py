"""The data layer of the training loop: datasets, deterministic DDP-sharded batches, and batched
augmentation on the device.

Datasets (``open_dataset``); every item is ``(uint8 tensor (3, S, S), int label)``:

* ``None`` or ``"digits"`` - the bundled default: scikit-learn's ``load_digits()`` (1797 8x8 images,
  values 0..16, 10 classes; ships inside scikit-learn, no download). Upsampled to 32x32 (or
  ``image_size``) with bilinear ``F.interpolate`` (align_corners=False), scaled to 0..255,
  replicated to 3 channels. Train/val split: stratified per class, each class puts
  ``round(val_fraction * n_c)`` of its images (first in a permutation drawn from
  ``torch.Generator().manual_seed(seed)``) into val. Mean/std are measured on the train split.
  The string ``"digits"`` always means this dataset, even if a directory of that name exists.
* a CIFAR python-pickle directory, the official layouts::

      cifar-10-batches-py/  data_batch_1 .. data_batch_5, test_batch, batches.meta (optional)
      cifar-100-python/     train, test, meta (optional)

  or a directory that contains one of those two folders. Each pickle (read with
  ``encoding="latin1"``) holds ``data`` (N x 3072 uint8: the R, G, B 32x32 planes, row-major) and
  ``labels`` (CIFAR-10) or ``fine_labels`` (CIFAR-100). val is the test batch. Pickles can run
  code when loaded: open only files you trust (as with every CIFAR loader).
* an ImageFolder directory (the ImageNet layout)::

      DIR/train/<class>/**/*.{jpg,jpeg,png,ppm,bmp,pgm,tif,tiff,webp}
      DIR/val/<class>/**/*

  classes are the sorted subdirectory names of ``train`` (hidden ones, starting with ".", are
  skipped); ``val`` may lack classes but must not have one that ``train`` lacks. Images are
  decoded with Pillow (imported on first use), converted to RGB, resized so the shorter side is
  ``round(image_size / 0.875)`` (bilinear, the longer side truncated as torchvision's ``Resize``
  does) and center-cropped to ``image_size`` (default 224): the standard ImageNet eval transform.
  Random crops and flips happen later, on the device, in ``augment``.

Digits and CIFAR are held in memory as uint8 tensors (``TensorImageDataset``); ``batches`` indexes
those tensors per batch instead of collating items.

Determinism: nothing here draws from the global RNG. The split depends on ``seed`` only, the
batch order on ``(seed, epoch)`` only, an augmentation on its ``generator`` only, so a training
run killed mid-epoch resumes bit-for-bit with ``batches(..., skip=steps_done_in_epoch)``.
"""
from __future__ import annotations

import logging
import math
import os
import pickle
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ImageData", "TensorImageDataset", "ImageFolderDataset", "open_dataset",
    "batches", "num_batches", "rank_indices", "to_float", "augment", "resize",
    "CIFAR10_MEAN", "CIFAR10_STD", "CIFAR100_MEAN", "CIFAR100_STD", "IMAGENET_MEAN", "IMAGENET_STD",
]

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
Stats = tuple[float, float, float]

# Per-channel stats of the train sets in [0, 1] units. The CIFAR stds are the true per-pixel
# stds (not the often-copied 0.2023/0.1994/0.2010, which are per-image averages).
CIFAR10_MEAN: Stats = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: Stats = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN: Stats = (0.5071, 0.4865, 0.4409)
CIFAR100_STD: Stats = (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN: Stats = (0.485, 0.456, 0.406)
IMAGENET_STD: Stats = (0.229, 0.224, 0.225)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

_CIFAR10_DIR, _CIFAR100_DIR = "cifar-10-batches-py", "cifar-100-python"
_CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_LAYOUT = ("a CIFAR python-pickle directory (cifar-10-batches-py: data_batch_1..5 + test_batch; "
                 "cifar-100-python: train + test; or a directory containing one of these)")
_FOLDER_LAYOUT = "an ImageFolder (train/<class>/*.jpg and val/<class>/*.jpg)"
_DIGITS_NOTE = "None or 'digits' selects the bundled scikit-learn digits"
_LAYOUTS = f"{_CIFAR_LAYOUT} or {_FOLDER_LAYOUT}; {_DIGITS_NOTE}"

# The ImageNet eval transform's resize/crop ratio (resize to S / 0.875, center crop S).
CROP_PCT = 0.875


class ImageData(NamedTuple):
    """What ``open_dataset`` returns. Items of ``train`` and ``val`` are ``(uint8 (3, S, S), int)``
    with ``S = image_size``; ``mean``/``std`` are per-channel, in [0, 1] units."""

    train: torch.utils.data.Dataset
    val: torch.utils.data.Dataset
    num_classes: int
    image_size: int
    name: str
    mean: Stats
    std: Stats


# --------------------------------------------------------------------------------------- datasets

class TensorImageDataset(torch.utils.data.Dataset):
    """Images held in memory: ``images`` uint8 (N, 3, S, S), ``labels`` int64 (N,).

    ``indices`` (int64 (N,), optional) says which item of the source each row is (the digits split
    keeps them, so train and val can be shown disjoint); ``classes`` names the labels if known."""

    def __init__(self, images: Tensor, labels: Tensor, *, indices: Optional[Tensor] = None,
                 classes: Optional[Sequence[str]] = None):
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images: expected a uint8 tensor (N, 3, S, S), got {images.dtype} "
                             f"{tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels: expected shape ({images.shape[0]},), got {tuple(labels.shape)}")
        self.images = images
        self.labels = labels.to(torch.int64)
        self.indices = indices
        self.classes = list(classes) if classes is not None else None

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.images[i], int(self.labels[i])


class ImageFolderDataset(torch.utils.data.Dataset):
    """Image files decoded on access (Pillow): RGB, shorter side resized to ``resize_size``
    (bilinear), center crop ``image_size``. ``samples`` is a list of ``(path, label)``."""

    def __init__(self, samples: Sequence[tuple[str, int]], classes: Sequence[str], image_size: int):
        self.samples = list(samples)
        self.classes = list(classes)
        self.image_size = image_size
        self.resize_size = round(image_size / CROP_PCT)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        path, label = self.samples[i]
        return _load_image(path, self.resize_size, self.image_size), label


def _require_pil():
    try:
        from PIL import Image
    except ImportError as e:  # only ImageFolder needs it, so it is not a hard dependency
        raise ImportError("decoding ImageFolder images needs Pillow: pip install Pillow") from e
    return Image


def _load_image(path: str, resize_size: int, crop: int) -> Tensor:
    Image = _require_pil()
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
    except Exception as e:  # PIL raises several types (UnidentifiedImageError, OSError, ...)
        raise ValueError(f"cannot decode image {path}: {e}") from e
    w, h = img.size
    # torchvision's Resize(int): the shorter side becomes resize_size, the longer one is truncated.
    if w <= h:
        new_w, new_h = resize_size, int(resize_size * h / w)
    else:
        new_w, new_h = int(resize_size * w / h), resize_size
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.BILINEAR)
    if new_w < crop or new_h < crop:  # only when resize_size < crop, i.e. never from open_dataset
        raise ValueError(f"image {path}: {new_w}x{new_h} after resizing is smaller than the crop {crop}")
    left, top = int(round((new_w - crop) / 2.0)), int(round((new_h - crop) / 2.0))
    arr = np.asarray(img, dtype=np.uint8)[top:top + crop, left:left + crop]
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).contiguous()


# ----------------------------------------------------------------------------------- open_dataset

def open_dataset(path: Optional[PathLike] = None, *, image_size: Optional[int] = None,
                 val_fraction: float = 0.2, seed: int = 0) -> ImageData:
    """Open the dataset at ``path`` (see the module docstring for the layouts).

    ``image_size``: the side S of every item (default: 32 for digits and CIFAR, 224 for an
    ImageFolder). In-memory datasets are resized once, here (bilinear; CIFAR at 224 takes
    ~7.5 GB: prefer resizing batches on the device with ``resize``). ``val_fraction`` and ``seed``
    only shape the digits split (CIFAR and ImageFolder come with theirs) but are always validated.

    Raises ``FileNotFoundError`` for a missing path, ``ValueError`` for a malformed one (the
    message names the path or file and the expected layouts), ``ImportError`` when an ImageFolder
    needs Pillow and it is missing."""
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)):
        raise TypeError(f"val_fraction: expected a float in (0, 1), got {type(val_fraction).__name__}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction: expected a float in (0, 1), got {val_fraction}")
    if image_size is not None:
        _check_int("image_size", image_size, minimum=1)
    _check_int("seed", seed)

    if path is None or (isinstance(path, str) and path == "digits"):
        return _open_digits(image_size, float(val_fraction), seed)
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a str, os.PathLike or None, got {type(path).__name__}")
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"dataset path {p} does not exist; expected {_LAYOUTS}")
    if not p.is_dir():
        raise ValueError(f"dataset path {p} is not a directory; expected {_LAYOUTS}")

    kind, root = _detect(p)
    if kind == "cifar10":
        return _open_cifar(root, 10, image_size)
    if kind == "cifar100":
        return _open_cifar(root, 100, image_size)
    return _open_image_folder(root, 224 if image_size is None else image_size)


def _check_int(name: str, value: Any, *, minimum: Optional[int] = None) -> None:
    # bool is an int subclass; True as a batch size is a bug, not a 1.
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__} ({value!r})")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")


def _is_cifar10(d: Path) -> bool:
    return (d / "test_batch").is_file() or any((d / f).is_file() for f in _CIFAR10_TRAIN)


def _is_cifar100(d: Path) -> bool:
    return (d / "train").is_file() and (d / "test").is_file()


def _detect(p: Path) -> tuple[str, Path]:
    """Which layout ``p`` holds: ("cifar10" | "cifar100" | "imagefolder", its root)."""
    if _is_cifar10(p):
        return "cifar10", p
    if _is_cifar100(p):
        return "cifar100", p
    if (p / "train").is_dir() and (p / "val").is_dir():
        return "imagefolder", p
    found = [(k, p / d) for k, d, test in (("cifar10", _CIFAR10_DIR, _is_cifar10),
                                           ("cifar100", _CIFAR100_DIR, _is_cifar100))
             if (p / d).is_dir() and test(p / d)]
    if len(found) > 1:
        raise ValueError(f"dataset path {p} contains both {_CIFAR10_DIR} and {_CIFAR100_DIR}: "
                         f"pass the one you mean")
    if found:
        return found[0]
    hint = ""
    if (p / "train").is_dir() and not (p / "val").exists():
        hint = f" ({p / 'train'} exists but {p / 'val'} does not)"
    raise ValueError(f"dataset path {p} is neither {_CIFAR_LAYOUT} nor {_FOLDER_LAYOUT}{hint}; "
                     f"{_DIGITS_NOTE}")


# digits ---------------------------------------------------------------------------------------

def _open_digits(image_size: Optional[int], val_fraction: float, seed: int) -> ImageData:
    from sklearn.datasets import load_digits  # heavy import, only for the default dataset

    size = 32 if image_size is None else image_size
    digits = load_digits()
    x = torch.from_numpy(np.asarray(digits.images, dtype=np.float32)).div_(16.0).unsqueeze(1)
    labels = torch.from_numpy(np.asarray(digits.target, dtype=np.int64))
    # Straight from 8x8 to the target size (one interpolation, not 8 -> 32 -> size).
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    images = x.mul_(255.0).round_().clamp_(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()

    train_idx, val_idx = _stratified_split(labels, val_fraction, seed)
    train = TensorImageDataset(images[train_idx], labels[train_idx], indices=train_idx,
                               classes=[str(c) for c in range(10)])
    val = TensorImageDataset(images[val_idx], labels[val_idx], indices=val_idx,
                             classes=[str(c) for c in range(10)])
    # Measured on train only (val must not leak into preprocessing); grey, so equal per channel.
    t = train.images[:, 0].to(torch.float64).div_(255.0)
    mean, std = float(t.mean()), float(t.std(unbiased=False))
    logger.info("digits: %d train / %d val images, %dx%d, seed %d", len(train), len(val), size, size, seed)
    return ImageData(train, val, 10, size, "digits", (mean,) * 3, (std,) * 3)


def _stratified_split(labels: Tensor, val_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Sorted (train, val) index tensors. One permutation of all items from ``seed``; each class
    sends its first ``round(val_fraction * n_c)`` items in that permutation to val."""
    perm = torch.randperm(labels.numel(), generator=torch.Generator().manual_seed(seed))
    val_parts = []
    for c in torch.unique(labels).tolist():
        in_c = perm[labels[perm] == c]
        val_parts.append(in_c[:round(val_fraction * in_c.numel())])
    is_val = torch.zeros(labels.numel(), dtype=torch.bool)
    is_val[torch.cat(val_parts)] = True
    return torch.nonzero(~is_val).flatten(), torch.nonzero(is_val).flatten()


# CIFAR ------------------------------------------------------------------------------------------

def _load_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = pickle.load(f, encoding="latin1")
    except Exception as e:  # truncated / not a pickle: UnpicklingError, EOFError, ...
        raise ValueError(f"cannot read CIFAR pickle {path}: {e}") from e
    if not isinstance(obj, dict):
        raise ValueError(f"CIFAR pickle {path}: expected a dict, got {type(obj).__name__}")
    return obj


def _get(obj: dict, key: str, path: Path) -> Any:
    for k in (key, key.encode()):  # files re-pickled under encoding="bytes" have bytes keys
        if k in obj:
            return obj[k]
    raise ValueError(f"CIFAR pickle {path}: no key {key!r} (has {sorted(map(str, obj))})")


def _read_cifar_batch(path: Path, label_key: str, num_classes: int) -> tuple[Tensor, Tensor]:
    obj = _load_pickle(path)
    data = np.asarray(_get(obj, "data", path))
    labels = np.asarray(_get(obj, label_key, path))
    if data.ndim != 2 or data.shape[1] != 3072:
        raise ValueError(f"CIFAR pickle {path}: 'data' must be N x 3072, got shape {data.shape}")
    if data.dtype != np.uint8:
        if data.size and (data.min() < 0 or data.max() > 255):
            raise ValueError(f"CIFAR pickle {path}: 'data' values outside 0..255")
        data = data.astype(np.uint8)
    if labels.shape != (data.shape[0],):
        raise ValueError(f"CIFAR pickle {path}: {data.shape[0]} images but {labels.size} {label_key}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"CIFAR pickle {path}: {label_key} outside 0..{num_classes - 1}")
    # Row = the R, G, B planes, each 32 rows of 32: pixel (c, y, x) is data[n, c*1024 + y*32 + x].
    images = torch.from_numpy(np.ascontiguousarray(data)).view(-1, 3, 32, 32)
    return images, torch.from_numpy(labels.astype(np.int64))


def _open_cifar(root: Path, num_classes: int, image_size: Optional[int]) -> ImageData:
    if num_classes == 10:
        train_files, test_file, label_key = _CIFAR10_TRAIN, "test_batch", "labels"
        meta_file, names_key = "batches.meta", "label_names"
        name, mean, std = "cifar10", CIFAR10_MEAN, CIFAR10_STD
    else:
        train_files, test_file, label_key = ("train",), "test", "fine_labels"
        meta_file, names_key = "meta", "fine_label_names"
        name, mean, std = "cifar100", CIFAR100_MEAN, CIFAR100_STD
    for f in (*train_files, test_file):
        if not (root / f).is_file():
            raise ValueError(f"CIFAR directory {root}: missing {root / f}; expected {_LAYOUTS}")

    parts = [_read_cifar_batch(root / f, label_key, num_classes) for f in train_files]
    train_x, train_y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    val_x, val_y = _read_cifar_batch(root / test_file, label_key, num_classes)
    classes = None
    if (root / meta_file).is_file():  # optional: only names the classes
        names = _load_pickle(root / meta_file).get(names_key)
        if isinstance(names, (list, tuple)) and len(names) == num_classes:
            classes = [str(n) for n in names]

    size = 32 if image_size is None else image_size
    if size != 32:
        logger.info("%s: resizing %d images to %dx%d in memory", name, len(train_x) + len(val_x), size, size)
        train_x, val_x = _resize_uint8(train_x, size), _resize_uint8(val_x, size)
    logger.info("%s (%s): %d train / %d val images", name, root, len(train_x), len(val_x))
    return ImageData(TensorImageDataset(train_x, train_y, classes=classes),
                     TensorImageDataset(val_x, val_y, classes=classes),
                     num_classes, size, name, mean, std)


def _resize_uint8(images: Tensor, size: int, chunk: int = 1024) -> Tensor:
    out = torch.empty(images.shape[0], 3, size, size, dtype=torch.uint8)
    for i in range(0, images.shape[0], chunk):  # chunks bound the float32 temporaries
        x = images[i:i + chunk].to(torch.float32)
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        out[i:i + chunk] = x.round_().clamp_(0, 255).to(torch.uint8)
    return out


# ImageFolder ------------------------------------------------------------------------------------

def _list_images(d: Path) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(d, followlinks=True):
        dirnames.sort()  # os.walk order is the file system's; sorting makes it reproducible
        found.extend(os.path.join(dirpath, f) for f in sorted(filenames)
                     if f.lower().endswith(IMG_EXTENSIONS))
    return found


def _class_dirs(d: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(d) if e.is_dir() and not e.name.startswith("."))


def _open_image_folder(root: Path, image_size: int) -> ImageData:
    train_dir, val_dir = root / "train", root / "val"
    classes = _class_dirs(train_dir)
    if not classes:
        raise ValueError(f"ImageFolder {root}: {train_dir} has no class subdirectories; "
                         f"expected train/<class>/*.jpg and val/<class>/*.jpg")
    unknown = sorted(set(_class_dirs(val_dir)) - set(classes))
    if unknown:
        raise ValueError(f"ImageFolder {root}: {val_dir} has classes missing from {train_dir}: "
                         f"{unknown[:10]}{' ...' if len(unknown) > 10 else ''}")
    index = {c: i for i, c in enumerate(classes)}

    def samples(split_dir: Path, names: list[str]) -> list[tuple[str, int]]:
        out = []
        for c in names:
            files = _list_images(split_dir / c)
            if not files:
                raise ValueError(f"ImageFolder {root}: class directory {split_dir / c} has no images "
                                 f"(extensions {', '.join(IMG_EXTENSIONS)})")
            out.extend((f, index[c]) for f in files)
        return out

    train = ImageFolderDataset(samples(train_dir, classes), classes, image_size)
    val_classes = _class_dirs(val_dir)
    if not val_classes:
        raise ValueError(f"ImageFolder {root}: {val_dir} has no class subdirectories; "
                         f"expected val/<class>/*.jpg")
    val = ImageFolderDataset(samples(val_dir, val_classes), classes, image_size)
    logger.info("imagefolder %s: %d classes, %d train / %d val images, %dx%d", root, len(classes),
                len(train), len(val), image_size, image_size)
    return ImageData(train, val, len(classes), image_size, f"imagefolder:{root.resolve()}",
                     IMAGENET_MEAN, IMAGENET_STD)


# ---------------------------------------------------------------------------------------- batches

def _epoch_seed(seed: int, epoch: int) -> int:
    # The documented mixing rule; modulo 2**63 keeps any int a valid manual_seed argument.
    return (seed * 100_003 + epoch) % (1 << 63)


def _per_rank(n: int, world: int, drop_last: bool) -> int:
    return n // world if drop_last else -(-n // world)


def num_batches(dataset_len: int, *, batch_size: int, world: int = 1, drop_last: bool = True) -> int:
    """Batches one rank gets per epoch from ``batches`` (with ``skip=0``)."""
    _check_int("dataset_len", dataset_len, minimum=0)
    _check_int("batch_size", batch_size, minimum=1)
    _check_int("world", world, minimum=1)
    per_rank = _per_rank(dataset_len, world, drop_last)
    return per_rank // batch_size if drop_last else -(-per_rank // batch_size)


def rank_indices(dataset_len: int, *, shuffle: bool, seed: int, epoch: int, rank: int = 0,
                 world: int = 1, drop_last: bool = True) -> Tensor:
    """The int64 dataset indices rank ``rank`` visits in ``epoch``, in order.

    Order: ``torch.randperm(n)`` from ``torch.Generator().manual_seed((seed * 100003 + epoch) %
    2**63)`` when ``shuffle``, else ``0..n-1``. It is made divisible by ``world`` (truncated when
    ``drop_last``, padded by wrapping around otherwise, so a few items repeat) and rank ``r``
    takes ``order[r::world]``: every rank gets the same count, as DDP's collectives need."""
    _check_int("dataset_len", dataset_len, minimum=0)
    _check_int("seed", seed)
    _check_int("epoch", epoch, minimum=0)
    _check_int("world", world, minimum=1)
    _check_int("rank", rank, minimum=0)
    if rank >= world:
        raise ValueError(f"rank: expected 0 <= rank < world = {world}, got {rank}")
    n = dataset_len
    if shuffle:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(_epoch_seed(seed, epoch)))
    else:
        order = torch.arange(n, dtype=torch.int64)
    total = _per_rank(n, world, drop_last) * world
    if total > n:  # wrap-pad (repeatedly if n < world - 1)
        order = order.repeat(-(-total // n))
    return order[:total][rank::world]


def _in_memory(dataset: Any) -> Optional[tuple[Tensor, Tensor, Optional[Tensor]]]:
    """(images, labels, index map) when ``dataset`` is (a Subset of) in-memory tensors."""
    index_map = None
    while isinstance(dataset, torch.utils.data.Subset):
        idx = torch.as_tensor(dataset.indices, dtype=torch.int64)
        index_map = idx if index_map is None else idx[index_map]
        dataset = dataset.dataset
    if isinstance(dataset, TensorImageDataset):
        return dataset.images, dataset.labels, index_map
    if (isinstance(dataset, torch.utils.data.TensorDataset) and len(dataset.tensors) == 2
            and dataset.tensors[0].dtype == torch.uint8):
        return dataset.tensors[0], dataset.tensors[1], index_map
    return None


class _ItemError(NamedTuple):
    """A ValueError raised while loading an item in a worker, carried back as data: DataLoader
    would re-raise it in the main process with the worker's whole traceback in its message."""

    message: str


class _WorkerSafe(torch.utils.data.Dataset):
    def __init__(self, dataset: torch.utils.data.Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Any:
        try:
            return self.dataset[i]
        except ValueError as e:  # our loaders' clean, file-naming errors (e.g. an undecodable image)
            return _ItemError(str(e))


def _collate(items: list) -> Any:
    failed = next((it for it in items if isinstance(it, _ItemError)), None)
    if failed is not None:
        return failed
    images, labels = zip(*items)
    return torch.stack(images), torch.as_tensor(labels, dtype=torch.int64)


def batches(dataset: torch.utils.data.Dataset, *, batch_size: int, shuffle: bool, seed: int,
            epoch: int, rank: int = 0, world: int = 1, drop_last: bool = True, skip: int = 0,
            num_workers: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
    """One epoch of this rank's batches: CPU ``(uint8 images (B, 3, S, S), int64 labels (B,))``.

    The indices are ``rank_indices(len(dataset), ...)`` cut into consecutive batches of
    ``batch_size`` (the incomplete last one dropped when ``drop_last``). ``skip`` starts after the
    first ``skip`` batches without loading them (resuming mid-epoch); ``0 <= skip <=
    num_batches(...)``. In-memory datasets (``TensorImageDataset``, a 2-tensor uint8
    ``TensorDataset``, or ``Subset``s of them) are indexed per batch; any other dataset is loaded
    through a ``DataLoader`` with ``num_workers`` worker processes (0: in this process).

    Arguments are checked when this is called, not when iteration starts."""
    _check_int("batch_size", batch_size, minimum=1)
    _check_int("skip", skip, minimum=0)
    _check_int("num_workers", num_workers, minimum=0)
    n = len(dataset)
    idx = rank_indices(n, shuffle=shuffle, seed=seed, epoch=epoch, rank=rank, world=world,
                       drop_last=drop_last)
    nb = num_batches(n, batch_size=batch_size, world=world, drop_last=drop_last)
    if skip > nb:
        raise ValueError(f"skip: expected 0 <= skip <= {nb} (batches per epoch on this rank), got {skip}")
    chunks = [idx[b * batch_size:(b + 1) * batch_size] for b in range(skip, nb)]

    mem = _in_memory(dataset)
    if mem is not None:
        return _tensor_batches(*mem, chunks)
    return _loader_batches(dataset, chunks, num_workers)


def _tensor_batches(images: Tensor, labels: Tensor, index_map: Optional[Tensor],
                    chunks: list[Tensor]) -> Iterator[tuple[Tensor, Tensor]]:
    for c in chunks:
        if index_map is not None:
            c = index_map[c]
        yield images[c], labels[c].to(torch.int64)


def _loader_batches(dataset, chunks: list[Tensor], num_workers: int) -> Iterator[tuple[Tensor, Tensor]]:
    if not chunks:
        return
    if num_workers > 0:
        dataset = _WorkerSafe(dataset)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=[c.tolist() for c in chunks],
                                         num_workers=num_workers, collate_fn=_collate)
    for batch in loader:
        if isinstance(batch, _ItemError):
            raise ValueError(batch.message)  # the same one line as with num_workers=0
        yield batch


# ----------------------------------------------------------------------------------- augmentation
#
# Why not torchvision.transforms: RandomResizedCrop / RandomHorizontalFlip draw from the global RNG
# on every call, so what a step sees depends on everything that drew before it (other ranks' drop
# path, data-loader workers, a resume that skipped batches) and a resumed run would not be
# bit-for-bit the same; they also work one image at a time on the CPU. Here one (B, 5) draw from
# an explicit generator builds B affine matrices and one grid_sample call warps the whole batch on
# its device.

def _stats(values: Sequence[float], name: str, device: torch.device) -> Tensor:
    t = torch.as_tensor(values, dtype=torch.float32, device=device)
    if t.shape != (3,):
        raise ValueError(f"{name}: expected 3 per-channel values, got {tuple(t.shape)}")
    return t.view(3, 1, 1)


def _check_images(images: Tensor, name: str = "images") -> None:
    if not isinstance(images, Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(images).__name__}")
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"{name}: expected uint8 (B, 3, H, W), got {images.dtype} {tuple(images.shape)}")


def _normalize(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    m, s = _stats(mean, "mean", x.device), _stats(std, "std", x.device)
    if bool((s <= 0).any()):
        raise ValueError(f"std: expected positive values, got {list(std)}")
    # (x / 255 - m) / s as one fused multiply-add: x * (1 / (255 s)) + (-m / s).
    return torch.addcmul(-m / s, x, 1.0 / (255.0 * s))


def to_float(images_uint8: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 (B, 3, H, W) on any device -> float32 ``(x / 255 - mean) / std``, same device."""
    _check_images(images_uint8, "images_uint8")
    return _normalize(images_uint8.to(torch.float32), mean, std)


def augment(images_uint8: Tensor, generator: torch.Generator, *, mean: Sequence[float],
            std: Sequence[float], out_size: Optional[int] = None,
            scale: tuple[float, float] = (0.35, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
            flip: bool = True) -> Tensor:
    """Random-resized crop + horizontal flip + normalisation of a uint8 (B, 3, H, W) batch, on
    its device, in one batched ``F.affine_grid`` + ``F.grid_sample`` call (bilinear,
    align_corners=False, border padding). Returns float32 (B, 3, out, out) (out_size None: H, W).

    Per image: the crop covers an area fraction ``a ~ U(scale)`` of the image with aspect ratio
    (width / height) ``r``, ``log r ~ U(log ratio)``; its width and height are clamped to the
    image (torchvision rejects and redraws instead; clamping keeps the draw count fixed); its
    center is uniform over the positions that keep it inside. With ``flip`` the crop is mirrored
    with probability 1/2 (a sign in the same affine matrix). Random numbers: one
    ``torch.rand((B, 5), generator=generator)`` on the batch's device (``generator`` must live
    there), nothing from the global RNG. No antialiasing when a crop is shrunk."""
    _check_images(images_uint8, "images_uint8")
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator, got {type(generator).__name__}")
    dev = images_uint8.device
    if generator.device.type != dev.type:
        raise ValueError(f"generator: on {generator.device}, but the images are on {dev}")
    lo_s, hi_s = (float(v) for v in scale)
    lo_r, hi_r = (float(v) for v in ratio)
    if not 0.0 < lo_s <= hi_s <= 1.0:
        raise ValueError(f"scale: expected 0 < min <= max <= 1, got {tuple(scale)}")
    if not 0.0 < lo_r <= hi_r:
        raise ValueError(f"ratio: expected 0 < min <= max, got {tuple(ratio)}")
    B, _, H, W = images_uint8.shape
    if out_size is None:
        oh, ow = H, W
    else:
        _check_int("out_size", out_size, minimum=1)
        oh = ow = int(out_size)
    if B == 0:
        return torch.empty(0, 3, oh, ow, dtype=torch.float32, device=dev)

    u = torch.rand((B, 5), generator=generator, device=dev, dtype=torch.float32)
    area = (lo_s + (hi_s - lo_s) * u[:, 0]) * (H * W)
    log_r = math.log(lo_r) + (math.log(hi_r) - math.log(lo_r)) * u[:, 1]
    r = torch.exp(log_r)
    cw = torch.sqrt(area * r).clamp(max=W)   # crop size in pixels
    ch = torch.sqrt(area / r).clamp(max=H)
    cx = cw / 2 + u[:, 2] * (W - cw)          # crop center in pixel-edge coordinates
    cy = ch / 2 + u[:, 3] * (H - ch)
    sign = torch.where(u[:, 4] < 0.5, -1.0, 1.0) if flip else torch.ones_like(cw)
    # theta maps output coords in [-1, 1] to input coords in [-1, 1] (align_corners=False: -1 and
    # 1 are the outer pixel edges, so the crop's edges map exactly onto the output's edges).
    theta = torch.zeros(B, 2, 3, dtype=torch.float32, device=dev)
    theta[:, 0, 0] = sign * cw / W
    theta[:, 0, 2] = 2 * cx / W - 1
    theta[:, 1, 1] = ch / H
    theta[:, 1, 2] = 2 * cy / H - 1
    grid = F.affine_grid(theta, [B, 3, oh, ow], align_corners=False)
    # border: output pixels near a crop edge that is an image edge sample half a pixel outside;
    # replicating the edge (as F.interpolate does) instead of blending in zeros.
    x = F.grid_sample(images_uint8.to(torch.float32), grid, mode="bilinear", padding_mode="border",
                      align_corners=False)
    return _normalize(x, mean, std)


def resize(images: Tensor, size: int) -> Tensor:
    """Float (B, 3, H, W) -> (B, 3, size, size), bilinear, align_corners=False, no antialias (the
    same resampling as ``augment``); the input itself when it already is size x size."""
    if not isinstance(images, Tensor) or not images.is_floating_point() or images.dim() != 4:
        raise TypeError(f"images: expected a float (B, C, H, W) tensor, got "
                        f"{getattr(images, 'dtype', type(images).__name__)} "
                        f"{tuple(getattr(images, 'shape', ()))}")
    _check_int("size", size, minimum=1)
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False,
                         antialias=False)

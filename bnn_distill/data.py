"""Dataset registry: CIFAR-10/100, (Fashion-)MNIST, an embedded Fashion-MNIST subset, ImageFolder
and a synthetic stand-in.

Every dataset yields ``(image, label)`` with ``image`` a float32 tensor (C, H, W), normalised per
channel as ``(x / 255 - mean[c]) / std[c]``, and ``label`` an ``int``.

Small datasets are held in memory as one uint8 tensor (N, C, H, W) (:class:`TensorImageDataset`)
and augmented per sample with torch ops (no PIL): random crop of the zero-padded image (pad 4 px
for 32x32, 2 px for 28x28) and, where it makes sense, a horizontal flip with probability 1/2.
The random draws use torch's global generator, so ``torch.manual_seed`` (and DataLoader's
per-worker seeding) makes them reproducible.

Usage::

    train, test, info = build_datasets("fmnist_subset", limit_train=1000)
"""

from __future__ import annotations

import gzip
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset, Subset

from .errors import DataError, RecipeError, choices, closest

log = logging.getLogger(__name__)

DEFAULT_ROOT = Path("data")
#: Where Debian's ``dataset-fashion-mnist`` package puts the gzipped IDX files.
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
FMNIST_SUBSET_FILE = "fmnist_subset.npz"


@dataclass(frozen=True)
class DatasetInfo:
    """Static description of a dataset; ``image_size`` is H == W of a training sample."""

    name: str
    num_classes: int
    in_chans: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...]


class Builder(Protocol):
    """Builds ``(train, test, info)``; ``root`` is the user's value (``None`` = dataset default)."""

    def __call__(
        self, root: str | None, download: bool, augment: bool, seed: int
    ) -> tuple[Dataset, Dataset, DatasetInfo]: ...


@dataclass(frozen=True)
class DatasetSpec:
    """A registry entry: static ``info``, its ``build`` function and, for datasets whose classes
    live on disk, ``info_from_root(root) -> DatasetInfo``."""

    info: DatasetInfo
    build: Builder
    info_from_root: Callable[[Path], DatasetInfo] | None = None


DATASETS: dict[str, DatasetSpec] = {}


def register_dataset(
    name: str, *, info: DatasetInfo, info_from_root: Callable[[Path], DatasetInfo] | None = None
) -> Callable[[Builder], Builder]:
    """Decorator adding a builder to :data:`DATASETS` under ``name``."""
    assert info.name == name, (info.name, name)

    def decorate(build: Builder) -> Builder:
        assert name not in DATASETS, f"dataset {name!r} registered twice"
        DATASETS[name] = DatasetSpec(info=info, build=build, info_from_root=info_from_root)
        return build

    return decorate


def dataset_names() -> list[str]:
    """Registered dataset names, sorted."""
    return sorted(DATASETS)


def _spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise RecipeError(f"unknown dataset '{name}'{closest(name, DATASETS)}; choose one of {choices(DATASETS)}")
    return DATASETS[name]


def dataset_info(name: str, root: str | os.PathLike[str] | None = None) -> DatasetInfo:
    """Describe dataset ``name`` without loading it.

    For ``imagefolder`` the classes are the folders under ``root/train``: pass ``root`` to count
    them, otherwise ``num_classes`` is 0 and ``classes`` empty (``build_datasets`` fills them in).
    """
    spec = _spec(name)
    if spec.info_from_root is not None and root is not None:
        return spec.info_from_root(Path(root))
    return spec.info


def build_datasets(
    name: str,
    root: str | None = None,
    download: bool = False,
    augment: bool = True,
    limit_train: int | None = None,
    limit_test: int | None = None,
    seed: int = 0,
) -> tuple[Dataset, Dataset, DatasetInfo]:
    """Build ``(train, test, info)`` for dataset ``name``.

    ``root`` defaults to ``./data`` for the torchvision datasets; ``download`` lets torchvision
    fetch missing files; ``augment=False`` gives the train split the test transform;
    ``limit_*`` keep the class-balanced first-N subset of :func:`balanced_indices`; ``seed`` only
    affects generated data (``synthetic``). :func:`build_splits` also holds out a validation split.
    """
    s = build_splits(name, root, download, augment, limit_train, limit_test, seed)
    return s.train, s.test, s.info


@dataclass(frozen=True)
class Splits:
    """``train`` (augmented unless asked otherwise), ``val`` (held out of the training data, test
    transform; ``None`` without a validation split), ``test`` and ``info``."""

    train: Dataset
    val: Dataset | None
    test: Dataset
    info: DatasetInfo


def validation_indices(labels: Tensor | Sequence[int], n: int, seed: int) -> Tensor:
    """A seeded, class-balanced choice of ``n`` of ``labels``' indices, ascending (n,) int64.

    The samples are shuffled by ``seed`` first, then :func:`balanced_indices` takes the first of
    every class in that order, the second of every class, and so on: every class gets ``n //
    classes`` or one more (while it has samples), and a different seed draws other samples.
    """
    labels = torch.as_tensor(labels, dtype=torch.int64).flatten()
    perm = torch.randperm(labels.numel(), generator=torch.Generator().manual_seed(seed))
    return torch.sort(perm[balanced_indices(labels[perm], n)]).values


def build_splits(
    name: str,
    root: str | None = None,
    download: bool = False,
    augment: bool = True,
    limit_train: int | None = None,
    limit_test: int | None = None,
    seed: int = 0,
    val_size: int | None = None,
    val_fraction: float | None = None,
    val_seed: int = 0,
) -> Splits:
    """Build the train / validation / test splits of dataset ``name``.

    ``val_size`` images (or ``val_fraction`` of the training split) are held out of the training
    split with :func:`validation_indices` (seed ``val_seed``) before ``limit_train`` picks its
    subset of the rest; the validation split gets the test transform. The test split is never
    touched by the split. Other arguments as in :func:`build_datasets`.
    """
    spec = _spec(name)
    for key, limit in (("limit_train", limit_train), ("limit_test", limit_test), ("val_size", val_size)):
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise RecipeError(f"data.{key} must be a positive integer or null, got {limit!r}")
    train, test, info = spec.build(root=root, download=download, augment=augment, seed=seed)
    val = None
    n_val = val_size if val_size is not None else (round(val_fraction * len(train)) if val_fraction else 0)
    if n_val:
        if n_val >= len(train):  # type: ignore[arg-type]
            raise RecipeError(
                f"data.val_size: {n_val} validation images leave none of the {len(train)} "
                f"training images of {name} to train on; hold out fewer"
            )
        held = validation_indices(_targets(train), n_val, val_seed)
        keep = torch.ones(len(train), dtype=torch.bool)  # type: ignore[arg-type]
        keep[held] = False
        plain = (
            train
            if not augment
            else (
                train.plain()
                if isinstance(train, TensorImageDataset)
                else spec.build(root=root, download=False, augment=False, seed=seed)[0]
            )
        )
        val, train = _take(plain, held), _take(train, torch.nonzero(keep).flatten())
    train, test = _limit(train, limit_train), _limit(test, limit_test)
    log.info(
        "dataset %s: %d train, %s validation, %d test, %d classes, %dx%dx%d",
        name,
        len(train),
        len(val) if val is not None else "no",
        len(test),
        info.num_classes,
        info.in_chans,
        info.image_size,
        info.image_size,
    )
    return Splits(train, val, test, info)


# --------------------------------------------------------------------------- subsets


def balanced_indices(labels: Tensor | Sequence[int], n: int) -> Tensor:
    """Indices of a deterministic, class-balanced-as-possible first-``n`` subset, ascending.

    Rank every sample within its class by position (0 = first sample of that class), then take
    samples in order of ``(rank, label)``: the first of every class, then the second of every
    class, and so on; classes that run out leave their share to the others. Result (min(n, N),)
    int64.
    """
    labels = torch.as_tensor(labels, dtype=torch.int64).flatten()
    if n >= labels.numel():
        return torch.arange(labels.numel())
    order = torch.argsort(labels, stable=True)  # grouped by class, stable inside
    grouped = labels[order]
    counts = torch.bincount(grouped)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(labels)
    rank[order] = torch.arange(labels.numel()) - starts[grouped]
    key = rank * (int(labels.max()) + 1) + labels
    return torch.sort(torch.argsort(key, stable=True)[:n]).values


def _targets(dataset: Dataset) -> Tensor:
    targets = getattr(dataset, "targets", None)
    assert targets is not None, f"{type(dataset).__name__} has no .targets"
    return torch.as_tensor(targets, dtype=torch.int64)


def _limit(dataset: Dataset, n: int | None) -> Dataset:
    if n is None or n >= len(dataset):  # type: ignore[arg-type]
        return dataset
    return _take(dataset, balanced_indices(_targets(dataset), n))


class _LabelledSubset(Subset):
    """A :class:`~torch.utils.data.Subset` that keeps ``targets``, so it can be split again."""

    def __init__(self, dataset: Dataset, indices: Sequence[int]) -> None:
        super().__init__(dataset, list(indices))
        self.targets = _targets(dataset)[torch.as_tensor(self.indices, dtype=torch.int64)]


def _take(dataset: Dataset, indices: Tensor) -> Dataset:
    if isinstance(dataset, TensorImageDataset):
        return dataset.subset(indices)
    return _LabelledSubset(dataset, indices.tolist())


# --------------------------------------------------------------------------- in-memory data


class TensorImageDataset(Dataset):
    """uint8 images (N, C, H, W) and int labels (N,) in memory, augmented with torch ops.

    ``__getitem__`` returns ``(x, y)``, x float32 (C, H, W). With ``augment``: pad the image by
    ``pad`` zero pixels per side, crop a random H x W window (offsets uniform in ``0..2*pad``),
    flip left-right with probability 1/2 if ``flip``. Then ``x = (img / 255 - mean) / std``.

    The random draws come from torch's global generator, or, after :meth:`set_epoch_seed`, from a
    generator seeded by ``(epoch seed, index)``: every sample's augmentation is then fixed by the
    epoch alone, whichever process or worker loads it and whatever was loaded before, so a run
    resumed in the middle of an epoch sees exactly the images the uninterrupted run saw.
    """

    def __init__(
        self,
        images: Tensor,
        targets: Tensor,
        mean: Sequence[float],
        std: Sequence[float],
        augment: bool = False,
        pad: int = 0,
        flip: bool = False,
    ) -> None:
        assert images.dtype == torch.uint8 and images.dim() == 4, (images.dtype, images.shape)
        assert len(images) == len(targets) and images.shape[1] == len(mean) == len(std)
        self.images = images.contiguous()
        self.targets = torch.as_tensor(targets, dtype=torch.int64)
        self.mean, self.std = tuple(mean), tuple(std)
        self.augment, self.pad, self.flip = augment, pad, flip
        std_t = torch.tensor(self.std, dtype=torch.float32).view(-1, 1, 1)
        self._scale = 1.0 / (255.0 * std_t)  # (C, 1, 1)
        self._shift = -torch.tensor(self.mean, dtype=torch.float32).view(-1, 1, 1) / std_t
        self._epoch_seed: Optional[int] = None
        self._gen = torch.Generator()

    def set_epoch_seed(self, seed: Optional[int]) -> None:
        """Seed each sample's augmentation by ``(seed, index)``; ``None``: torch's global RNG."""
        self._epoch_seed = seed

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        img = self.images[index]
        if self.augment:
            img = self._augment(img, index)
        return img.float().mul_(self._scale).add_(self._shift), int(self.targets[index])

    def _augment(self, img: Tensor, index: int) -> Tensor:
        height, width = img.shape[-2:]
        gen = None
        if self._epoch_seed is not None:
            gen = self._gen
            gen.manual_seed((self._epoch_seed * 1_000_003 + index) % (2**63 - 1))
        dy, dx = torch.randint(0, 2 * self.pad + 1, (2,), generator=gen).tolist()
        flip = int(torch.randint(0, 2, (1,), generator=gen))
        if self.pad:
            img = F.pad(img, (self.pad,) * 4)[:, dy : dy + height, dx : dx + width]
        if self.flip and flip:
            img = img.flip(-1)
        return img

    def plain(self) -> "TensorImageDataset":
        """The same images with the test transform (no augmentation)."""
        return TensorImageDataset(self.images, self.targets, self.mean, self.std)

    def subset(self, indices: Tensor) -> "TensorImageDataset":
        """A copy holding only ``indices`` (same transform)."""
        return TensorImageDataset(
            self.images[indices], self.targets[indices], self.mean, self.std, self.augment, self.pad, self.flip
        )


def _tensor_pair(
    info: DatasetInfo, x_train: Tensor, y_train: Tensor, x_test: Tensor, y_test: Tensor, augment: bool, flip: bool
) -> tuple[TensorImageDataset, TensorImageDataset, DatasetInfo]:
    """Wrap uint8 (N, C, H, W) splits; crop padding is 4 px for 32x32 images, 2 px for 28x28."""
    pad = 4 if info.image_size >= 32 else 2
    train = TensorImageDataset(x_train, y_train, info.mean, info.std, augment, pad, flip)
    test = TensorImageDataset(x_test, y_test, info.mean, info.std)
    return train, test, info


# --------------------------------------------------------------------------- the builders

# Imported last: data_sources imports the registry above, and registers its builders on import.
from .data_sources import (  # noqa: E402, F401 - re-exported
    CIFAR10_INFO,
    CIFAR100_INFO,
    FASHION_CLASSES,
    FASHION_MNIST_INFO,
    FMNIST_SUBSET_INFO,
    IMAGEFOLDER_INFO,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MNIST_INFO,
    SYNTHETIC_INFO,
    SYNTHETIC_TEST,
    SYNTHETIC_TRAIN,
    _one_line,
    _root,
    _torchvision_pair,
    load_fmnist_subset,
    synthetic_arrays,
)

# --------------------------------------------------------------------------- Fashion-MNIST
# Here rather than in data_sources: it reads DEBIAN_FASHION_MNIST of this module when called.


def fashion_mnist_from_debian(raw: Path, source: Path | None = None) -> bool:
    """Gunzip Debian's Fashion-MNIST files into ``raw`` where they are missing there.

    Each file goes to a temporary name in ``raw`` and is renamed into place, so an interrupted
    copy never leaves a truncated file. Returns True if ``raw`` now holds all four files.
    """
    source = DEBIAN_FASHION_MNIST if source is None else source
    missing = [name for name in FASHION_MNIST_FILES if not (raw / name).is_file()]
    if not missing:
        return True
    if not all((source / f"{name}.gz").is_file() for name in missing):
        return False
    raw.mkdir(parents=True, exist_ok=True)
    for name in missing:
        log.info("fashion_mnist: unpacking %s into %s", source / f"{name}.gz", raw)
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=raw)
        try:
            with os.fdopen(fd, "wb") as out, gzip.open(source / f"{name}.gz", "rb") as src:
                while block := src.read(1 << 20):
                    out.write(block)
            os.chmod(tmp, 0o644)
            os.replace(tmp, raw / name)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return True


@register_dataset("fashion_mnist", info=FASHION_MNIST_INFO)
def _build_fashion_mnist(
    root: str | None, download: bool, augment: bool, seed: int
) -> tuple[Dataset, Dataset, DatasetInfo]:
    from torchvision.datasets import FashionMNIST

    raw = _root(root) / "FashionMNIST" / "raw"
    try:
        fashion_mnist_from_debian(raw)
    except OSError as exc:
        raise DataError(
            f"fashion_mnist: cannot unpack {DEBIAN_FASHION_MNIST} into {raw} "
            f"({_one_line(exc)}); make {raw} writable or set data.root"
        ) from exc
    return _torchvision_pair(
        FASHION_MNIST_INFO,
        FashionMNIST,
        root,
        "FashionMNIST/raw",
        download,
        augment,
        flip=True,
        hint=f"apt-get install dataset-fashion-mnist (Debian's copy is unpacked from {DEBIAN_FASHION_MNIST})",
    )

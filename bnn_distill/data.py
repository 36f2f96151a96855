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
import pickle
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional, Protocol, Sequence
from urllib.error import URLError

import numpy as np
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


# --------------------------------------------------------------------------- torchvision sets


def _root(root: str | os.PathLike[str] | None) -> Path:
    return Path(root) if root is not None else DEFAULT_ROOT


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return (text[:200] + "...") if len(text) > 200 else text or type(exc).__name__


def _is_network_error(exc: BaseException) -> bool:
    """True if ``exc`` (or its cause chain) looks like a failed connection or DNS lookup."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, (URLError, ConnectionError, TimeoutError)) or "urlopen error" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _load_torchvision(
    name: str, cls: type, root: Path, where: Path, download: bool, hint: str = ""
) -> tuple[Dataset, Dataset]:
    """Construct ``cls(root, train=...)`` for both splits, turning its failures into DataError.

    ``where`` is the folder torchvision reads (for the message), ``hint`` an extra way to get the
    files. Only the train constructor may download; the test split then finds the files in place.
    """
    extra = f", or {hint}" if hint else ""
    try:
        train = cls(str(root), train=True, download=download)
        test = cls(str(root), train=False, download=False)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError, ValueError) as exc:
        if download and _is_network_error(exc):
            raise DataError(
                f"{name}: cannot download into {root}: no network access "
                f"({_one_line(exc)}); copy the files to {where} from a machine with "
                f"internet{extra}"
            ) from exc
        if download:
            raise DataError(
                f"{name}: download into {root} failed ({_one_line(exc)}); delete {where} and retry{extra}"
            ) from exc
        # torchvision's own RuntimeError only says "not found or corrupted, use download=True"
        reason = "" if type(exc) is RuntimeError else f" ({_one_line(exc)})"
        raise DataError(
            f"{name}: no usable data under {where}{reason}; run with data.download: "
            f"true on a machine with internet, or set data.root to the folder that "
            f"holds {where.relative_to(root).parts[0]}/{extra}"
        ) from exc
    return train, test


def _hwc_to_chw(data: np.ndarray | Tensor) -> Tensor:
    """(N, H, W, C) or (N, H, W) uint8 -> (N, C, H, W) contiguous uint8 tensor."""
    x = torch.as_tensor(np.asarray(data), dtype=torch.uint8)
    x = x.unsqueeze(-1) if x.dim() == 3 else x
    return x.permute(0, 3, 1, 2).contiguous()


def _torchvision_pair(
    info: DatasetInfo,
    cls: type,
    root: str | None,
    folder: str,
    download: bool,
    augment: bool,
    flip: bool,
    hint: str = "",
) -> tuple[TensorImageDataset, TensorImageDataset, DatasetInfo]:
    """Load a torchvision dataset once and keep its arrays as uint8 tensors (N, C, H, W)."""
    base = _root(root)
    train, test = _load_torchvision(info.name, cls, base, base / folder, download, hint)
    return _tensor_pair(
        info,
        _hwc_to_chw(train.data),
        torch.as_tensor(train.targets),
        _hwc_to_chw(test.data),
        torch.as_tensor(test.targets),
        augment,
        flip,
    )


CIFAR10_INFO = DatasetInfo(
    "cifar10",
    10,
    3,
    32,
    mean=(0.4914, 0.4822, 0.4465),
    std=(0.2470, 0.2435, 0.2616),  # per-pixel stats, train split
    classes=("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
)

CIFAR100_INFO = DatasetInfo(
    "cifar100",
    100,
    3,
    32,
    mean=(0.5071, 0.4865, 0.4409),
    std=(0.2673, 0.2564, 0.2762),  # per-pixel stats, train split
    classes=tuple(
        """
        apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus
        butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch
        crab crocodile cup dinosaur dolphin elephant flatfish forest fox girl hamster house
        kangaroo keyboard lamp lawn_mower leopard lion lizard lobster man maple_tree motorcycle
        mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree
        plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew
        skunk skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table tank
        telephone television tiger tractor train trout tulip turtle wardrobe whale willow_tree
        wolf woman worm""".split()
    ),
)

MNIST_INFO = DatasetInfo("mnist", 10, 1, 28, mean=(0.1307,), std=(0.3081,), classes=tuple(str(d) for d in range(10)))

FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
# Per-pixel mean/std of the 60 000 training images.
FASHION_MNIST_INFO = DatasetInfo("fashion_mnist", 10, 1, 28, mean=(0.2860,), std=(0.3530,), classes=FASHION_CLASSES)


@register_dataset("cifar10", info=CIFAR10_INFO)
def _build_cifar10(root: str | None, download: bool, augment: bool, seed: int) -> tuple[Dataset, Dataset, DatasetInfo]:
    from torchvision.datasets import CIFAR10

    return _torchvision_pair(CIFAR10_INFO, CIFAR10, root, CIFAR10.base_folder, download, augment, flip=True)


@register_dataset("cifar100", info=CIFAR100_INFO)
def _build_cifar100(root: str | None, download: bool, augment: bool, seed: int) -> tuple[Dataset, Dataset, DatasetInfo]:
    from torchvision.datasets import CIFAR100

    return _torchvision_pair(CIFAR100_INFO, CIFAR100, root, CIFAR100.base_folder, download, augment, flip=True)


@register_dataset("mnist", info=MNIST_INFO)
def _build_mnist(root: str | None, download: bool, augment: bool, seed: int) -> tuple[Dataset, Dataset, DatasetInfo]:
    from torchvision.datasets import MNIST

    return _torchvision_pair(MNIST_INFO, MNIST, root, "MNIST/raw", download, augment, flip=False)


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


# --------------------------------------------------------------------------- embedded subset

# Per-pixel mean/std of the subset's 6000 training images (x / 255), computed from
# fmnist_subset.npz; tests/test_data.py checks them against the file.
FMNIST_SUBSET_INFO = replace(FASHION_MNIST_INFO, name="fmnist_subset", mean=(0.2873,), std=(0.3540,))


def load_fmnist_subset() -> dict[str, np.ndarray]:
    """Arrays of the packaged ``datasets/fmnist_subset.npz``: x_* uint8 (N, 28, 28), y_* (N,)."""
    ref = Path(__file__).resolve().parent / "datasets" / FMNIST_SUBSET_FILE
    try:
        with np.load(ref) as npz:
            return {key: npz[key] for key in ("x_train", "y_train", "x_test", "y_test")}
    except (OSError, KeyError, ValueError) as exc:
        raise DataError(
            f"fmnist_subset: cannot read packaged file {ref} ({_one_line(exc)}); "
            "reinstall bnn-distill or regenerate it with "
            "scripts/make_fmnist_subset.py"
        ) from exc


@register_dataset("fmnist_subset", info=FMNIST_SUBSET_INFO)
def _build_fmnist_subset(
    root: str | None, download: bool, augment: bool, seed: int
) -> tuple[Dataset, Dataset, DatasetInfo]:
    arrays = load_fmnist_subset()
    return _tensor_pair(
        FMNIST_SUBSET_INFO,
        _hwc_to_chw(arrays["x_train"]),
        torch.as_tensor(arrays["y_train"]),
        _hwc_to_chw(arrays["x_test"]),
        torch.as_tensor(arrays["y_test"]),
        augment,
        flip=True,
    )


# --------------------------------------------------------------------------- synthetic

SYNTHETIC_TRAIN, SYNTHETIC_TEST = 512, 256
# Pixel mean/std over seeds 0..3 of the train split; single seeds differ by up to about 0.015.
SYNTHETIC_INFO = DatasetInfo(
    "synthetic", 10, 3, 32, mean=(0.507,) * 3, std=(0.227,) * 3, classes=tuple(f"class{k}" for k in range(10))
)


def synthetic_arrays(
    seed: int, n_train: int = SYNTHETIC_TRAIN, n_test: int = SYNTHETIC_TEST, noise: float = 1.0
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Deterministic CIFAR-shaped data: ``x_train`` uint8 (n_train, 3, 32, 32), ``y_train``
    int64 (n_train,), ``x_test``, ``y_test``.

    Class ``k`` has a smooth pattern ``P_k`` (a 3x4x4 standard normal grid, bilinearly
    upsampled to 32x32); sample ``i`` has label ``i % 10`` and pixels
    ``clamp(128 + 48 * (P_y + noise * eps), 0, 255)`` with ``eps`` i.i.d. standard normal.
    Everything comes from ``torch.Generator().manual_seed(seed)``.
    """
    gen = torch.Generator().manual_seed(seed)
    patterns = F.interpolate(
        torch.randn(10, 3, 4, 4, generator=gen), size=(32, 32), mode="bilinear", align_corners=False
    )

    def split(n: int) -> tuple[Tensor, Tensor]:
        labels = torch.arange(n) % 10
        x = patterns[labels] + noise * torch.randn(n, 3, 32, 32, generator=gen)
        return (128 + 48 * x).round_().clamp_(0, 255).to(torch.uint8), labels

    return (*split(n_train), *split(n_test))


@register_dataset("synthetic", info=SYNTHETIC_INFO)
def _build_synthetic(
    root: str | None, download: bool, augment: bool, seed: int
) -> tuple[Dataset, Dataset, DatasetInfo]:
    return _tensor_pair(SYNTHETIC_INFO, *synthetic_arrays(seed), augment=augment, flip=True)


# --------------------------------------------------------------------------- ImageFolder

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGEFOLDER_INFO = DatasetInfo("imagefolder", 0, 3, 224, IMAGENET_MEAN, IMAGENET_STD, ())
_LAYOUT = "data.root must hold train/<class>/<image> and val/<class>/<image> (ImageNet layout)"


def _class_folders(split: Path) -> tuple[str, ...]:
    """Sorted names of the sub-folders of ``split`` (ImageFolder's class order)."""
    if not split.is_dir():
        raise DataError(f"imagefolder: no folder {split}; {_LAYOUT}")
    classes = tuple(sorted(entry.name for entry in os.scandir(split) if entry.is_dir()))
    if not classes:
        raise DataError(f"imagefolder: no class folders in {split}; {_LAYOUT}")
    return classes


def _imagefolder_info(root: Path) -> DatasetInfo:
    classes = _class_folders(root / "train")
    return replace(IMAGEFOLDER_INFO, num_classes=len(classes), classes=classes)


@register_dataset("imagefolder", info=IMAGEFOLDER_INFO, info_from_root=_imagefolder_info)
def _build_imagefolder(
    root: str | None, download: bool, augment: bool, seed: int
) -> tuple[Dataset, Dataset, DatasetInfo]:
    from torchvision import transforms as T
    from torchvision.datasets import ImageFolder

    if root is None:
        raise DataError(f"imagefolder: no data.root given; {_LAYOUT}")
    base = Path(root)
    info = _imagefolder_info(base)
    val_classes = _class_folders(base / "val")
    if val_classes != info.classes:
        diff = sorted(set(info.classes) ^ set(val_classes))
        raise DataError(
            f"imagefolder: class folders of {base / 'train'} and {base / 'val'} "
            f"differ ({', '.join(diff[:5])}{' ...' if len(diff) > 5 else ''}); "
            "give both splits the same class folders"
        )
    normalize = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    eval_tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), normalize])
    train_tf = (
        T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(), normalize]) if augment else eval_tf
    )
    try:
        train = ImageFolder(str(base / "train"), transform=train_tf)
        test = ImageFolder(str(base / "val"), transform=eval_tf)
    except (FileNotFoundError, OSError) as exc:
        raise DataError(f"imagefolder: {_one_line(exc)} under {base}; {_LAYOUT}") from exc
    return train, test, info

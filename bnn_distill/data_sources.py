"""The dataset builders of :mod:`bnn_distill.data`: the torchvision sets (CIFAR-10/100, MNIST),
the embedded Fashion-MNIST subset, the synthetic stand-in and ImageFolder, each registered with
:func:`bnn_distill.data.register_dataset`. (Fashion-MNIST, unpacked from Debian's package, is built
in :mod:`bnn_distill.data` itself.)

Import :mod:`bnn_distill.data`, not this module: the registry imports it at its end, which
registers the builders, and re-exports its public names.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import replace
from pathlib import Path
from urllib.error import URLError

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from .data import DEFAULT_ROOT, FMNIST_SUBSET_FILE, DatasetInfo, TensorImageDataset, _tensor_pair, register_dataset
from .errors import DataError

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

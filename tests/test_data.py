"""Tests of the dataset registry (bnn_distill.data); all offline, a few seconds in total."""

from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
from conftest import load_script
from PIL import Image

from bnn_distill import data
from bnn_distill.data import balanced_indices, build_datasets, dataset_info, dataset_names, synthetic_arrays
from bnn_distill.errors import DataError, RecipeError

REPO = Path(__file__).resolve().parent.parent
DEBIAN = Path("/usr/share/datasets/fashion-mnist")
needs_debian = pytest.mark.skipif(
    not all((DEBIAN / f"{n}.gz").is_file() for n in data.FASHION_MNIST_FILES),
    reason=f"Debian package dataset-fashion-mnist not installed (no files in {DEBIAN})",
)


def _one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text, text
    return text


def _counts(ds) -> list[int]:
    labels = [ds[i][1] for i in range(len(ds))]
    return np.bincount(labels, minlength=10).tolist()


# --------------------------------------------------------------------------- registry


def test_registry_names() -> None:
    assert dataset_names() == sorted(
        ["cifar10", "cifar100", "mnist", "fashion_mnist", "imagefolder", "fmnist_subset", "synthetic"]
    )
    assert set(data.DATASETS) == set(dataset_names())


def test_static_info() -> None:
    c100 = dataset_info("cifar100")
    assert (c100.num_classes, c100.in_chans, c100.image_size) == (100, 3, 32)
    assert len(c100.classes) == 100 == len(set(c100.classes))
    for name in dataset_names():
        info = dataset_info(name)
        assert info.name == name
        assert len(info.mean) == len(info.std) == info.in_chans
        assert len(info.classes) == info.num_classes
    assert dataset_info("imagefolder").num_classes == 0
    assert dataset_info("fashion_mnist").classes[0] == "T-shirt/top"


def test_unknown_name_hints() -> None:
    with pytest.raises(RecipeError) as exc:
        dataset_info("cifar-10")
    assert "did you mean 'cifar10'" in _one_line(exc)
    with pytest.raises(RecipeError) as exc:
        build_datasets("fmnist_subst")
    assert "did you mean 'fmnist_subset'" in _one_line(exc)
    with pytest.raises(RecipeError, match="limit_train"):
        build_datasets("synthetic", limit_train=0)


# --------------------------------------------------------------------------- embedded subset


def test_fmnist_subset_shapes_and_balance() -> None:
    train, test, info = build_datasets("fmnist_subset", augment=False)
    assert (len(train), len(test), info.num_classes) == (6000, 1000, 10)
    x, y = train[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and type(y) is int
    assert torch.bincount(train.targets).tolist() == [600] * 10
    assert _counts(test) == [100] * 10


def test_fmnist_subset_normalisation() -> None:
    arrays = data.load_fmnist_subset()
    pixels = arrays["x_train"].astype(np.float64) / 255
    info = dataset_info("fmnist_subset")
    assert abs(pixels.mean() - info.mean[0]) < 1e-4
    assert abs(pixels.std() - info.std[0]) < 1e-4
    train, _, _ = build_datasets("fmnist_subset", augment=False)
    x = torch.stack([train[i][0] for i in range(len(train))])
    assert abs(x.mean().item()) < 1e-3 and abs(x.std().item() - 1) < 1e-3


def test_augmentation_seeded_and_effective() -> None:
    train, test, info = build_datasets("fmnist_subset", limit_train=64)
    plain, _, _ = build_datasets("fmnist_subset", augment=False, limit_train=64)

    def draw() -> torch.Tensor:
        return torch.stack([train[i][0] for i in range(len(train))])

    torch.manual_seed(0)
    first = draw()
    torch.manual_seed(0)
    assert torch.equal(first, draw())
    assert not torch.equal(first, draw())  # next draws differ
    clean = torch.stack([plain[i][0] for i in range(len(plain))])
    changed = (first != clean).flatten(1).any(1).float().mean().item()
    assert changed > 0.7, changed  # P(no change) = 1/25 * 1/2
    assert torch.equal(test[0][0], test[0][0])  # test split never augmented
    # every augmented image is a 28x28 window of the 2-px zero-padded image, maybe mirrored
    padded = torch.nn.functional.pad(train.images[:8].float() / 255, (2, 2, 2, 2))
    normalised = (padded - info.mean[0]) / info.std[0]
    for i in range(8):
        windows = [
            w
            for dy in range(5)
            for dx in range(5)
            for w in (
                normalised[i, :, dy : dy + 28, dx : dx + 28],
                normalised[i, :, dy : dy + 28, dx : dx + 28].flip(-1),
            )
        ]
        assert any(torch.allclose(first[i], w, atol=1e-5) for w in windows), i


def test_balanced_indices() -> None:
    labels = [0] * 10 + [1] * 2 + [2] * 5
    picked = balanced_indices(labels, 9)
    assert picked.tolist() == sorted(picked.tolist())
    assert np.bincount(np.array(labels)[picked.numpy()]).tolist() == [4, 2, 3]
    assert picked.tolist() == [0, 1, 2, 3, 10, 11, 12, 13, 14]  # first of each class
    assert balanced_indices(labels, 100).tolist() == list(range(17))


def test_limits_are_balanced_first_n() -> None:
    train, test, _ = build_datasets("fmnist_subset", limit_train=25, limit_test=20)
    assert (len(train), len(test)) == (25, 20)
    assert torch.bincount(train.targets).tolist() == [3] * 5 + [2] * 5
    assert _counts(test) == [2] * 10
    full, _, _ = build_datasets("fmnist_subset")
    first_of_class = [int((full.targets == k).nonzero()[0]) for k in range(10)]
    assert torch.equal(
        train.images[train.targets.argsort(stable=True)][[0, 3, 6, 9, 12]], full.images[first_of_class[:5]]
    )


# --------------------------------------------------------------------------- torchvision sets


@needs_debian
def test_fashion_mnist_from_debian(tmp_path: Path) -> None:
    train, test, info = build_datasets("fashion_mnist", root=str(tmp_path), limit_test=50)
    raw = tmp_path / "FashionMNIST" / "raw"
    assert sorted(os.listdir(raw)) == sorted(data.FASHION_MNIST_FILES)  # no temp files left
    assert (len(train), len(test), info.in_chans) == (60000, 50, 1)
    assert train[0][0].shape == (1, 28, 28) and train.flip and train.pad == 2
    assert _counts(test) == [5] * 10


def test_fashion_mnist_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian")
    with pytest.raises(DataError) as exc:
        build_datasets("fashion_mnist", root=str(tmp_path))
    text = _one_line(exc)
    assert str(tmp_path / "FashionMNIST" / "raw") in text
    assert "apt-get install dataset-fashion-mnist" in text and "data.download: true" in text


def test_cifar_missing_names_path(tmp_path: Path) -> None:
    with pytest.raises(DataError) as exc:
        build_datasets("cifar100", root=str(tmp_path))
    assert str(tmp_path / "cifar-100-python") in _one_line(exc)


def test_download_without_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets.mnist as tv_mnist

    def offline(*args, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(tv_mnist, "download_and_extract_archive", offline)
    with pytest.raises(DataError) as exc:
        build_datasets("mnist", root=str(tmp_path), download=True)
    text = _one_line(exc)
    assert "no network" in text and str(tmp_path) in text


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, dtype=">u4").tobytes()
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_fake_mnist_has_no_flip(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 30), ("t10k", 10)):
        _write_idx(raw / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(raw / f"{split}-labels-idx1-ubyte", np.arange(n) % 10)
    train, test, info = build_datasets("mnist", root=str(tmp_path))
    assert (len(train), len(test), info.in_chans) == (30, 10, 1)
    assert not train.flip and train.pad == 2
    assert test.targets.tolist() == list(range(10))


def test_fake_cifar10(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets.cifar as tv_cifar

    # The fake files cannot match torchvision's md5s; accept any existing file instead.
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path))
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    images = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        pixels = rng.integers(0, 256, (20, 3 * 32 * 32), dtype=np.uint8)  # rows: R, G, B planes
        images[name] = pixels
        with open(folder / name, "wb") as f:
            pickle.dump({"data": pixels, "labels": [i % 10 for i in range(20)]}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": list(data.CIFAR10_INFO.classes)}, f)

    train, test, info = build_datasets("cifar10", root=str(tmp_path), augment=False, limit_train=50)
    assert (len(train), len(test), info.num_classes) == (50, 20, 10)
    assert torch.bincount(train.targets).tolist() == [5] * 10
    x, y = test[3]
    assert x.shape == (3, 32, 32) and y == 3
    expected = torch.from_numpy(images["test_batch"][3].reshape(3, 32, 32)).float() / 255
    mean = torch.tensor(info.mean).view(3, 1, 1)
    std = torch.tensor(info.std).view(3, 1, 1)
    torch.testing.assert_close(x, (expected - mean) / std)
    augmented, _, _ = build_datasets("cifar10", root=str(tmp_path))
    assert augmented.flip and augmented.pad == 4


# --------------------------------------------------------------------------- imagefolder


def _image_tree(root: Path, splits: dict[str, list[str]]) -> None:
    rng = np.random.default_rng(0)
    for split, classes in splits.items():
        for cls in classes:
            (root / split / cls).mkdir(parents=True)
            for i in range(2):
                pixels = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / cls / f"{i}.png")


def test_imagefolder(tmp_path: Path) -> None:
    _image_tree(tmp_path, {"train": ["cat", "dog", "emu"], "val": ["cat", "dog", "emu"]})
    info = dataset_info("imagefolder", root=tmp_path)
    assert info.num_classes == 3 and info.classes == ("cat", "dog", "emu")
    train, test, built = build_datasets("imagefolder", root=str(tmp_path), limit_train=3)
    assert built == info and (len(train), len(test)) == (3, 6)
    x, y = train[1]
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32 and y == 1
    assert test[5][1] == 2


def test_imagefolder_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError) as exc:
        build_datasets("imagefolder", root=str(tmp_path))
    assert str(tmp_path / "train") in _one_line(exc)
    _image_tree(tmp_path, {"train": ["cat", "dog"]})
    with pytest.raises(DataError) as exc:
        build_datasets("imagefolder", root=str(tmp_path))
    assert str(tmp_path / "val") in _one_line(exc)
    with pytest.raises(DataError, match="data.root"):
        build_datasets("imagefolder")


# --------------------------------------------------------------------------- synthetic


def test_synthetic_deterministic_and_learnable() -> None:
    train, test, info = build_datasets("synthetic", seed=3, augment=False)
    again, _, _ = build_datasets("synthetic", seed=3, augment=False)
    other, _, _ = build_datasets("synthetic", seed=4, augment=False)
    assert (len(train), len(test), info.image_size) == (512, 256, 32)
    assert torch.equal(train.images, again.images)
    assert not torch.equal(train.images, other.images)
    assert train[0][0].shape == (3, 32, 32)
    small, small_test, _ = build_datasets("synthetic", limit_train=40, limit_test=10)
    assert (len(small), len(small_test)) == (40, 10)
    assert torch.bincount(small.targets).tolist() == [4] * 10
    # nearest class mean separates the classes: the data carries signal
    x_train, y_train, x_test, y_test = (
        t.float().flatten(1) if t.dtype == torch.uint8 else t for t in synthetic_arrays(0)
    )
    centroids = torch.stack([x_train[y_train == k].mean(0) for k in range(10)])
    accuracy = (torch.cdist(x_test, centroids).argmin(1) == y_test).float().mean()
    assert accuracy > 0.9


# --------------------------------------------------------------------------- embedded file


@needs_debian
def test_script_reproduces_packaged_file(tmp_path: Path) -> None:
    script = load_script("scripts/make_fmnist_subset.py")
    out = tmp_path / "subset.npz"
    script.main(["--src", str(DEBIAN), "--out", str(out)])
    packaged = REPO / "bnn_distill" / "datasets" / "fmnist_subset.npz"
    assert hashlib.sha256(out.read_bytes()).hexdigest() == hashlib.sha256(packaged.read_bytes()).hexdigest()
    readme = (packaged.parent / "README.md").read_text()
    assert hashlib.sha256(packaged.read_bytes()).hexdigest() in readme
    assert (packaged.parent / "LICENSE").read_text().count("Zalando SE") == 1

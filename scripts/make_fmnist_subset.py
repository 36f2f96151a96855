"""Regenerate ``bnn_distill/datasets/fmnist_subset.npz`` from Debian's Fashion-MNIST files.

The subset is class balanced: for every class ``c`` in ``0..9`` we draw, without replacement,
``TRAIN_PER_CLASS`` indices of the 60 000-image training split and ``TEST_PER_CLASS`` of the
10 000-image test split with ``numpy.random.default_rng(0)`` (train draws for all classes first,
then test draws), and keep the picked images in their original file order. Result::

    x_train uint8 (6000, 28, 28)   y_train uint8 (6000,)
    x_test  uint8 (1000, 28, 28)   y_test  uint8 (1000,)

The archive is written by :func:`write_npz` with fixed zip timestamps and permissions, so two
runs on the same input give a byte-identical file (``np.savez_compressed`` stamps the wall
clock). Usage::

    python scripts/make_fmnist_subset.py [--src /usr/share/datasets/fashion-mnist] [--out PATH]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import logging
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

log = logging.getLogger("make_fmnist_subset")

DEFAULT_SRC = Path("/usr/share/datasets/fashion-mnist")
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "bnn_distill" / "datasets" / "fmnist_subset.npz"
TRAIN_PER_CLASS = 600
TEST_PER_CLASS = 100
NUM_CLASSES = 10
SEED = 0
FILES = {
    "x_train": "train-images-idx3-ubyte.gz",
    "y_train": "train-labels-idx1-ubyte.gz",
    "x_test": "t10k-images-idx3-ubyte.gz",
    "y_test": "t10k-labels-idx1-ubyte.gz",
}
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


def sha256(path: Path) -> str:
    """Hex sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_idx(path: Path) -> np.ndarray:
    """Read a gzipped IDX file of unsigned bytes.

    Layout: magic ``0x0000 08 D`` (type 0x08 = uint8, ``D`` dimensions), then ``D`` big-endian
    uint32 sizes, then the data in C order. Returns a uint8 array of those sizes.
    """
    with gzip.open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path}: not an IDX file of unsigned bytes")
    ndim = raw[3]
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims} but holds {data.size} bytes")
    return data.reshape(dims)


def pick_balanced(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``per_class`` random samples of every class, sorted ascending.

    ``labels`` (N,) ints in ``0..NUM_CLASSES-1``; returns (NUM_CLASSES * per_class,) int64.
    """
    picks = [rng.choice(np.flatnonzero(labels == c), size=per_class, replace=False) for c in range(NUM_CLASSES)]
    return np.sort(np.concatenate(picks)).astype(np.int64)


def build_subset(src: Path) -> dict[str, np.ndarray]:
    """Load the four Debian files under ``src`` and return the subset arrays (see module doc)."""
    full = {key: read_idx(src / name) for key, name in FILES.items()}
    rng = np.random.default_rng(SEED)
    train = pick_balanced(full["y_train"], TRAIN_PER_CLASS, rng)
    test = pick_balanced(full["y_test"], TEST_PER_CLASS, rng)
    return {
        "x_train": np.ascontiguousarray(full["x_train"][train]),
        "y_train": np.ascontiguousarray(full["y_train"][train]),
        "x_test": np.ascontiguousarray(full["x_test"][test]),
        "y_test": np.ascontiguousarray(full["y_test"][test]),
    }


def write_npz(arrays: dict[str, np.ndarray], out: Path) -> None:
    """Write ``arrays`` as a deflated ``.npz`` readable by ``np.load``, deterministically.

    Members are ``<key>.npy`` in the given order, each stamped 1980-01-01 with mode 0644; the file
    is written to a temporary name in the same folder and renamed into place.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED) as zf:
            for key, array in arrays.items():
                buf = io.BytesIO()
                np.lib.format.write_array(buf, np.asanyarray(array), allow_pickle=False)
                info = zipfile.ZipInfo(f"{key}.npy", date_time=_ZIP_EPOCH)
                info.compress_type = zipfile.ZIP_DEFLATED
                info.external_attr = 0o644 << 16
                zf.writestr(info, buf.getvalue(), compresslevel=9)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> None:
    """Command line entry point: build the subset, write it, log sha256 of inputs and output."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--src", type=Path, default=DEFAULT_SRC, help="folder with Debian's Fashion-MNIST *-ubyte.gz files"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="npz file to write")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    missing = [name for name in FILES.values() if not (args.src / name).is_file()]
    if missing:
        parser.error(
            f"{args.src}: missing {', '.join(missing)}; install it with: apt-get install dataset-fashion-mnist"
        )
    for name in FILES.values():
        log.info("%s  %s", sha256(args.src / name), args.src / name)
    arrays = build_subset(args.src)
    write_npz(arrays, args.out)
    for key, array in arrays.items():
        log.info("%-7s %s %s", key, array.dtype, array.shape)
    log.info("%s  %s", sha256(args.out), args.out)


if __name__ == "__main__":
    main()

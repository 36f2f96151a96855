"""Shared fixtures: a tiny recipe that trains a teacher and two binary stages in seconds; the
repository's scripts (benchmarks/, scripts/) loaded as modules."""

from __future__ import annotations

import copy
import importlib.util
import logging
from pathlib import Path
from typing import Any, Dict

import pytest

logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)

REPO = Path(__file__).resolve().parents[1]


def load_script(relpath: str):
    """A script of the repository (e.g. ``benchmarks/itrd_grid.py``) as a fresh module."""
    path = REPO / relpath
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


ITRD = [
    {"name": "ce"},
    {"name": "itrd_corr", "weight": 2.0, "alpha": 1.01},
    {"name": "itrd_mi", "weight": 1.0},
]


def tiny_recipe_dict(out: Path, epochs: int = 1, name: str = "tiny") -> Dict[str, Any]:
    """Teacher + W32A1 + W1A1 on 64 synthetic CIFAR-shaped images, ResNet-20 at quarter width."""
    stage = {
        "epochs": epochs,
        "batch_size": 16,
        "optimizer": {"name": "sgd", "lr": 0.05},
        "schedule": {"name": "cosine", "warmup_epochs": 0},
    }
    return {
        "name": name,
        "seed": 3,
        "output_dir": str(out),
        "data": {"dataset": "synthetic", "limit_train": 64, "limit_test": 32, "val_size": 16},
        "teacher": {"arch": "cifar_resnet20", "width_mult": 0.25},
        "student": {"arch": "cifar_resnet20", "width_mult": 0.25},
        "stages": [
            {"name": "teacher", "kind": "teacher", "quant": "FP", **copy.deepcopy(stage), "losses": [{"name": "ce"}]},
            {
                "name": "stage1",
                "quant": "W32A1",
                "init_from": "teacher",
                **copy.deepcopy(stage),
                "losses": copy.deepcopy(ITRD),
            },
            {
                "name": "stage2",
                "quant": "W1A1",
                "init_from": "stage1",
                **copy.deepcopy(stage),
                "losses": copy.deepcopy(ITRD),
            },
        ],
    }


def make_image_folder(root: Path, classes=("cat", "dog"), train: int = 6, val: int = 2, size=(40, 48)) -> Path:
    """A tiny ImageNet-style tree ``root/{train,val}/<class>/*.png`` of random RGB images."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("val", val)):
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    return root


@pytest.fixture
def tiny(tmp_path):
    return tiny_recipe_dict(tmp_path / "runs")

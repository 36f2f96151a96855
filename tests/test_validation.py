"""The validation split: held out of the training data, balanced and seeded; best.pt is chosen on
it and the test split is evaluated once per stage, at the end."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_recipe_dict

from bnn_distill.data import TensorImageDataset, build_splits, validation_indices
from bnn_distill.errors import RecipeError
from bnn_distill.recipe import recipe_from_dict
from bnn_distill.train import run_recipe


def test_validation_indices_are_balanced_seeded_and_sorted():
    labels = torch.arange(100) % 4  # 25 of each of 4 classes
    a = validation_indices(labels, 12, seed=0)
    assert a.tolist() == sorted(set(a.tolist())) and len(a) == 12
    assert torch.bincount(labels[a], minlength=4).tolist() == [3, 3, 3, 3]
    assert torch.equal(a, validation_indices(labels, 12, seed=0))
    assert not torch.equal(a, validation_indices(labels, 12, seed=1))


def test_validation_indices_give_a_small_class_what_it_has():
    labels = torch.tensor([0] * 20 + [1] * 2)
    idx = validation_indices(labels, 8, seed=5)
    assert torch.bincount(labels[idx]).tolist() == [6, 2]


def test_build_splits_holds_out_before_limit_and_unaugmented():
    s = build_splits("synthetic", augment=True, limit_train=64, val_size=20, seed=3)
    full = build_splits("synthetic", augment=False, seed=3)
    assert len(s.val) == 20 and len(s.train) == 64
    assert isinstance(s.val, TensorImageDataset) and not s.val.augment and s.train.augment
    # no validation image is a training image: compare the raw pixels
    train_px = {bytes(x.numpy()) for x in s.train.images}
    assert not any(bytes(x.numpy()) in train_px for x in s.val.images)
    # the validation images are training-split images with the test transform, never test images
    all_train = {bytes(x.numpy()) for x in full.train.images}
    assert all(bytes(x.numpy()) in all_train for x in s.val.images)
    x, y = s.val[0]
    assert x.dtype == torch.float32 and isinstance(y, int)
    assert len(s.test) == len(full.test)


def test_val_fraction_and_errors():
    n = len(build_splits("synthetic").train)
    assert len(build_splits("synthetic", val_fraction=0.25).val) == round(0.25 * n)
    assert build_splits("synthetic").val is None
    with pytest.raises(RecipeError, match="leave none"):
        build_splits("synthetic", val_size=n)


@pytest.mark.parametrize(
    "data, match",
    [
        ({"val_size": 10, "val_fraction": 0.1}, "not both"),
        ({"val_fraction": 0.9}, r"\(0, 0.5\]"),
        ({"val_fraction": 0.0}, r"\(0, 0.5\]"),
        ({"val_size": 0}, "val_size"),
        ({"val_seed": -1}, "val_seed"),
    ],
)
def test_recipe_validates_the_split(tmp_path, data, match):
    d = tiny_recipe_dict(tmp_path)
    d["data"].pop("val_size")
    d["data"].update(data)
    with pytest.raises(RecipeError, match=match):
        recipe_from_dict(d)


def test_best_is_chosen_on_validation_and_test_is_read_once(tmp_path):
    d = tiny_recipe_dict(tmp_path, epochs=3)
    d["stages"] = d["stages"][:1]
    recipe = recipe_from_dict(d)
    summary = run_recipe(recipe, progress=False)
    records = [json.loads(line) for line in (recipe.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all("val_top1" in r for r in records)
    assert ["test_top1" in r for r in records] == [False, False, True]
    st = summary["stages"][0]
    vals = [r["val_top1"] for r in records]
    assert st["best_top1"] == max(vals) and st["best_epoch"] == vals.index(max(vals)) + 1
    assert 0 <= st["best_test_top1"] <= 100 and st["final"]["test_top1"] == records[-1]["test_top1"]
    best = torch.load(recipe.run_dir / "checkpoints" / "teacher" / "best.pt", weights_only=True)
    assert best["epoch"] == st["best_epoch"]


def test_without_a_validation_split_no_best_checkpoint(tmp_path):
    d = tiny_recipe_dict(tmp_path, epochs=2)
    d["data"].pop("val_size")
    d["stages"] = d["stages"][:1]
    recipe = recipe_from_dict(d)
    summary = run_recipe(recipe, progress=False)
    assert not (recipe.run_dir / "checkpoints" / "teacher" / "best.pt").exists()
    assert summary["stages"][0]["best_epoch"] == 0
    records = [json.loads(line) for line in (recipe.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert ["test_top1" in r for r in records] == [False, True] and not any("val_top1" in r for r in records)

"""Teachers by name (``torchvision:ARCH`` / ``timm:ARCH``), classifier re-initialisation, a
teacher stage that fine-tunes a loaded teacher, and the ImageNet recipe on a tiny ImageFolder."""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import make_image_folder

from bnn_distill.cli import main
from bnn_distill.errors import CheckpointError, RecipeError
from bnn_distill.models import classifier_keys, create_model, default_feature_layer
from bnn_distill.recipe import recipe_from_dict
from bnn_distill.train import load_teacher, model_spec_dict, run_recipe

REPO = Path(__file__).resolve().parent.parent


def _recipe(tmp_path, teacher, stages=None):
    stages = stages or [
        {
            "name": "s1",
            "quant": "W32A1",
            "epochs": 1,
            "batch_size": 8,
            "losses": [{"name": "ce"}, {"name": "kd"}, {"name": "itrd_corr", "weight": 2.0}],
        }
    ]
    return {
        "name": "t",
        "output_dir": str(tmp_path / "runs"),
        "data": {"dataset": "synthetic", "limit_train": 32, "limit_test": 16, "val_size": 8},
        "teacher": teacher,
        "student": {"arch": "resnet18", "width_mult": 0.25},
        "stages": stages,
    }


def _tv_state(tmp_path, classes):
    torch.manual_seed(0)
    state = torchvision.models.resnet18(num_classes=classes).state_dict()
    path = tmp_path / f"r18_{classes}.pth"
    torch.save(state, path)
    return path, state


def test_a_torchvision_teacher_is_built_by_torchvision():
    m = create_model("torchvision:resnet18", 10)
    assert type(m) is torchvision.models.ResNet and m.fc.out_features == 10
    assert default_feature_layer("torchvision:resnet18") == "avgpool"
    assert classifier_keys(m) == ["fc.weight", "fc.bias"]


@pytest.mark.parametrize(
    "teacher, student, match",
    [
        ({"arch": "torchvison:resnet18"}, None, "did you mean 'torchvision'"),
        ({"arch": "torchvision:resnet81"}, None, "no model 'resnet81'"),
        ({"arch": "torchvision:resnet18", "width_mult": 0.5}, None, "our own models only"),
        ({"arch": "cifar_resnet20", "pretrained": True}, None, "torchvision:/timm: teachers only"),
        ({"arch": "cifar_resnet20", "head": "fresh"}, None, "head"),
        ({"arch": "torchvision:resnet18"}, {"arch": "torchvision:resnet18"}, "only the teacher"),
    ],
)
def test_teacher_names_are_validated(tmp_path, teacher, student, match):
    d = _recipe(tmp_path, teacher)
    d["stages"].insert(
        0,
        {"name": "teacher", "kind": "teacher", "quant": "FP", "epochs": 1, "batch_size": 8, "losses": [{"name": "ce"}]},
    )
    if student:
        d["student"] = student
    with pytest.raises(RecipeError, match=match):
        recipe_from_dict(d)


@pytest.mark.skipif(importlib.util.find_spec("timm") is not None, reason="timm is installed here")
def test_a_timm_teacher_without_timm_says_how_to_get_it(tmp_path):
    with pytest.raises(RecipeError, match="pip install timm"):
        recipe_from_dict(_recipe(tmp_path, {"arch": "timm:resnet34", "checkpoint": str(_tv_state(tmp_path, 10)[0])}))


def test_a_checkpoint_of_another_class_count_needs_head_reinit(tmp_path):
    path, state = _tv_state(tmp_path, 1000)
    d = _recipe(tmp_path, {"arch": "torchvision:resnet18", "checkpoint": str(path)})
    recipe = recipe_from_dict(d)
    spec = model_spec_dict(recipe, recipe.teacher, "FP", 10, 3)
    with pytest.raises(CheckpointError, match="teacher.head: reinit") as err:
        load_teacher(recipe, spec)
    assert "(1000, 512)" in str(err.value) and "\n" not in str(err.value)
    # head: reinit without a stage to fine-tune it would distil from an untrained classifier
    d["teacher"]["head"] = "reinit"
    with pytest.raises(RecipeError, match="fine-tune"):
        recipe_from_dict(d)


def test_head_reinit_keeps_the_body_and_a_teacher_stage_fine_tunes_it(tmp_path, caplog):
    path, state = _tv_state(tmp_path, 1000)
    teacher_stage = {
        "name": "teacher",
        "kind": "teacher",
        "quant": "FP",
        "epochs": 1,
        "batch_size": 8,
        "optimizer": {"name": "sgd", "lr": 1e-3},
        "losses": [{"name": "ce"}],
    }
    d = _recipe(tmp_path, {"arch": "torchvision:resnet18", "checkpoint": str(path), "head": "reinit"})
    d["stages"].insert(0, teacher_stage)
    recipe = recipe_from_dict(d)
    with caplog.at_level(logging.INFO, logger="bnn_distill.train"):
        loaded = load_teacher(recipe, model_spec_dict(recipe, recipe.teacher, "FP", 10, 3))
    assert "re-initialised" in caplog.text
    assert loaded.fc.weight.shape == (10, 512)
    own = loaded.state_dict()
    assert all(torch.equal(own[k], v) for k, v in state.items() if not k.startswith("fc."))
    summary = run_recipe(recipe, progress=False)
    assert [s["name"] for s in summary["stages"]] == ["teacher", "s1"]
    tuned = torch.load(recipe.run_dir / "checkpoints" / "teacher" / "last.pt", weights_only=True)["model"]
    # the teacher stage started from the checkpoint's body (a small lr moves it a little, not to random)
    w0, w1 = state["conv1.weight"], tuned["conv1.weight"]
    assert not torch.equal(w0, w1) and (w1 - w0).abs().max() < 0.1 * w0.abs().max()


def test_the_imagenet_recipe_runs_a_few_steps_on_a_tiny_image_folder(tmp_path):
    images = make_image_folder(tmp_path / "inet", train=5, val=2)
    torch.manual_seed(0)
    ckpt = tmp_path / "r34.pth"
    torch.save(torchvision.models.resnet34(num_classes=2).state_dict(), ckpt)
    sets = [
        f"data.root={images}",
        "data.val_size=2",
        "data.num_workers=0",
        f"output_dir={tmp_path / 'runs'}",
        "teacher.pretrained=false",
        f"teacher.checkpoint={ckpt}",
        "stages.stage1.epochs=1",
        "stages.stage2.epochs=1",
        "stages.stage1.batch_size=4",
        "stages.stage2.batch_size=4",
        "stages.stage1.schedule.milestones=[]",
        "stages.stage2.schedule.milestones=[]",
    ]
    argv = ["train", str(REPO / "recipes" / "resnet18_imagenet_binary.yaml"), "--no-progress"]
    for s in sets:
        argv += ["--set", s]
    assert main(argv + ["--dry-run"]) == 0
    assert main(argv) == 0
    summary = json.loads((tmp_path / "runs" / "resnet18_imagenet_binary" / "summary.json").read_text())
    assert [s["quant"] for s in summary["stages"]] == ["W32A1", "W1A1"]
    assert summary["teacher"]["arch"] == "torchvision:resnet34"
    metrics_file = tmp_path / "runs" / "resnet18_imagenet_binary" / "metrics.jsonl"
    metrics = [json.loads(x) for x in metrics_file.read_text().splitlines()]
    assert set(metrics[-1]["train"]) == {"ce", "itrd_corr", "itrd_mi", "loss"}
    assert all(v == v for v in metrics[-1]["train"].values())  # finite, not NaN

"""RunDir: the run folder's layout and the errors it gives for folders that hold no run."""

from __future__ import annotations

import json

import pytest

from bnn_distill.errors import CheckpointError, UserError
from bnn_distill.recipe import recipe_from_dict
from bnn_distill.rundir import RunDir, model_from_checkpoint


def test_paths_follow_the_documented_layout(tmp_path):
    r = RunDir(tmp_path / "runs" / "x")
    assert r.recipe_file == tmp_path / "runs" / "x" / "recipe.yaml"
    assert r.metrics_file.name == "metrics.jsonl" and r.summary_file.name == "summary.json"
    assert r.last("stage2") == tmp_path / "runs" / "x" / "checkpoints" / "stage2" / "last.pt"
    assert r.best("stage2").parent == r.last("stage2").parent and r.best("stage2").name == "best.pt"
    assert str(r) == str(tmp_path / "runs" / "x") and RunDir(str(r)) == r


def test_of_recipe_is_output_dir_slash_name(tiny, tmp_path):
    recipe = recipe_from_dict(tiny)
    assert RunDir.of(recipe).path == tmp_path / "runs" / "tiny" == recipe.run_dir


def test_a_folder_without_recipe_is_one_line_error(tmp_path):
    with pytest.raises(UserError, match=r"is not a run folder \(no recipe.yaml\); give runs/NAME"):
        RunDir(tmp_path).require()
    assert not RunDir(tmp_path).is_run()
    assert RunDir(tmp_path).stages_with_checkpoints() == []
    assert RunDir(tmp_path).read_metrics() == [] and RunDir(tmp_path).read_summary() is None


def test_metrics_round_trip_and_missing_checkpoint(tmp_path):
    r = RunDir(tmp_path)
    recs = [{"stage": "a", "epoch": 1, "top1": 0.5}, {"stage": "a", "epoch": 2, "top1": 0.75}]
    r.write_metrics(recs)
    assert r.read_metrics() == recs
    assert [json.loads(line) for line in r.metrics_file.read_text().splitlines()] == recs
    with pytest.raises(CheckpointError, match="stage 'a' of .* has no checkpoint yet"):
        r.checkpoint("a")


def test_stage_lookup_names_the_valid_stages(tiny, tmp_path):
    recipe = recipe_from_dict(tiny)
    r = RunDir.of(recipe)
    assert r.stage(recipe).name == "stage2" and r.stage(recipe, "stage1").name == "stage1"
    with pytest.raises(UserError, match="no stage named 'nope'.*valid: teacher, stage1, stage2"):
        r.stage(recipe, "nope")


def test_model_from_checkpoint_rebuilds_the_saved_model(tmp_path):
    import torch

    from bnn_distill.checkpoint import FORMAT, atomic_save
    from bnn_distill.models import create_model

    spec = dict(name="cifar_resnet20", num_classes=10, in_chans=3, quant="W1A1", width_mult=0.25)
    torch.manual_seed(0)
    model = create_model(**spec).eval()
    path = tmp_path / "checkpoints" / "s" / "last.pt"
    path.parent.mkdir(parents=True)
    atomic_save({"format": FORMAT, "model_spec": spec, "model": model.state_dict()}, path)
    again, ck = RunDir(tmp_path).load_model("s")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(again.eval()(x), model(x))
    assert ck["model_spec"] == spec
    torch.save({"weight": torch.zeros(1)}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="not a bnn-distill checkpoint"):
        model_from_checkpoint(tmp_path / "plain.pt")


def test_module_does_not_import_torch_at_top_level():
    import bnn_distill.rundir as m

    src = open(m.__file__).read()
    assert "\nimport torch" not in src and "\nfrom torch" not in src

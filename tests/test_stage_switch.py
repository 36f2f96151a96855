"""benchmarks/stage_switch.py: where stage 2 of a two-stage run starts, on a tiny finished run."""

from __future__ import annotations

import json

from conftest import load_script, tiny_recipe_dict

from bnn_distill.recipe import recipe_from_dict
from bnn_distill.train import run_recipe


def test_stage_switch_on_a_finished_run(tmp_path, capsys):
    mod = load_script("benchmarks/stage_switch.py")
    recipe = recipe_from_dict(tiny_recipe_dict(tmp_path / "runs"))
    run_recipe(recipe, progress=False)
    out = tmp_path / "ss"
    assert mod.main([str(recipe.run_dir), "--bn-batches", "2", "--batch-size", "16", "--out", str(out)]) == 0
    (row,) = json.loads(out.with_suffix(".json").read_text())["rows"]
    metrics = [json.loads(x) for x in (recipe.run_dir / "metrics.jsonl").read_text().splitlines()]
    s1 = [m["val_top1"] for m in metrics if m.get("stage") == "stage1" and "val_top1" in m]
    s2 = [m["val_top1"] for m in metrics if m.get("stage") == "stage2" and "val_top1" in m]
    # stage 1's last weights on the same validation images give what training logged for them
    assert abs(row["stage1_final"] - s1[-1]) < 1e-6
    assert (row["stage2_epoch1"], row["stage2_final"]) == (s2[0], s2[-1])
    for key in ("binarised", "binarised_bn"):
        assert 0.0 <= row[key] <= 100.0
    assert "| tiny |" in out.with_suffix(".md").read_text()


def test_stage_switch_refuses_what_it_cannot_measure(tmp_path, capsys):
    mod = load_script("benchmarks/stage_switch.py")
    assert mod.main([str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2
    assert "no recipe.yaml" in capsys.readouterr().err
    d = tiny_recipe_dict(tmp_path / "runs", name="single")
    d["stages"] = [d["stages"][0], dict(d["stages"][2], init_from="teacher")]  # teacher, then W1A1 only
    recipe = recipe_from_dict(d)
    recipe.run_dir.mkdir(parents=True)
    (recipe.run_dir / "recipe.yaml").write_text(recipe.to_yaml())
    assert mod.main([str(recipe.run_dir), "--out", str(tmp_path / "x")]) == 2
    assert "no W1A1 stage initialised from a W32A1 stage" in capsys.readouterr().err
    d = tiny_recipe_dict(tmp_path / "runs", name="unfinished")
    recipe = recipe_from_dict(d)
    recipe.run_dir.mkdir(parents=True)
    (recipe.run_dir / "recipe.yaml").write_text(recipe.to_yaml())
    assert mod.main([str(recipe.run_dir), "--out", str(tmp_path / "x")]) == 2
    assert "has no checkpoint; finish the run first" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()

"""The training pipeline end to end on tiny synthetic data: outputs, resume, errors, DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_recipe_dict

from bnn_distill.checkpoint import load_checkpoint
from bnn_distill.errors import UserError
from bnn_distill.recipe import recipe_from_dict
from bnn_distill.train import Trainer, TrainingDiverged, run_recipe


def _final_states(run_dir: Path):
    return {st: load_checkpoint(run_dir / "checkpoints" / st / "last.pt") for st in ("teacher", "stage1", "stage2")}


def test_pipeline_writes_a_complete_run(tiny):
    recipe = recipe_from_dict(tiny)
    summary = run_recipe(recipe, progress=False)
    run = recipe.run_dir
    for name in ("recipe.yaml", "metrics.jsonl", "summary.json", "curves.png"):
        assert (run / name).is_file(), name
    # the saved recipe is the resolved one and reloads to the same fingerprint
    again = recipe_from_dict(yaml.safe_load((run / "recipe.yaml").read_text()))
    assert again.fingerprint() == recipe.fingerprint()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["epoch"]) for r in records] == [("teacher", 1), ("stage1", 1), ("stage2", 1)]
    assert set(records[1]["train"]) == {"ce", "itrd_corr", "itrd_mi", "loss"}
    for r in records:
        assert 0 <= r["test_top1"] <= 100 and r["images_per_s"] > 0
    on_disk = json.loads((run / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert [s["quant"] for s in on_disk["stages"]] == ["FP", "W32A1", "W1A1"]
    # the student stages ran the frozen teacher with its BatchNorms folded (checked against eager)
    assert [s["teacher_forward"] for s in on_disk["stages"]] == ["", "folded", "folded"]
    assert "test_top1" in on_disk["teacher"]
    ck = _final_states(run)
    assert all(c["complete"] for c in ck.values())
    assert (run / "checkpoints" / "stage2" / "best.pt").is_file()
    # stage 2 is binary: its checkpoint holds learned scales; stage 1's does not
    assert any(k.endswith("tensor_quant.alpha") for k in ck["stage2"]["model"])
    assert not any(k.endswith("tensor_quant.alpha") for k in ck["stage1"]["model"])


def test_stage2_starts_from_stage1_weights(tiny, monkeypatch):
    """init_from copies the real-valued weights; learned scales start at mean |w| per channel."""
    captured = {}
    original = Trainer.fit

    def spy(self):
        if self.stage.name == "stage2":
            captured["w"] = self.model.layer1[0].conv1.weight.detach().clone()
            captured["alpha"] = self.model.layer1[0].conv1.weight_quant.tensor_quant.alpha.detach().clone()
        return original(self)

    monkeypatch.setattr(Trainer, "fit", spy)
    recipe = recipe_from_dict(tiny)
    run_recipe(recipe, progress=False)
    s1 = load_checkpoint(recipe.run_dir / "checkpoints" / "stage1" / "last.pt")["model"]
    assert torch.equal(captured["w"], s1["layer1.0.conv1.weight"])
    expected = s1["layer1.0.conv1.weight"].abs().mean(dim=(1, 2, 3))
    assert torch.allclose(captured["alpha"].flatten(), expected)


class _Crash(Exception):
    pass


@pytest.mark.parametrize("crash_at", ["save:2", "save:4", "step:9"])
def test_resume_after_crash_is_bit_identical(tmp_path, monkeypatch, crash_at):
    """Crash after a checkpoint (mid-stage and between stages) or mid-epoch; resume; same weights."""
    ref = recipe_from_dict(tiny_recipe_dict(tmp_path / "ref", epochs=2))
    run_recipe(ref, progress=False)
    expected = _final_states(ref.run_dir)

    crashed = recipe_from_dict(tiny_recipe_dict(tmp_path / "crash", epochs=2))
    kind, n = crash_at.split(":")
    calls = {"n": 0}
    if kind == "save":
        original = Trainer._save

        def save_then_crash(self, complete, best):
            original(self, complete, best)
            calls["n"] += 1
            if calls["n"] == int(n):
                raise _Crash()

        monkeypatch.setattr(Trainer, "_save", save_then_crash)
    else:
        from bnn_distill import losses

        original_forward = losses.Criterion.forward

        def forward_then_crash(self, inputs):
            calls["n"] += 1
            if calls["n"] == int(n):
                raise _Crash()
            return original_forward(self, inputs)

        monkeypatch.setattr(losses.Criterion, "forward", forward_then_crash)
    with pytest.raises(_Crash):
        run_recipe(crashed, progress=False)
    monkeypatch.undo()
    run_recipe(crashed, resume=True, progress=False)
    got = _final_states(crashed.run_dir)
    for stage, ck in expected.items():
        for key, tensor in ck["model"].items():
            assert torch.equal(tensor, got[stage]["model"][key]), f"{stage}: {key} differs after resume"
        assert [h.get("test_top1") for h in ck["history"]] == [h.get("test_top1") for h in got[stage]["history"]]


def test_existing_run_folder_is_never_overwritten(tiny):
    recipe = recipe_from_dict(tiny)
    run_recipe(recipe, progress=False)
    before = (recipe.run_dir / "checkpoints" / "stage2" / "last.pt").read_bytes()
    with pytest.raises(UserError, match="already holds a run"):
        run_recipe(recipe, progress=False)
    changed = dict(tiny, seed=4)
    with pytest.raises(UserError, match="recipe differs"):
        run_recipe(recipe_from_dict(changed), resume=True, progress=False)
    assert (recipe.run_dir / "checkpoints" / "stage2" / "last.pt").read_bytes() == before
    # resuming a finished run with the same recipe trains nothing and keeps the weights
    run_recipe(recipe, resume=True, progress=False)
    assert (recipe.run_dir / "checkpoints" / "stage2" / "last.pt").read_bytes() == before


def test_resume_without_a_run_is_a_clear_error(tiny):
    with pytest.raises(UserError, match="no run to resume"):
        run_recipe(recipe_from_dict(tiny), resume=True, progress=False)


def test_nan_loss_stops_with_step_and_term(tiny, monkeypatch):
    from bnn_distill import losses

    spec = losses.LOSSES["itrd_mi"]
    calls = {"n": 0}

    def poisoned(x, embed):
        calls["n"] += 1
        value = spec.fn(x, embed)
        return value * float("nan") if calls["n"] == 3 else value

    monkeypatch.setitem(losses.LOSSES, "itrd_mi", losses.LossSpec(poisoned, spec.params, True, True, spec.doc))
    recipe = recipe_from_dict(tiny)
    with pytest.raises(TrainingDiverged) as err:
        run_recipe(recipe, progress=False)
    msg = str(err.value)
    assert "step 3" in msg and "itrd_mi" in msg and "stage1" in msg and "\n" not in msg
    # the teacher's checkpoint survives
    assert load_checkpoint(recipe.run_dir / "checkpoints" / "teacher" / "last.pt")["complete"]


def test_teacher_checkpoint_instead_of_teacher_stage(tiny, tmp_path):
    first = recipe_from_dict(tiny)
    run_recipe(first, progress=False)
    d = tiny_recipe_dict(tmp_path / "second", name="from_ckpt")
    d["teacher"]["checkpoint"] = str(first.run_dir / "checkpoints" / "teacher" / "best.pt")
    d["stages"] = d["stages"][1:]
    summary = run_recipe(recipe_from_dict(d), progress=False)
    assert summary["teacher"]["source"].endswith("best.pt")
    assert [s["name"] for s in summary["stages"]] == ["stage1", "stage2"]


def test_teacher_checkpoint_of_another_architecture_is_refused(tiny, tmp_path):
    first = recipe_from_dict(tiny)
    run_recipe(first, progress=False)
    d = tiny_recipe_dict(tmp_path / "second", name="wrong")
    d["teacher"] = {
        "arch": "cifar_resnet20",
        "width_mult": 0.5,
        "checkpoint": str(first.run_dir / "checkpoints" / "teacher" / "last.pt"),
    }
    d["stages"] = d["stages"][1:]
    d["stages"][0].pop("init_from")
    with pytest.raises(UserError, match="does not match the model"):
        run_recipe(recipe_from_dict(d), progress=False)


def _cli(*args, cwd=None, env=None):
    return subprocess.run(
        [sys.executable, "-m", "bnn_distill", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=600
    )


def test_cli_train_eval_summary_as_a_user_runs_them(tiny, tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny))
    res = _cli("train", str(path), "--no-progress")
    assert res.returncode == 0, res.stderr
    assert "stage2 (student, W1A1" in res.stdout
    run = Path(tiny["output_dir"]) / "tiny"
    res = _cli("eval", str(run), "--json")
    assert res.returncode == 0, res.stderr
    ev = json.loads(res.stdout)
    summary = json.loads((run / "summary.json").read_text())
    # eval of the final checkpoint reproduces the accuracy recorded at the end of training
    assert ev["top1"] == pytest.approx(summary["stages"][-1]["final"]["test_top1"])
    assert ev["quant"] == "W1A1" and ev["n"] == 32
    res = _cli("eval", str(run), "--stage", "teacher")
    assert res.returncode == 0 and "FP (stage teacher)" in res.stdout
    res = _cli("summary", str(run / "checkpoints" / "stage2" / "last.pt"))
    assert res.returncode == 0 and "XNOR" in res.stdout
    res = _cli("summary", str(path), "--json")
    assert res.returncode == 0
    assert len(json.loads(res.stdout)) == 3  # teacher FP, W32A1, W1A1
    # a second train into the same folder: one line, exit 2, nothing overwritten
    res = _cli("train", str(path), "--no-progress")
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
    res = _cli("eval", str(tmp_path / "nope"))
    assert res.returncode == 2 and res.stderr.startswith("error:")


def test_ddp_two_processes_gloo_matches_one_process(tmp_path):
    """torchrun, 2 CPU processes, same global batch: same learning curve within tolerance; rank 0 writes.

    Not bit-equal by design: the two runs draw different batches (DistributedSampler), and
    BatchNorm and ITRD statistics are computed over each process's half batch, which on this
    4-channel toy network slows learning visibly. Tolerance: every epoch's loss within 40% and
    both runs learning. (The exact equivalence of one DDP step is tested below.)
    """

    def recipe(out):
        d = tiny_recipe_dict(out, epochs=3, name="ddp")
        d["data"]["limit_train"] = 512
        d["data"]["limit_test"] = 64
        for st in d["stages"]:
            st["batch_size"] = 64
        return d

    single = recipe_from_dict(recipe(tmp_path / "one"))
    run_recipe(single, progress=False)
    d = recipe(tmp_path / "runs")
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(d))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "bnn_distill",
        "train",
        str(path),
        "--no-progress",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "runs" / "ddp"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["machine"]["world_size"] == 2
    assert res.stdout.count("total ") == 2  # both ranks finish; only rank 0's files exist
    assert not [p.name for p in run.rglob("*") if p.name.endswith(".tmp")]
    one = [json.loads(line) for line in (single.run_dir / "metrics.jsonl").read_text().splitlines()]
    two = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["epoch"]) for r in one] == [(r["stage"], r["epoch"]) for r in two]
    for a, b in zip(one, two):
        if a["stage"] == "teacher":
            assert b["train"]["loss"] == pytest.approx(a["train"]["loss"], rel=0.4), (a["stage"], a["epoch"])
    for stage in ("teacher", "stage1", "stage2"):
        for runs in (one, two):
            curve = [r["train"]["loss"] for r in runs if r["stage"] == stage]
            assert curve[-1] < curve[0], (stage, curve)


def test_ddp_step_equals_single_process_step(tmp_path):
    """Gradient averaging over 2 gloo processes == one step on the whole batch (binary student)."""
    from ddp_step_worker import model_and_batch

    out = tmp_path / "ddp.pt"
    worker = Path(__file__).with_name("ddp_step_worker.py")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker), str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    model, x, y = model_and_batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    ddp_state = torch.load(out, weights_only=True)
    for k, v in model.state_dict().items():
        assert torch.allclose(ddp_state[k].float(), v.float(), atol=1e-6), k
    assert not torch.equal(ddp_state["fc.weight"], model_and_batch()[0].state_dict()["fc.weight"])  # it moved


def test_loading_weights_keeps_the_trained_parameter_objects():
    """Brevitas rebuilds quantisers on load_state_dict by default; ours must load in place."""
    from bnn_distill.checkpoint import load_model_state
    from bnn_distill.models import create_model

    model = create_model("cifar_resnet20", 10, quant="W1A1", width_mult=0.25, weight_scale="learned")
    before = {name: id(p) for name, p in model.named_parameters()}
    state = {k: v + 1 if v.dtype.is_floating_point else v for k, v in model.state_dict().items()}
    load_model_state(model, state, "test")
    assert {name: id(p) for name, p in model.named_parameters()} == before
    alpha = model.layer1[0].conv1.weight_quant.tensor_quant.alpha
    assert torch.equal(alpha, state["layer1.0.conv1.weight_quant.tensor_quant.alpha"])


def test_missing_data_writes_nothing(tiny, tmp_path, monkeypatch):
    import bnn_distill.data as data

    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian-package")
    d = dict(tiny, data={"dataset": "fashion_mnist", "root": str(tmp_path)})
    with pytest.raises(UserError, match="fashion_mnist"):
        run_recipe(recipe_from_dict(d), progress=False)
    assert not Path(tiny["output_dir"]).exists()

"""Tests of recipe loading (bnn_distill.recipe) and of how the CLI reports a bad recipe.

The shipped recipes must load and dry-run; ``to_yaml`` must round-trip; ``--set`` overrides
must reach list items by name or index. The core is a corpus of malformed recipes, each made
from one valid minimal recipe (``BASE``) by breaking one thing: every one must raise
``RecipeError`` with a single line naming the bad key's path and the valid values or a
did-you-mean hint, and the CLI must turn it into exit status 2 and one ``error:`` line.

CLI starts cost ~5 s each (torch + brevitas imports), so subprocesses run concurrently and
the full corpus goes through ``bnn_distill.cli.main`` in-process in ONE helper subprocess;
only a handful of representative cases start the real ``bnn-distill`` executable.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import pytest
from conftest import make_image_folder

from bnn_distill.errors import RecipeError
from bnn_distill.recipe import Recipe, apply_override, load_recipe, parse_overrides, recipe_from_dict

REPO = Path(__file__).resolve().parent.parent
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
CLI = Path(sys.executable).with_name("bnn-distill")


def _cli() -> List[str]:
    return [str(CLI)] if CLI.is_file() else [sys.executable, "-m", "bnn_distill"]


def _env() -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONWARNINGS"] = "ignore"  # a third-party warning would not be our error line
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def _tree(path: Path) -> List[str]:
    """Everything under ``path`` (relative names), or [] when it does not exist."""
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []


def _error_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert isinstance(exc.value, RecipeError), type(exc.value)
    assert "\n" not in text and "\r" not in text, f"message is not one line: {text!r}"
    return text


# --------------------------------------------------------------------------- the minimal valid recipe
# Values differ between the two stages (epochs 3/2, batch_size 32/64, ...) so that a one-line
# replacement can target either stage.

HEAD = """\
name: tiny
data:
  dataset: fmnist_subset
teacher:
  arch: cifar_resnet20
  width_mult: 0.25
student:
  arch: cifar_resnet20
  width_mult: 0.25
"""

TEACHER_STAGE = """\
  - name: teacher
    kind: teacher
    quant: FP
    epochs: 3
    batch_size: 32
    optimizer: {name: sgd, lr: 0.1}
    schedule: {name: cosine, warmup_epochs: 0.5}
    losses:
      - {name: ce}
"""

STUDENT_STAGE = """\
  - name: stage1
    kind: student
    quant: W32A1
    init_from: teacher
    epochs: 2
    batch_size: 64
    optimizer: {name: adam, lr: 0.002}
    schedule: {name: step, milestones: [1]}
    losses:
      - {name: ce}
      - {name: itrd_corr, weight: 2.0, alpha: 1.01}
      - {name: itrd_mi}
"""

BASE = HEAD + "stages:\n" + TEACHER_STAGE + STUDENT_STAGE
NO_TEACHER = HEAD + "stages:\n" + STUDENT_STAGE.replace("init_from: teacher", "init_from: null")


def broken(old: str, new: str, base: str = BASE) -> str:
    """``base`` with the single occurrence of ``old`` replaced by ``new``."""
    assert base.count(old) == 1, f"{old!r} occurs {base.count(old)} times in the base recipe"
    return base.replace(old, new)


def _line(text: str) -> int:
    """1-based line number of ``text`` in BASE."""
    return BASE.splitlines().index(text) + 1


# (id, yaml text, substrings the one-line message must contain[, marks])
CASES: List[Tuple] = [
    # ---- not YAML / not a mapping
    (
        "yaml_unclosed_flow",
        broken("optimizer: {name: sgd, lr: 0.1}", "optimizer: {name: sgd, lr: 0.1"),
        ("is not valid YAML", "line ", "column "),
    ),
    (
        "yaml_tab_indent",
        broken("    quant: W32A1\n", "\tquant: W32A1\n"),
        ("is not valid YAML", f"line {_line('    quant: W32A1')}, column 1"),
    ),
    ("yaml_unterminated_quote", broken("name: tiny\n", 'name: "tiny\n'), ("is not valid YAML", "line ")),
    (
        "yaml_bad_indent",
        broken("    kind: student\n", "      kind: student\n"),
        ("is not valid YAML", f"line {_line('    kind: student')}"),
    ),
    ("empty_file", "", ("empty", "'name'", "'stages'")),
    ("comments_only", "# a recipe\n# nothing else\n", ("empty", "'stages'")),
    ("top_level_list", "- name: tiny\n- stages: []\n", ("top level", "got a list")),
    ("top_level_scalar", "tiny\n", ("top level", "'tiny'")),
    # ---- wrong nesting
    (
        "stages_mapping",
        HEAD + "stages:\n  teacher:\n    kind: teacher\n    quant: FP\n",
        ("stages: expected a list", "got a mapping"),
    ),
    (
        "optimizer_string",
        broken("optimizer: {name: sgd, lr: 0.1}", "optimizer: sgd"),
        ("stages[0].optimizer: expected a mapping", "'sgd'"),
    ),
    (
        "data_list",
        broken("data:\n  dataset: fmnist_subset", "data:\n  - dataset: fmnist_subset"),
        ("data: expected a mapping", "got a list"),
    ),
    (
        "losses_mapping",
        broken("    losses:\n      - {name: ce}\n  - name: stage1", "    losses: {name: ce}\n  - name: stage1"),
        ("stages[0].losses: expected a list", "got a mapping"),
    ),
    (
        "loss_as_string",
        broken("    losses:\n      - {name: ce}\n  - name: stage1", "    losses: [ce]\n  - name: stage1"),
        ("stages[0].losses[0]: expected a mapping", "'ce'"),
    ),
    ("stage_as_string", BASE + "  - stage2\n", ("stages[2]: expected a mapping", "'stage2'")),
    # ---- wrong types
    ("epochs_string", broken("epochs: 2", "epochs: ten"), ("stages[1].epochs: expected an integer", "'ten'")),
    (
        "batch_size_float",
        broken("batch_size: 32", "batch_size: 3.5"),
        ("stages[0].batch_size: expected an integer", "3.5"),
    ),
    ("lr_string", broken("lr: 0.002", "lr: fast"), ("stages[1].optimizer.lr: expected a number", "'fast'")),
    (
        "augment_string",
        broken("  dataset: fmnist_subset\n", '  dataset: fmnist_subset\n  augment: "yes"\n'),
        ("data.augment: expected true/false", "'yes'"),
    ),
    (
        "width_mult_string",
        broken("width_mult: 0.25\nstages", "width_mult: half\nstages"),
        ("student.width_mult: expected a number", "'half'"),
    ),
    (
        "betas_one_value",
        broken("{name: adam, lr: 0.002}", "{name: adam, lr: 0.002, betas: [0.9]}"),
        ("stages[1].optimizer.betas", "2 values"),
    ),
    # PyYAML reads '1e-3' (no dot) as a string; the message says what it got, not why
    ("lr_yaml11_exponent", broken("lr: 0.002", "lr: 1e-3"), ("stages[1].optimizer.lr: expected a number", "'1e-3'")),
    # ---- unknown keys and typos
    (
        "epoch_typo",
        broken("epochs: 2", "epoch: 2"),
        ("stages[1].epoch: unknown key", "did you mean 'epochs'", "'batch_size'"),
    ),
    (
        "optimiser_typo",
        broken("optimizer: {name: adam", "optimiser: {name: adam"),
        ("stages[1].optimiser: unknown key", "did you mean 'optimizer'"),
    ),
    ("stagse_typo", broken("stages:\n", "stagse:\n"), ("stagse: unknown key", "did you mean 'stages'")),
    (
        "datset_typo",
        broken("  dataset: fmnist_subset", "  datset: fmnist_subset"),
        ("data.datset: unknown key", "did you mean 'dataset'"),
    ),
    (
        "warmup_typo",
        broken("warmup_epochs: 0.5", "warmup_epoch: 0.5"),
        ("stages[0].schedule.warmup_epoch: unknown key", "did you mean 'warmup_epochs'"),
    ),
    (
        "alpah_typo",
        broken("alpha: 1.01", "alpah: 1.01"),
        ("stages[1].losses[1].alpah", "did you mean 'alpha'", "'eps'"),
    ),
    ("missing_name", broken("name: tiny\n", ""), ("name: missing",)),
    (
        "stage_missing_name",
        broken("  - name: stage1\n    kind: student", "  - kind: student"),
        ("stages[1].name: missing",),
    ),
    # ---- impossible numbers
    ("epochs_zero", broken("epochs: 2", "epochs: 0"), ("stages[1].epochs: 0", "> 0")),
    ("epochs_negative", broken("epochs: 3", "epochs: -3"), ("stages[0].epochs: -3", "> 0")),
    ("batch_size_zero", broken("batch_size: 64", "batch_size: 0"), ("stages[1].batch_size: 0", "> 0")),
    ("batch_size_negative", broken("batch_size: 32", "batch_size: -32"), ("stages[0].batch_size: -32", "> 0")),
    (
        "epochs_absurd",
        broken("epochs: 2", "epochs: 1000000000"),
        ("stages[1].epochs: 1000000000", "absurd", "1..100000"),
    ),
    (
        "batch_size_absurd",
        broken("batch_size: 64", "batch_size: 1000000000"),
        ("stages[1].batch_size: 1000000000", "absurd", "1..1000000"),
    ),
    (
        "width_mult_absurd",
        broken("width_mult: 0.25\nstages", "width_mult: 1000\nstages"),
        ("student.width_mult: 1000", "(0, 16]"),
    ),
    (
        "num_workers_absurd",
        broken("  dataset: fmnist_subset\n", "  dataset: fmnist_subset\n  num_workers: 1000\n"),
        ("data.num_workers: 1000", "0..64"),
    ),
    ("lr_nan", broken("lr: 0.1}", "lr: .nan}"), ("stages[0].optimizer.lr", "not a finite number")),
    (
        "warmup_inf",
        broken("warmup_epochs: 0.5", "warmup_epochs: .inf"),
        ("stages[0].schedule.warmup_epochs", "not a finite"),
    ),
    ("loss_weight_inf", broken("weight: 2.0", "weight: .inf"), ("stages[1].losses[1].weight", "finite")),
    (
        "loss_weight_negative",
        broken("{name: itrd_mi}", "{name: itrd_mi, weight: -1}"),
        ("stages[1].losses[2].weight", ">= 0"),
    ),
    ("alpha_nan", broken("alpha: 1.01", "alpha: .nan"), ("stages[1].losses[1].alpha", "out of range")),
    (
        "label_smoothing_out_of_range",
        broken("      - {name: ce}\n  - name: stage1", "      - {name: ce, label_smoothing: 5}\n  - name: stage1"),
        ("stages[0].losses[0].label_smoothing",),
    ),
    (
        "warmup_longer_than_stage",
        broken("warmup_epochs: 0.5", "warmup_epochs: 5"),
        ("stages[0].schedule.warmup_epochs: 5", "exceeds", "3 epochs"),
    ),
    ("milestone_out_of_range", broken("milestones: [1]", "milestones: [5]"), ("stages[1].schedule.milestones", "1..2")),
    (
        "milestones_decreasing",
        broken("milestones: [1]", "milestones: [2, 1]"),
        ("stages[1].schedule.milestones", "increasing"),
    ),
    ("tau_out_of_range", BASE + "binary: {tau_start: 1.5}\n", ("binary.tau_start: 1.5", "[0.5, 1)")),
    ("seed_negative", broken("name: tiny\n", "name: tiny\nseed: -1\n"), ("seed: -1", ">= 0")),
    # ---- unknown names
    (
        "model_typo",
        broken("arch: cifar_resnet20\n  width_mult: 0.25\nstages", "arch: cifar_resnet2O\n  width_mult: 0.25\nstages"),
        ("student.arch: 'cifar_resnet2O'", "did you mean 'cifar_resnet20'", "valid: ", "'cifar_resnet18'"),
    ),
    (
        "loss_typo",
        broken("{name: itrd_corr", "{name: itrd_cor"),
        ("stages[1].losses[1].name", "'itrd_cor'", "did you mean 'itrd_corr'", "'itrd_mi'"),
    ),
    (
        "dataset_typo",
        broken("  dataset: fmnist_subset", "  dataset: fmnist_subst"),
        ("data.dataset: 'fmnist_subst'", "did you mean 'fmnist_subset'", "'cifar10'"),
    ),
    (
        "optimizer_typo",
        broken("{name: adam,", "{name: adamm,"),
        ("stages[1].optimizer.name: 'adamm'", "did you mean 'adam'", "'adamw'", "'sgd'"),
    ),
    (
        "schedule_typo",
        broken("name: cosine", "name: cosin"),
        ("stages[0].schedule.name: 'cosin'", "did you mean 'cosine'", "'step'", "'constant'"),
    ),
    ("quant_unknown", broken("quant: W32A1", "quant: int8"), ("stages[1].quant: 'int8'", "'FP'", "'W1A1'", "'W32A1'")),
    ("quant_typo", broken("quant: W32A1", "quant: W1A2"), ("stages[1].quant: 'W1A2'", "did you mean 'W1A1'")),
    ("kind_typo", broken("kind: student", "kind: studnet"), ("stages[1].kind: 'studnet'", "did you mean 'student'")),
    ("device_unknown", broken("name: tiny\n", "name: tiny\ndevice: gpu\n"), ("device: 'gpu'", "'cuda'", "'cpu'")),
    ("run_name_space", broken("name: tiny\n", "name: my run\n"), ("name: 'my run'", "letters, digits")),
    (
        "dataset_block_scalar",
        broken("  dataset: fmnist_subset\n", "  dataset: |\n    fmnist_subset\n"),
        ("data.dataset",),
    ),
    (
        "feature_layer_typo",
        broken("width_mult: 0.25\nstages", "width_mult: 0.25\n  feature_layer: head_bnn\nstages"),
        ("student.feature_layer", "head_bn"),
    ),
    # ---- stage structure
    (
        "init_from_not_earlier",
        broken("init_from: teacher", "init_from: stage1"),
        ("stages[1].init_from", "no earlier stage named 'stage1'", "'teacher'"),
    ),
    (
        "no_teacher",
        NO_TEACHER.replace("init_from: null", "init_from: teacher"),
        ("teacher: a stage distils from a teacher", "kind: teacher", "teacher.checkpoint"),
    ),
    ("no_teacher_itrd_only", NO_TEACHER, ("teacher: a stage distils from a teacher", "teacher.checkpoint")),
    ("teacher_stage_w1a1", broken("quant: FP", "quant: W1A1"), ("stages[0].quant", "quant: FP")),
    (
        "teacher_stage_itrd_loss",
        broken("      - {name: ce}\n  - name: stage1", "      - {name: ce}\n      - {name: itrd_mi}\n  - name: stage1"),
        ("stages[0].losses[1].name", "'itrd_mi'", "use ce"),
    ),
    (
        "teacher_stage_not_first",
        BASE + TEACHER_STAGE.replace("name: teacher", "name: teacher2"),
        ("stages[2].kind", "first"),
    ),
    (
        "duplicate_stage_name",
        BASE + STUDENT_STAGE.replace("init_from: teacher", "init_from: stage1"),
        ("stages[2].name: 'stage1'", "earlier stage"),
    ),
    (
        "duplicate_loss_term",
        broken("{name: itrd_mi}", "{name: itrd_mi}\n      - {name: ce}"),
        ("stages[1].losses[3].name", "'ce' is already listed at losses[0]"),
    ),
    ("empty_stages", HEAD + "stages: []\n", ("stages: empty",)),
    (
        "teacher_init_from",
        broken("  - name: teacher\n", "  - name: teacher\n    init_from: stage1\n"),
        ("stages[0].init_from",),
    ),
    (
        "init_from_teacher_width_mismatch",
        broken("width_mult: 0.25\nstages", "width_mult: 0.5\nstages"),
        ("width_mult",),
    ),
    # ---- paths
    (
        "teacher_checkpoint_missing",
        broken("teacher:\n", "teacher:\n  checkpoint: /nonexistent/teacher.pt\n"),
        ("teacher.checkpoint", "'/nonexistent/teacher.pt'", "does not exist"),
    ),
    (
        "data_root_missing",
        broken("  dataset: fmnist_subset\n", "  dataset: fmnist_subset\n  root: /nonexistent/data\n"),
        ("data.root", "'/nonexistent/data'", "does not exist", "download"),
    ),
]

IDS = [c[0] for c in CASES]
assert len(IDS) == len(set(IDS))


def _params(cases: Sequence[Tuple]) -> list:
    return [pytest.param(c[1], c[2], id=c[0], marks=c[3:]) for c in cases]


def test_base_recipes_are_valid(tmp_path) -> None:
    """Every corpus case breaks a valid recipe: BASE, or NO_TEACHER (valid with a teacher checkpoint)."""
    p = tmp_path / "base.yaml"
    p.write_text(BASE)
    r = load_recipe(p)
    assert [s.name for s in r.stages] == ["teacher", "stage1"]
    ck = tmp_path / "t.pt"
    ck.write_bytes(b"")
    p.write_text(NO_TEACHER)
    assert load_recipe(p, [f"teacher.checkpoint={ck}"]).teacher.checkpoint == str(ck)


def test_corpus_size() -> None:
    assert len(CASES) >= 30


@pytest.mark.parametrize("text, expected", _params(CASES))
def test_bad_recipe(tmp_path, text: str, expected: Tuple[str, ...]) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError) as exc:
        load_recipe(path)
    msg = _error_line(exc)
    assert msg.startswith(f"recipe '{path}'"), msg
    for part in expected:
        assert part in msg, f"{part!r} not in {msg!r}"
    assert "Traceback" not in msg and "<class" not in msg


# --------------------------------------------------------------------------- the CLI, as a user runs it
# Every CLI start imports torch and brevitas (~4 s of CPU), so all CLI work of this module is
# launched at once by one fixture: ONE helper process runs bnn_distill.cli.main in-process for
# every corpus case and for the dry runs of the big recipes; the real executable runs the dry run
# of quick_fmnist, a few representative bad recipes and one --debug case.

HELPER = r"""
import contextlib, io, json, logging, sys
from bnn_distill.cli import main
from bnn_distill.recipe import load_recipe
results = {}
for key, argv, guard in json.load(sys.stdin):
    if guard is not None:
        try:  # a bad recipe the library accepts (a known gap) would start training: skip it
            load_recipe(guard)
            results[key] = ["accepted by load_recipe; not run", "", ""]
            continue
        except Exception:
            pass
    err, std = io.StringIO(), io.StringIO()
    logging.root.handlers.clear()  # basicConfig binds its handler to the sys.stderr of its first call
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(std):
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code
        except BaseException as e:
            rc = "raised " + type(e).__name__ + ": " + str(e)
    results[key] = [rc, err.getvalue(), std.getvalue()]
print("RESULTS " + json.dumps(results))
"""

# bad recipes that also start the real executable: a YAML error, a did-you-mean, a stage-level error
REAL_CLI = ("yaml_unclosed_flow", "dataset_typo", "no_teacher")
REAL_DRY_RUN = "quick_fmnist"


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """Launch every CLI run of this module concurrently; returns a dict of results.

    ``results["helper"][key] = [rc, stderr, stdout]`` for ``bad/<case>`` and ``dry/<recipe>``;
    ``results["real"][key] = (rc, stdout, stderr)``; ``results["root"]`` the folder of it all.
    Every run has its own empty output_dir and (for the executable) its own empty working folder.
    """
    root = tmp_path_factory.mktemp("cli")
    (root / "helper_cwd").mkdir()
    jobs = []
    for case_id, text, *_ in CASES:
        path = root / "bad" / f"{case_id}.yaml"
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
        jobs.append(
            [f"bad/{case_id}", ["train", str(path), "--set", f"output_dir={root / 'out' / case_id}"], str(path)]
        )
    images = make_image_folder(root / "imagefolder")  # for recipes that name no data.root (ImageNet)
    for p in RECIPES:
        if p.stem != REAL_DRY_RUN:
            extra = ["--set", f"data.root={images}"] if load_recipe(p).data.dataset == "imagefolder" else []
            jobs.append(
                [
                    f"dry/{p.stem}",
                    ["train", str(p), "--dry-run", "--set", f"output_dir={root / 'out' / p.stem}", *extra],
                    None,
                ]
            )

    def start(key: str, args: List[str]) -> subprocess.Popen:
        cwd = root / "cwd" / key
        cwd.mkdir(parents=True)
        return subprocess.Popen(
            _cli() + args, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    real = {
        f"dry/{REAL_DRY_RUN}": start(
            f"dry/{REAL_DRY_RUN}",
            [
                "train",
                str(REPO / "recipes" / f"{REAL_DRY_RUN}.yaml"),
                "--dry-run",
                "--set",
                f"output_dir={root / 'out' / REAL_DRY_RUN}",
            ],
        )
    }
    for case_id in REAL_CLI:
        real[f"bad/{case_id}"] = start(
            f"bad/{case_id}",
            ["train", str(root / "bad" / f"{case_id}.yaml"), "--set", f"output_dir={root / 'real_out' / case_id}"],
        )
    real["debug"] = start(
        "debug",
        [
            "train",
            str(root / "bad" / "epoch_typo.yaml"),
            "--debug",
            "--set",
            f"output_dir={root / 'real_out' / 'debug'}",
        ],
    )
    helper = subprocess.run(
        [sys.executable, "-c", HELPER],
        input=json.dumps(jobs),
        cwd=root / "helper_cwd",
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    real_results = {}
    for key, proc in real.items():
        out, err = proc.communicate(timeout=300)
        real_results[key] = (proc.returncode, out, err)
    assert helper.returncode == 0, helper.stderr[-3000:]
    line = [ln for ln in helper.stdout.splitlines() if ln.startswith("RESULTS ")]
    assert line, helper.stdout[-3000:]
    return {"helper": json.loads(line[0][len("RESULTS ") :]), "real": real_results, "root": root}


def _check_cli_error(rc, err: str, out: str, out_dir: Path, expected: Sequence[str]) -> None:
    assert rc == 2, (rc, err)
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1 and err.endswith("\n"), f"stderr is not exactly one line: {err!r}"
    assert lines[0].startswith("error: recipe '"), lines[0]
    for part in expected:
        assert part in lines[0], f"{part!r} not in {lines[0]!r}"
    assert out == "", f"stdout not empty: {out!r}"
    assert _tree(out_dir) == [], f"files written under {out_dir}"


@pytest.mark.parametrize("text, expected", _params(CASES))
def test_bad_recipe_cli(cli_runs, request, text: str, expected: Tuple[str, ...]) -> None:
    case_id = request.node.callspec.id
    rc, err, out = cli_runs["helper"][f"bad/{case_id}"]
    _check_cli_error(rc, err, out, cli_runs["root"] / "out" / case_id, expected)
    assert _tree(cli_runs["root"] / "helper_cwd") == []


@pytest.mark.parametrize("case_id", REAL_CLI)
def test_bad_recipe_real_cli(cli_runs, case_id: str) -> None:
    rc, out, err = cli_runs["real"][f"bad/{case_id}"]
    expected = {c[0]: c[2] for c in CASES}[case_id]
    _check_cli_error(rc, err, out, cli_runs["root"] / "real_out" / case_id, expected)
    assert _tree(cli_runs["root"] / "cwd" / "bad" / case_id) == [], "files written in the working folder"


def test_debug_shows_traceback(cli_runs) -> None:
    rc, out, err = cli_runs["real"]["debug"]
    assert rc != 0
    assert "Traceback (most recent call last)" in err
    assert "bnn_distill.errors.RecipeError" in err and "stages[1].epoch: unknown key" in err
    assert "did you mean 'epochs'" in err
    assert _tree(cli_runs["root"] / "real_out" / "debug") == []


# --------------------------------------------------------------------------- shipped recipes


def test_there_are_shipped_recipes() -> None:
    assert REAL_DRY_RUN in {p.stem for p in RECIPES}


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_shipped_recipe_loads(path: Path) -> None:
    r = load_recipe(path)
    assert isinstance(r, Recipe)
    assert r.name == path.stem
    assert r.stages and r.stages[-1].kind == "student"


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_shipped_recipe_dry_run(cli_runs, path: Path) -> None:
    key = f"dry/{path.stem}"
    if path.stem == REAL_DRY_RUN:
        rc, stdout, stderr = cli_runs["real"][key]
        assert _tree(cli_runs["root"] / "cwd" / key) == [], "dry run wrote into its working folder"
    else:
        rc, stderr, stdout = cli_runs["helper"][key]
        assert _tree(cli_runs["root"] / "helper_cwd") == [], "dry run wrote into its working folder"
    assert rc == 0, stderr[-3000:]
    out = cli_runs["root"] / "out" / path.stem
    recipe = load_recipe(path, [f"output_dir={out}"])
    assert f"name: {recipe.name}" in stdout
    for st in recipe.stages:
        assert f"name: {st.name}" in stdout
    assert f"output_dir: {out}" in stdout
    assert stdout.rstrip().splitlines()[-1] == f"recipe OK; run folder would be {out / recipe.name}"
    assert "Traceback" not in stderr
    assert not out.exists(), f"dry run created {out}: {_tree(out)}"


# --------------------------------------------------------------------------- round trip and fingerprint


@pytest.mark.parametrize("path", RECIPES + ["BASE"], ids=[p.stem for p in RECIPES] + ["base"])
def test_yaml_round_trip(tmp_path, path) -> None:
    if path == "BASE":
        path = tmp_path / "base.yaml"
        path.write_text(BASE)
    r1 = load_recipe(path)
    text = r1.to_yaml()
    (tmp_path / "again.yaml").write_text(text)
    r2 = load_recipe(tmp_path / "again.yaml")
    assert r2 == r1
    assert r2.fingerprint() == r1.fingerprint()
    assert r2.to_yaml() == text  # a fixed point
    assert recipe_from_dict(r1.to_dict()) == r1


def test_fingerprint_tracks_results_not_places(tmp_path) -> None:
    path = tmp_path / "base.yaml"
    path.write_text(BASE)
    fp = load_recipe(path).fingerprint()
    assert len(fp) == 16
    for ov in ("output_dir=/elsewhere", "device=cpu", "description=hello", "data.num_workers=2"):
        assert load_recipe(path, [ov]).fingerprint() == fp, ov
    for ov in (
        "stages.stage1.epochs=1",
        "seed=1",
        "stages.teacher.optimizer.lr=0.2",
        "binary.tau_end=0.95",
        "stages.stage1.losses.itrd_corr.alpha=1.5",
        "data.limit_train=10",
    ):
        assert load_recipe(path, [ov]).fingerprint() != fp, ov


def test_equal_recipes_have_equal_fingerprints(tmp_path) -> None:
    path = tmp_path / "base.yaml"
    path.write_text(BASE)
    a = load_recipe(path, ["stages.stage1.losses.itrd_corr.alpha=2"])
    b = load_recipe(path, ["stages.stage1.losses.itrd_corr.alpha=2.0"])
    assert a == b
    assert a.fingerprint() == b.fingerprint()


# --------------------------------------------------------------------------- overrides


@pytest.fixture
def base_path(tmp_path) -> Path:
    p = tmp_path / "base.yaml"
    p.write_text(BASE)
    return p


def test_override_by_name_and_index(base_path) -> None:
    r = load_recipe(base_path, ["stages.stage1.epochs=2", "stages.0.epochs=5", "stages.-1.batch_size=8"])
    assert [s.epochs for s in r.stages] == [5, 2]
    assert r.stages[1].batch_size == 8
    r = load_recipe(base_path, ["stages.1.epochs=7"])
    assert r.stage("stage1").epochs == 7
    r = load_recipe(base_path, ["stages.stage1.losses.itrd_corr.alpha=1.5", "stages.stage1.optimizer.name=sgd"])
    assert r.stage("stage1").losses[1].params["alpha"] == 1.5
    assert r.stage("stage1").optimizer.name == "sgd"


def test_override_creates_nested_keys(base_path) -> None:
    r = load_recipe(base_path, ["data.limit_train=10", "binary.tau_start=0.9", "stages.teacher.grad_clip=5"])
    assert r.data.limit_train == 10
    assert r.binary.tau_start == 0.9
    assert r.stages[0].grad_clip == 5.0
    raw: dict = {}
    apply_override(raw, "a.b.c", 1)
    assert raw == {"a": {"b": {"c": 1}}}


def test_override_values_are_yaml_scalars() -> None:
    assert parse_overrides(["a=2", "b=2.5", "c=true", "d=null", "e=[1, 2]", "f=x=y", "g="]) == [
        ("a", 2),
        ("b", 2.5),
        ("c", True),
        ("d", None),
        ("e", [1, 2]),
        ("f", "x=y"),
        ("g", None),
    ]


BAD_OVERRIDES = [
    ("stages.stage9.epochs=2", ("--set stages.stage9", "no item named 'stage9'", "did you mean 'stage1'", "'teacher'")),
    ("stages.5.epochs=2", ("--set stages.5", "index 5 out of range", "2 items")),
    ("stages.-3.epochs=2", ("--set stages.-3", "out of range")),
    ("stages.stage1.losses.itrd_cor.alpha=2", ("--set stages.stage1.losses.itrd_cor", "did you mean 'itrd_corr'")),
    ("stages.stage1.epoch=2", ("stages[1].epoch: unknown key", "did you mean 'epochs'")),
    ("stages.stage1.epochs=ten", ("stages[1].epochs: expected an integer", "'ten'")),
    ("stages.stage1.epochs=0", ("stages[1].epochs: 0",)),
    ("stages.stage1.optimizer.lr=fast", ("stages[1].optimizer.lr: expected a number", "'fast'")),
    ("data.augment=maybe", ("data.augment: expected true/false", "'maybe'")),
    ("stages=3", ("stages: expected a list",)),
    ("name.x=1", ("--set name.x", "'name' is not a mapping")),
    ("stages.stage1.optimizer.lr=[1", ("--set stages.stage1.optimizer.lr=[1", "not valid YAML")),
    ("epochs", ("--set epochs", "KEY.PATH=VALUE")),
    ("=3", ("--set =3", "not a key path")),
    ("modle.arch=x", ("modle: unknown key",)),
    (".epochs=2", ("'.epochs'",)),
]


@pytest.mark.parametrize("override, expected", [pytest.param(o, e, id=o, marks=m) for o, e, *m in BAD_OVERRIDES])
def test_bad_override(base_path, override: str, expected: Tuple[str, ...]) -> None:
    with pytest.raises(RecipeError) as exc:
        load_recipe(base_path, [override])
    msg = _error_line(exc)
    for part in expected:
        assert part in msg, f"{part!r} not in {msg!r}"


def test_missing_recipe_file(tmp_path) -> None:
    with pytest.raises(RecipeError) as exc:
        load_recipe(tmp_path / "nope.yaml")
    assert "does not exist" in _error_line(exc)
    with pytest.raises(RecipeError) as exc:
        load_recipe(tmp_path)  # a folder
    assert "does not exist" in _error_line(exc) or "folder" in str(exc.value)


def test_non_utf8_recipe(tmp_path) -> None:
    p = tmp_path / "latin1.yaml"
    p.write_bytes(BASE.replace("name: tiny", "name: t\xe9").encode("latin-1"))
    with pytest.raises(RecipeError) as exc:
        load_recipe(p)
    assert "UTF-8" in _error_line(exc)

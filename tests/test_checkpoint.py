"""Tests of bnn_distill.checkpoint: atomic writes, safe loading, state-dict matching.

Every problem with a checkpoint file must surface as one-line ``CheckpointError``; a file with
pickled objects must be refused without running them. Models are small CIFAR ResNets.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from bnn_distill.checkpoint import (
    FORMAT,
    atomic_save,
    atomic_write_bytes,
    load_checkpoint,
    load_model_state,
    state_dict_of,
)
from bnn_distill.errors import CheckpointError, UserError
from bnn_distill.models import create_model


def _one_line(exc: pytest.ExceptionInfo) -> str:
    assert isinstance(exc.value, CheckpointError), type(exc.value)
    text = str(exc.value)
    assert text and "\n" not in text and "\r" not in text, f"message is not one line: {text!r}"
    return text


def _files(folder: Path) -> list:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture(scope="module")
def small_model():
    return create_model("cifar_resnet20", 10, width_mult=0.25)


@pytest.fixture(scope="module")
def real_checkpoint(tmp_path_factory, small_model) -> bytes:
    """The bytes of a real bnn-distill checkpoint of a quarter-width ResNet-20 (~110 kB)."""
    path = tmp_path_factory.mktemp("ck") / "last.pt"
    atomic_save({"format": FORMAT, "model": small_model.state_dict(), "epoch": 3}, path)
    return path.read_bytes()


# --------------------------------------------------------------------------- atomic writes


def test_round_trip(tmp_path) -> None:
    obj = {
        "format": FORMAT,
        "model": {"w": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.int64), "flag": torch.tensor([True, False])},
        "epoch": 7,
        "stage": "stage1",
        "history": [1, 2.5, "three", [4, {"five": 5}]],
        "best": {"top1": 91.25, "epoch": None},
        "rng": torch.get_rng_state(),
    }
    path = tmp_path / "sub" / "dir" / "ck.pt"  # parents are created
    atomic_save(obj, path)
    assert _files(path.parent) == ["ck.pt"]  # no temp file left behind
    back = load_checkpoint(path)
    assert set(back) == set(obj)
    for k, v in obj["model"].items():
        assert torch.equal(back["model"][k], v) and back["model"][k].dtype == v.dtype
    assert torch.equal(back["rng"], obj["rng"])
    assert {k: back[k] for k in ("format", "epoch", "stage", "history", "best")} == {
        k: obj[k] for k in ("format", "epoch", "stage", "history", "best")
    }
    assert state_dict_of(back) is back["model"]


def test_overwrite_and_write_bytes(tmp_path) -> None:
    path = tmp_path / "ck.pt"
    atomic_save({"epoch": 1}, path)
    atomic_save({"epoch": 2}, path)
    assert load_checkpoint(path)["epoch"] == 2
    atomic_write_bytes(tmp_path / "summary.json", b'{"a": 1}\n')
    atomic_write_bytes(tmp_path / "summary.json", b'{"a": 2}\n')
    assert (tmp_path / "summary.json").read_bytes() == b'{"a": 2}\n'
    assert _files(tmp_path) == ["ck.pt", "summary.json"]


@pytest.mark.parametrize("exc_type", [RuntimeError, KeyboardInterrupt, OSError])
@pytest.mark.parametrize("existing", [False, True], ids=["new", "existing"])
def test_crash_during_save(tmp_path, monkeypatch, exc_type, existing: bool) -> None:
    path = tmp_path / "last.pt"
    if existing:
        atomic_save({"epoch": 1, "w": torch.ones(3)}, path)
        before = path.read_bytes()

    def crashing_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint" * 100)
        raise exc_type("disk on fire")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(exc_type, match="disk on fire"):
        atomic_save({"epoch": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    if existing:
        assert _files(tmp_path) == ["last.pt"], "a temp file was left behind"
        assert path.read_bytes() == before, "the existing checkpoint was changed"
        assert load_checkpoint(path)["epoch"] == 1
    else:
        assert _files(tmp_path) == [], "a partial or temp file was left behind"


def test_crash_during_write_bytes(tmp_path) -> None:
    path = tmp_path / "curves.png"
    path.write_bytes(b"old")
    with pytest.raises(TypeError):
        atomic_write_bytes(path, "not bytes")  # type: ignore[arg-type]
    assert path.read_bytes() == b"old"
    assert _files(tmp_path) == ["curves.png"]


# --------------------------------------------------------------------------- unsafe payloads


class _Payload:
    """Unpickling this creates ``marker`` (through ``open(marker, 'w')``)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("where", ["top", "in_model"])
def test_pickle_payload_refused(tmp_path, where: str) -> None:
    marker = tmp_path / "PWNED"
    obj = {"format": FORMAT, "model": {"w": torch.zeros(2)}, "epoch": 1}
    if where == "top":
        obj["extra"] = _Payload(marker)
    else:
        obj["model"]["evil"] = _Payload(marker)
    path = tmp_path / "evil.pt"
    torch.save(obj, path)  # plain torch.save: pickles the payload
    assert not marker.exists()
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(path)
    msg = _one_line(exc)
    assert "refused" in msg and str(path) in msg
    assert not marker.exists(), "loading the checkpoint ran the pickled payload"


# --------------------------------------------------------------------------- broken files


@pytest.mark.parametrize("cut", [0.5, 0.9, 0.999, 64, 1], ids=["half", "90pct", "last_bytes", "64_bytes", "1_byte"])
def test_truncated(tmp_path, real_checkpoint: bytes, cut) -> None:
    n = int(len(real_checkpoint) * cut) if isinstance(cut, float) else cut
    path = tmp_path / "cut.pt"
    path.write_bytes(real_checkpoint[:n])
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(path)
    msg = _one_line(exc)
    assert str(path) in msg and ("corrupted" in msg or "truncated" in msg), msg


def test_real_checkpoint_loads(tmp_path, real_checkpoint: bytes, small_model) -> None:
    path = tmp_path / "ok.pt"
    path.write_bytes(real_checkpoint)
    ck = load_checkpoint(path)
    assert ck["epoch"] == 3
    assert load_model_state(create_model("cifar_resnet20", 10, width_mult=0.25), state_dict_of(ck), "ck") == set()


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(random.Random(0).randbytes(4096), id="random_bytes_seed0"),
        pytest.param(random.Random(195).randbytes(4096), id="random_bytes_seed195"),
        pytest.param(b"", id="empty"),
        pytest.param(b"\x80\x02}q\x00.", id="pickle_not_torch"),
        pytest.param(b"PK\x03\x04 not really a zip", id="zip_magic"),
        pytest.param(b"\x00" * 100, id="zeros"),
        pytest.param(random.Random(2).randbytes(4096), id="random_bytes_seed2"),
        pytest.param(b"hello world, not a checkpoint\n", id="text_file"),
    ],
)
def test_garbage_file(tmp_path, content: bytes) -> None:
    path = tmp_path / "garbage.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(path)
    assert str(path) in _one_line(exc)


@pytest.mark.parametrize(
    "content", [random.Random(0).randbytes(4096), b"name: tiny\nstages: []\n"], ids=["random_bytes", "yaml_text"]
)
def test_garbage_is_not_called_unsafe(tmp_path, content: bytes) -> None:
    path = tmp_path / "garbage.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(path)
    assert "refused" not in _one_line(exc)


def test_not_a_dict(tmp_path) -> None:
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(1), 2], path)
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(path)
    assert "list" in _one_line(exc)


def test_missing_path(tmp_path) -> None:
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(tmp_path / "nope.pt")
    msg = _one_line(exc)
    assert "does not exist" in msg and "nope.pt" in msg
    assert isinstance(exc.value, UserError) and exc.value.exit_code == 2


def test_directory_path(tmp_path) -> None:
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(folder)
    assert str(folder) in _one_line(exc)


def test_directory_path_message(tmp_path) -> None:
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(folder)
    msg = _one_line(exc)
    assert "does not exist" not in msg and ("folder" in msg or "directory" in msg)


# --------------------------------------------------------------------------- matching a model


def test_other_architecture_names_keys() -> None:
    r18 = create_model("cifar_resnet18", 10).state_dict()
    r20 = create_model("cifar_resnet20", 10)
    before = {k: v.clone() for k, v in r20.state_dict().items()}
    with pytest.raises(CheckpointError) as exc:
        load_model_state(r20, r18, "checkpoint 'r18.pt'")
    msg = _one_line(exc)
    assert msg.startswith("checkpoint 'r18.pt' does not match the model")
    assert "missing 'layer1.2.conv1.weight'" in msg  # ResNet-20 has 3 blocks a stage, ResNet-18 two
    assert "unexpected 'layer4.0.conv1.weight'" in msg  # ResNet-18 has a 4th stage
    assert "shape of 'conv1.weight' is (64, 3, 3, 3), model has (16, 3, 3, 3)" in msg
    assert "more)" in msg
    after = r20.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "a refused state was partly loaded"


def test_width_mismatch_names_shape(small_model) -> None:
    wide = create_model("cifar_resnet20", 10, width_mult=0.5)
    with pytest.raises(CheckpointError) as exc:
        load_model_state(wide, small_model.state_dict(), "teacher.checkpoint 'x.pt'")
    msg = _one_line(exc)
    assert "shape of 'conv1.weight' is (4, 3, 3, 3), model has (8, 3, 3, 3)" in msg
    assert "missing" not in msg and "unexpected" not in msg


def test_fp_state_into_binary_model(small_model) -> None:
    fp = small_model.state_dict()
    binary = create_model("cifar_resnet20", 10, quant="W1A1", width_mult=0.25)
    from bnn_distill.quant import is_quant_param

    quant_keys = {k for k in binary.state_dict() if is_quant_param(k)}
    assert quant_keys, "a W1A1 model has quantiser parameters"
    with pytest.raises(CheckpointError) as exc:
        load_model_state(binary, fp, "stage 'teacher' weights")
    assert "missing" in _one_line(exc) and "quant" in str(exc.value)

    missing = load_model_state(binary, fp, "stage 'teacher' weights", allow_quant_missing=True)
    assert missing == quant_keys
    own = binary.state_dict()
    for k, v in fp.items():
        assert torch.equal(own[k], v), k
    # and back: a binary state (with extra quantiser keys) into an FP model
    fp_model = create_model("cifar_resnet20", 10, width_mult=0.25)
    assert load_model_state(fp_model, binary.state_dict(), "binary", allow_quant_missing=True) == set()
    with pytest.raises(CheckpointError) as exc:
        load_model_state(fp_model, binary.state_dict(), "binary")
    assert "unexpected" in _one_line(exc)


def test_allow_quant_missing_still_checks_other_keys(small_model) -> None:
    state = dict(small_model.state_dict())
    del state["fc.weight"]
    binary = create_model("cifar_resnet20", 10, quant="W1A1", width_mult=0.25)
    with pytest.raises(CheckpointError) as exc:
        load_model_state(binary, state, "s", allow_quant_missing=True)
    msg = _one_line(exc)
    assert "missing 'fc.weight'" in msg and "quant" not in msg


# --------------------------------------------------------------------------- state_dict_of


def test_state_dict_of() -> None:
    sd = {"a": torch.zeros(1), "b": torch.ones(2)}
    assert state_dict_of({"format": FORMAT, "model": sd, "epoch": 3}) is sd
    assert state_dict_of(sd) is sd
    assert state_dict_of({"state_dict": sd, "epoch": 9}) is sd  # e.g. a Lightning-style file
    assert state_dict_of({"model": sd, "optimizer": {}}) is sd


@pytest.mark.parametrize(
    "obj",
    [
        {},
        {"a": 1},
        {"a": torch.zeros(1), "b": "text"},
        {"model": 3},
        {"state_dict": [torch.zeros(1)]},
        {"format": "other/2", "weights": {"a": torch.zeros(1)}},
    ],
    ids=["empty", "ints", "mixed", "model_int", "state_dict_list", "other_format"],
)
def test_state_dict_of_garbage(obj) -> None:
    with pytest.raises(CheckpointError) as exc:
        state_dict_of(obj)
    assert "neither" in _one_line(exc)


@pytest.mark.parametrize("obj", [{"format": FORMAT}, {"format": FORMAT, "model": 3}], ids=["no_model", "model_int"])
def test_state_dict_of_broken_bnn_checkpoint(obj) -> None:
    with pytest.raises(CheckpointError):
        state_dict_of(obj)


def test_load_keeps_parameter_objects(small_model) -> None:
    """An optimiser built before the load must still own the model's parameters (Brevitas would
    otherwise rebuild its quantisers, and their learned scales, on load_state_dict)."""
    from brevitas import config

    binary = create_model("cifar_resnet20", 10, quant="W1A1", width_mult=0.25)
    before = {name: id(p) for name, p in binary.named_parameters()}
    flag = config.REINIT_ON_STATE_DICT_LOAD
    load_model_state(binary, binary.state_dict(), "own state")
    load_model_state(binary, small_model.state_dict(), "fp state", allow_quant_missing=True)
    assert {name: id(p) for name, p in binary.named_parameters()} == before
    assert config.REINIT_ON_STATE_DICT_LOAD == flag


def test_atomic_files_get_the_usual_permissions(tmp_path) -> None:
    import os
    import stat

    from bnn_distill.checkpoint import atomic_write_bytes

    mask = os.umask(0o022)
    os.umask(mask)
    atomic_write_bytes(tmp_path / "f.json", b"{}")
    assert stat.S_IMODE((tmp_path / "f.json").stat().st_mode) == 0o666 & ~mask

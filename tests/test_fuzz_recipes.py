"""Fuzzed recipes and ``--set`` strings (issue 16): accepted, or one line with exit status 2.

Hypothesis mutates valid recipes (the test recipe and every shipped one): deletes keys, swaps
types, inserts unicode, huge and non-finite numbers, nests values wrongly, adds unknown keys,
duplicates stage and loss names, and damages the YAML text itself. Each case runs
``bnn-distill train RECIPE`` in this process with training replaced by a stub, so a case is
either accepted (the stub is reached) or ends with exit status 2 and exactly one ``error:`` line
on stderr; never a traceback and never a file written (the working folder is compared after
every case). The seed is fixed; the default run tries 1,000+ recipes and 1,000+ ``--set``
strings in seconds, the ``slow`` variant 20,000 of each.
"""

from __future__ import annotations

import contextlib
import copy
import io
from collections import Counter
from pathlib import Path
from typing import Any, List

import pytest
import yaml

hypothesis = pytest.importorskip("hypothesis")
from conftest import tiny_recipe_dict  # noqa: E402
from hypothesis import HealthCheck, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import bnn_distill.train as train_module  # noqa: E402
from bnn_distill.cli import main  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SEED = 16  # issue 16
N_DEFAULT = 1000
N_SLOW = 20000
_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


class _Accepted(Exception):
    """Raised by the training stub: the recipe passed every check."""


# ---------------------------------------------------------------- values the fuzzer inserts

HUGE = st.sampled_from(
    [
        10**30,
        -(10**30),
        2**63,
        2**63 - 1,
        -(2**63),
        2**31,
        2**64 + 1,
        1e308,
        -1e308,
        1e-320,
        5e-324,
        float("inf"),
        float("-inf"),
        float("nan"),
        -0.0,
        0,
        -1,
        1,
        16,
        16.0001,
        0.5,
        1e6,
        100001,
        1000001,
    ]
)
ODD_TEXT = st.sampled_from(
    [
        "",
        " ",
        "W1A1 ",
        " teacher",
        "stage1",
        "ce",
        "teacher",
        "FP",
        "W32A1",
        "itrd_mi",
        "cifar10",
        "synthetic",
        "名前",
        "😀",
        "\u2028",
        "a\nb",
        "x\ry",
        "tab\there",
        "\x00",
        "\x85",
        "null",
        "~",
        "yes",
        "1e5",
        "0x10",
        "../..",
        "/",
        ".",
        "-",
        "stage1\u200b",
        "ｓｔａｇｅ１",
        "\ufeffname",
        "e\u0301",
        "A" * 300,
    ]
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    HUGE,
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    ODD_TEXT,
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.one_of(st.text(max_size=8), ODD_TEXT), inner, max_size=3)
    ),
    max_leaves=6,
)
BROKEN_YAML = st.sampled_from(
    [
        "[",
        "{a: ",
        "]",
        "a: b: c",
        "!!python/object/apply:os.system ['echo pwned']",
        "!!python/name:os.system",
        "&a [*a]",
        "*nowhere",
        "%YAML 1.1",
        "---\n---\nx: 1",
        "- a\n- b",
        "? complex\n: key",
        "\t",
        "'unterminated",
        '"\\xZZ"',
        "{name: [}",
        "!!binary AAAA",
        "!!set {a, b}",
        "<<: *x",
        "@reserved",
        "`tick",
    ]
)


def _bases() -> List[dict]:
    bases = [tiny_recipe_dict(Path("runs"))]
    for path in sorted((REPO / "recipes").glob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        raw["output_dir"] = "runs"
        bases.append(raw)
    return bases


BASES = _bases()


# ---------------------------------------------------------------- mutations


def _paths(node: Any, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, prefix + (i,))


def _get(node: Any, path):
    for k in path:
        node = node[k]
    return node


OPS = (
    "delete",
    "replace",
    "huge",
    "odd_text",
    "wrap_list",
    "wrap_dict",
    "stringify",
    "unicode_in_string",
    "add_key",
    "dup_stage_name",
    "dup_stage",
    "dup_loss",
    "swap_siblings",
)


def _mutate(raw: Any, data) -> Any:
    """One mutation of ``raw`` (returned: the root itself may be replaced)."""
    op = data.draw(st.sampled_from(OPS), label="op")
    if op in ("dup_stage_name", "dup_stage", "dup_loss"):
        stages = raw.get("stages") if isinstance(raw, dict) else None
        if not isinstance(stages, list) or not stages:
            return raw
        i = data.draw(st.integers(0, len(stages) - 1))
        j = data.draw(st.integers(0, len(stages) - 1))
        if op == "dup_stage_name" and isinstance(stages[i], dict) and isinstance(stages[j], dict):
            stages[j]["name"] = stages[i].get("name")
        elif op == "dup_stage":
            stages.insert(j, copy.deepcopy(stages[i]))
        elif (
            op == "dup_loss"
            and isinstance(stages[i], dict)
            and isinstance(stages[i].get("losses"), list)
            and stages[i]["losses"]
        ):
            losses = stages[i]["losses"]
            losses.append(copy.deepcopy(losses[data.draw(st.integers(0, len(losses) - 1))]))
        return raw
    paths = list(_paths(raw))
    path = data.draw(st.sampled_from(paths), label="path")
    node = _get(raw, path)
    if not path:  # the whole recipe
        if op in ("replace", "huge", "odd_text", "stringify"):
            return data.draw({"replace": VALUES, "huge": HUGE, "odd_text": ODD_TEXT}.get(op, VALUES))
        if op == "wrap_list":
            return [raw]
        if op == "add_key" and isinstance(raw, dict):
            raw[data.draw(st.one_of(st.text(max_size=8), ODD_TEXT))] = data.draw(VALUES)
        return raw
    parent, key = _get(raw, path[:-1]), path[-1]
    if op == "delete":
        del parent[key]
    elif op == "replace":
        parent[key] = data.draw(VALUES)
    elif op == "huge":
        parent[key] = data.draw(HUGE)
    elif op == "odd_text":
        parent[key] = data.draw(ODD_TEXT)
    elif op == "wrap_list":
        parent[key] = [node]
    elif op == "wrap_dict":
        parent[key] = {data.draw(st.sampled_from(["name", "x", "epochs", "stages"])): node}
    elif op == "stringify":
        parent[key] = str(node)
    elif op == "unicode_in_string" and isinstance(node, str):
        at = data.draw(st.integers(0, len(node)))
        parent[key] = node[:at] + data.draw(st.one_of(ODD_TEXT, st.text(min_size=1, max_size=3))) + node[at:]
    elif op == "add_key" and isinstance(node, dict):
        node[data.draw(st.one_of(st.text(max_size=8), ODD_TEXT))] = data.draw(VALUES)
    elif op == "swap_siblings" and isinstance(parent, dict) and len(parent) > 1:
        other = data.draw(st.sampled_from([k for k in parent if k != key]))
        parent[key], parent[other] = parent[other], parent[key]
    return raw


def _damage_text(text: str, data) -> str:
    how = data.draw(st.sampled_from(["none", "none", "none", "truncate", "insert", "delete", "append"]), label="text")
    if how == "none" or not text:
        return text
    at = data.draw(st.integers(0, len(text)))
    if how == "truncate":
        return text[:at]
    if how == "insert":
        return text[:at] + data.draw(st.one_of(BROKEN_YAML, st.text(min_size=1, max_size=4))) + text[at:]
    if how == "delete":
        return text[:at] + text[at + data.draw(st.integers(1, 20)) :]
    return text + "\n" + data.draw(BROKEN_YAML)


# ---------------------------------------------------------------- the property


def _files(root: Path) -> List[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _check_case(argv: List[str], work: Path, stats: Counter) -> None:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except _Accepted:
            code = None
    assert _files(work) == [], f"a file was written: {_files(work)} for {argv}"
    if code is None:
        stats["accepted"] += 1
        assert err.getvalue() == "", err.getvalue()
        return
    stats["rejected"] += 1
    text = err.getvalue()
    lines = text.splitlines()
    assert code == 2, (code, text)
    assert len(lines) == 1 and text.endswith("\n"), f"not one line: {text!r}"
    assert lines[0].startswith("error: ") and len(lines[0]) > len("error: "), text
    assert "Traceback" not in text and out.getvalue() == ""


@pytest.fixture
def stubbed(tmp_path, monkeypatch):
    """Training replaced by a stub; the working folder is an empty folder watched for writes."""

    def stub(recipe, **kwargs):
        raise _Accepted(recipe.name)

    monkeypatch.setattr(train_module, "run_recipe", stub)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.delenv("RANK", raising=False)
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    return work, recipes


def _run_recipe_fuzz(stubbed, n: int) -> Counter:
    work, recipes = stubbed
    stats: Counter = Counter()
    path = recipes / "fuzzed.yaml"

    @seed(SEED)
    @settings(max_examples=n, deadline=None, database=None, derandomize=False, suppress_health_check=list(HealthCheck))
    @given(st.data())
    def case(data):
        raw = copy.deepcopy(data.draw(st.sampled_from(BASES), label="base"))
        for _ in range(data.draw(st.integers(1, 4), label="mutations")):
            raw = _mutate(raw, data)
        if isinstance(raw, dict) and raw.get("output_dir") != "runs" and isinstance(raw.get("output_dir"), str):
            raw["output_dir"] = "runs"  # a fuzzed string path could point anywhere on this machine
        text = _damage_text(yaml.dump(raw, Dumper=_DUMPER, allow_unicode=True, sort_keys=False), data)
        if data.draw(st.integers(0, 40), label="encoding") == 0:
            path.write_bytes(text.encode("utf-8") + b"\xff\xfe\x80 not utf-8")
        else:
            path.write_text(text, encoding="utf-8")
        stats["cases"] += 1
        _check_case(["train", str(path)], work, stats)

    case()
    return stats


def _run_set_fuzz(stubbed, n: int) -> Counter:
    work, recipes = stubbed
    stats: Counter = Counter()
    path = recipes / "tiny.yaml"
    base = tiny_recipe_dict(Path("runs"))
    path.write_text(yaml.safe_dump(base))
    real_keys = sorted(
        {".".join(str(k) for k in p) for p in _paths(base) if p}
        | {
            "stages.teacher.epochs",
            "stages.stage1.losses.itrd_corr.weight",
            "stages.stage2.quant",
            "stages.-1.epochs",
            "stages.3.epochs",
            "stages.nope.epochs",
            "data.limit_train",
            "name",
            "output_dir.x",
            "seed.x",
            "stages.stage1.losses.0.name.x",
        }
    )
    key_part = st.one_of(st.text(max_size=6), ODD_TEXT, st.sampled_from(["", "0", "-1", "99", "stages", "name"]))
    keys = st.one_of(
        st.sampled_from(real_keys),
        st.lists(key_part, min_size=1, max_size=4).map(".".join),
        st.sampled_from(real_keys).flatmap(lambda k: key_part.map(lambda p: f"{k}.{p}")),
    )
    values = st.one_of(
        VALUES.map(
            lambda v: (
                yaml.dump(v, Dumper=_DUMPER, default_flow_style=True, allow_unicode=True)
                .removesuffix("\n...\n")
                .strip()
            )
        ),
        st.text(max_size=12),
        BROKEN_YAML,
        ODD_TEXT,
        HUGE.map(str),
    )
    item = st.one_of(
        st.tuples(keys, values).map(lambda kv: f"{kv[0]}={kv[1]}"),
        keys,
        st.tuples(keys, st.sampled_from(["==", "= ", " =", "=="])).map("".join),
    )

    @seed(SEED)
    @settings(max_examples=n, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(item, min_size=1, max_size=3))
    def case(items):
        items = [s.replace("\x00", "") for s in items]  # a command line cannot carry NUL
        stats["cases"] += 1
        argv = ["train", str(path)]
        for s in items:
            if s in ("output_dir",) or s.startswith("output_dir="):
                s = "output_dir=runs"  # a fuzzed output folder could point anywhere on this machine
            argv.append(f"--set={s}")
        _check_case(argv, work, stats)

    case()
    return stats


def test_the_base_recipes_are_accepted(stubbed):
    work, recipes = stubbed
    stats: Counter = Counter()
    for i, raw in enumerate(BASES):
        p = recipes / f"b{i}.yaml"
        p.write_text(yaml.safe_dump(raw))
        _check_case(["train", str(p)], work, stats)
    assert stats["accepted"] == len(BASES) >= 2


def test_the_checker_can_fail(stubbed):
    """A multi-line error or a written file is caught (the property is not vacuous)."""
    work, recipes = stubbed
    with pytest.raises(AssertionError, match="not one line"):
        p = recipes / "x.yaml"
        p.write_text("name: [")
        from bnn_distill import cli

        real = cli.one_line
        cli.one_line = lambda s: s + "\nsecond line"
        try:
            _check_case(["train", str(p)], work, Counter())
        finally:
            cli.one_line = real
    (work / "stray").write_text("x")
    with pytest.raises(AssertionError, match="a file was written"):
        _check_case(["train", str(recipes / "x.yaml")], work, Counter())


@pytest.mark.parametrize("where", ["optimizer.lr", "losses.itrd_corr.alpha"])
def test_an_integer_beyond_float_range_is_one_line(stubbed, where):
    """10**400 where a number goes (a recipe can hold it: YAML integers are unbounded)."""
    work, recipes = stubbed
    raw = tiny_recipe_dict(Path("runs"))
    if where == "optimizer.lr":
        raw["stages"][1]["optimizer"]["lr"] = 10**400
    else:
        raw["stages"][1]["losses"][1]["alpha"] = 10**400
    p = recipes / "big.yaml"
    p.write_text(yaml.safe_dump(raw))
    _check_case(["train", str(p)], work, Counter())


def test_fuzzed_recipes(stubbed):
    stats = _run_recipe_fuzz(stubbed, N_DEFAULT)
    assert stats["cases"] >= N_DEFAULT and stats["accepted"] + stats["rejected"] == stats["cases"]
    assert stats["accepted"] > 0 and stats["rejected"] > 0, stats


def test_fuzzed_set_strings(stubbed):
    stats = _run_set_fuzz(stubbed, N_DEFAULT)
    assert stats["cases"] >= N_DEFAULT and stats["accepted"] + stats["rejected"] == stats["cases"]
    assert stats["accepted"] > 0 and stats["rejected"] > 0, stats


@pytest.mark.slow
def test_fuzzed_recipes_many(stubbed):
    stats = _run_recipe_fuzz(stubbed, N_SLOW)
    assert stats["cases"] >= N_SLOW and stats["accepted"] > 0


@pytest.mark.slow
def test_fuzzed_set_strings_many(stubbed):
    stats = _run_set_fuzz(stubbed, N_SLOW)
    assert stats["cases"] >= N_SLOW and stats["accepted"] > 0

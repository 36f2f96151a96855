"""``--set KEY.PATH=VALUE`` overrides of a recipe: parsed as YAML scalars and applied to the raw
mapping before validation (re-exported by :mod:`bnn_distill.recipe`)."""

from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

import yaml

from .errors import RecipeError, choices, closest


def parse_overrides(items: Sequence[str]) -> List[Tuple[str, Any]]:
    """``["a.b=1", "stages.s1.epochs=2"]`` -> ``[("a.b", 1), ...]``; values parsed as YAML scalars."""
    out = []
    for item in items:
        if "=" not in item:
            raise RecipeError(f"--set {item}: expected KEY.PATH=VALUE, e.g. stages.stage1.epochs=2")
        key, text = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise RecipeError(
                f"--set {item}: '{key}' is not a key path; expected KEY.PATH=VALUE, e.g. stages.stage1.epochs=2"
            )
        try:
            val = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as e:
            raise RecipeError(f"--set {item}: value is not valid YAML ({_yaml_problem(e)})") from None
        out.append((key, val))
    return out


def apply_override(raw: Dict[str, Any], key: str, value: Any) -> None:
    """Set ``key`` (dotted; list items by index or by their ``name``) in the raw recipe mapping."""
    parts = key.split(".")
    node: Any = raw
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        where = ".".join(parts[: i + 1])
        if isinstance(node, list):
            idx = _list_index(node, part, where)
            if last:
                node[idx] = value
            else:
                node = node[idx]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                if part not in node or node[part] is None:
                    node[part] = {}
                node = node[part]
        else:
            raise RecipeError(f"--set {key}: '{'.'.join(parts[:i])}' is not a mapping or list, cannot set '{part}'")


def _list_index(node: List[Any], part: str, where: str) -> int:
    if part.lstrip("-").isdigit():
        idx = int(part)
        if not -len(node) <= idx < len(node):
            raise RecipeError(f"--set {where}: index {idx} out of range; the list has {len(node)} items")
        return idx
    names = [n.get("name") for n in node if isinstance(n, dict)]
    if part in names:
        return names.index(part)
    named = [n for n in names if n]
    raise RecipeError(
        f"--set {where}: no item named '{part}'{closest(part, named)}; "
        f"valid: a name ({choices(named)}) or an index 0..{len(node) - 1}"
    )


def _yaml_problem(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    if mark is not None:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    return problem

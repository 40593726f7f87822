"""A sweep's TOML file: fixed settings, axes (crossed) and cases (zipped), expanded into cells.

Every cell is one ordinary run (a PruneConfig, or a target search) with a stable, readable,
filesystem-safe directory name. All of it is checked before anything runs: unknown keys, bad
values and every cell's PruneConfig.check(), each error naming the key and the fix.
"""
from __future__ import annotations

import difflib
import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

from ..config import PruneConfig

SPEC_SCHEMA = "circuitsearch.sweep-spec/1"
TOP_KEYS = ("fixed", "axes", "cases")
CONFIG_KEYS = tuple(f.name for f in fields(PruneConfig))
EXTRA_KEYS = ("target", "patience", "curves")  # settings of a cell that are not PruneConfig fields
SETTING_KEYS = CONFIG_KEYS + EXTRA_KEYS
THRESHOLD_KEYS = ("absolute", "relative")
INT_KEYS = ("max_passes", "n_prompts", "seed", "template", "steps", "patience", "mask_steps")
FLOAT_KEYS = ("mask_lr", "mask_margin")
BOOL_KEYS = ("qkv", "split_embed", "curves")
TARGET_ORDER = "target"  # order = "target": a target search (run_targets) instead of iterative pruning
NAME_LIMIT = 150         # longer cell names are cut and end in a hash of the settings


class SpecError(ValueError):
    """The sweep file cannot be run as written; the message names the key and the fix."""


@dataclass(frozen=True)
class Cell:
    """One run of a sweep: its directory name and settings (PruneConfig fields plus target, patience, curves)."""

    name: str
    settings: dict
    dir: str = ""        # its run directory relative to the sweep's; default cells/<name>
    task_file: str = ""  # a task.json (relative to the sweep's directory) every such cell starts from
    derived: bool = False  # settings taken whole from another run's (compare-orders), not written by a user

    @property
    def kind(self) -> str:
        """'target' for a target search (run_targets), 'evaluate' for a column of a cross-task matrix
        (sweeps.crosstask.run_column), else 'prune' (run_prune)."""
        if "evaluate" in self.settings:
            return "evaluate"
        return "target" if self.settings.get("order") == TARGET_ORDER else "prune"

    @property
    def targets(self) -> list[float]:
        """A target cell's targets: `target` if given, else the absolute threshold."""
        from ..algorithms.target import parse_targets

        t = self.settings.get("target")
        if t is None:
            t = [self.settings.get("absolute")]
        return parse_targets(t if isinstance(t, list) else [t])

    def config(self) -> PruneConfig:
        """The run's PruneConfig, its keys as given by the sweep file (unless derived; a target cell's order
        "target" is not an order of iterative pruning: run_targets records order gain)."""
        cfg = {k: v for k, v in self.settings.items() if k in CONFIG_KEYS}
        if self.kind == "target":
            del cfg["order"]
        return PruneConfig(**cfg, given=frozenset() if self.derived else frozenset(cfg))


@dataclass
class SweepSpec:
    """A parsed sweep file: what it fixes, crosses and zips, and the cells that come out."""

    fixed: dict
    axes: dict
    cases: list
    cells: list = field(default_factory=list)
    source: str = "<spec>"

    def to_json(self) -> dict:
        return {"schema": SPEC_SCHEMA, "source": self.source, "fixed": self.fixed, "axes": self.axes,
                "cases": self.cases, "cells": [c.name for c in self.cells]}


def _suggest(key: str, choices) -> str:
    close = difflib.get_close_matches(key, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_keys(where: str, table: dict, allowed) -> None:
    for key in table:
        if key not in allowed:
            raise SpecError(f"{where}: unknown key {key!r}{_suggest(key, allowed)}; allowed keys: "
                            f"{', '.join(allowed)}")


def _value(where: str, key: str, value):
    """One setting's value, normalised (thresholds 'off' -> None, ints checked); SpecError names it."""
    if key in THRESHOLD_KEYS:
        if isinstance(value, str) and value.lower() in ("off", "none"):
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SpecError(f"{where}: {key} = {value!r} must be a number in [0, 1] or \"off\"")
        return float(value)
    if key in INT_KEYS:
        if key == "template" and value == "all":
            return value
        if isinstance(value, bool) or not isinstance(value, int):
            raise SpecError(f"{where}: {key} = {value!r} must be a whole number")
        return value
    if key in FLOAT_KEYS:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SpecError(f"{where}: {key} = {value!r} must be a number")
        return float(value)
    if key in BOOL_KEYS:
        if not isinstance(value, bool):
            raise SpecError(f"{where}: {key} = {value!r} must be true or false")
        return value
    if key == "sae":  # dictionaries spliced in: one path, or a list of them (in axes: a list of such lists)
        items = value if isinstance(value, list) else [value]
        if not all(isinstance(v, str) and v for v in items):
            raise SpecError(f"{where}: sae = {value!r} must be a dictionary path or a list of them")
        return list(items)
    if key == "target":
        items = value if isinstance(value, list) else [value]
        if not items or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in items):
            raise SpecError(f"{where}: target = {value!r} must be a number in (0, 1] or a list of them "
                            "(nested targets in one cell)")
        return [float(v) for v in items] if isinstance(value, list) else float(value)
    if not isinstance(value, str):
        raise SpecError(f"{where}: {key} = {value!r} must be a string")
    return value


def _safe(text: str) -> str:
    """A filesystem-safe piece of a directory name: test:planted -> test-planted, file:a/b.txt -> file-b."""
    if text.startswith("file:"):
        text = "file-" + Path(text.split(":", 1)[1]).stem
    elif text.endswith(".jsonl"):
        text = Path(text).stem
    return re.sub(r"[^A-Za-z0-9._+-]", "-", text)


def _show(value) -> str:
    if value is None:
        return "off"
    if isinstance(value, list):
        return "+".join(_show(v) for v in value)
    if isinstance(value, bool):
        return str(value).lower()
    return _safe(str(value))


def cell_name(settings: dict, named: list[str]) -> str:
    """`task=digits,order=reverse,absolute=0.8`: the named keys (axes and case keys) in spec order.
    Stable for the same file; too long a name is cut and ends in a hash of the settings."""
    name = ",".join(f"{k}={_show(settings.get(k))}" for k in named) or "default"
    if len(name) > NAME_LIMIT:
        digest = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
        name = f"{name[:NAME_LIMIT - 11]}~{digest}"
    return name


def expand(fixed: dict, axes: dict, cases: list[dict]) -> list[Cell]:
    """Cells = cases (zipped bundles) x the product of the axes, over the fixed settings."""
    case_keys = list(dict.fromkeys(k for c in cases for k in c))
    named = case_keys + [k for k in axes if k not in case_keys]
    cells = []
    for case in cases or [{}]:
        for combo in itertools.product(*axes.values()):
            settings = {**fixed, **case, **dict(zip(axes, combo))}
            cells.append(Cell(cell_name(settings, named), settings))
    seen: dict[str, Cell] = {}
    for c in cells:
        if c.name in seen:
            raise SpecError(f"two cells get the same directory name {c.name!r} ({seen[c.name].settings} and "
                            f"{c.settings}): give them values that differ in more than punctuation")
        seen[c.name] = c
    return cells


def check_cell(cell: Cell) -> None:
    """Every setting of one cell, before anything runs (PruneConfig.check, targets, patience)."""
    from ..algorithms.target import parse_targets

    s = cell.settings
    try:
        if s.get("target") is not None and s.get("order") != TARGET_ORDER:
            raise SpecError(f"target = {s['target']!r} is set but order is {cell.config().to_json()['order']!r}: a "
                            f"target search is order = \"{TARGET_ORDER}\" (put it in the order axis)")
        if cell.kind == "target":
            if s.get("target") is None and s.get("absolute") is None:
                raise SpecError("order = \"target\" searches to the absolute threshold, which is off: set absolute "
                                "or target")
            parse_targets(cell.targets)
            from ..runs.commands import check_target_config
            check_target_config(cell.config())
        if s.get("patience") is not None and s["patience"] < 1:
            raise SpecError(f"patience = {s['patience']} must be at least 1")
        cell.config().check()
    except (ValueError, OSError) as e:
        raise SpecError(f"cell {cell.name}: {e}") from None


def parse_spec(data: dict, source: str = "<spec>") -> SweepSpec:
    """A SweepSpec from the TOML document `data`; SpecError for anything that cannot run."""
    _check_keys(source, data, TOP_KEYS)
    fixed = data.get("fixed", {})
    axes = data.get("axes", {})
    cases = data.get("cases", [])
    if not isinstance(fixed, dict):
        raise SpecError(f"{source}: fixed must be a table ([fixed] with key = value lines)")
    if not isinstance(axes, dict):
        raise SpecError(f"{source}: axes must be a table ([axes] with key = [values] lines)")
    if not isinstance(cases, list) or not all(isinstance(c, dict) for c in cases):
        raise SpecError(f"{source}: cases must be an array of tables ([[cases]] blocks of key = value lines)")
    _check_keys(f"{source} [fixed]", fixed, SETTING_KEYS)
    _check_keys(f"{source} [axes]", axes, SETTING_KEYS)
    fixed = {k: _value(f"{source} [fixed]", k, v) for k, v in fixed.items()}
    clean_axes = {}
    for k, values in axes.items():
        if not isinstance(values, list) or not values:
            raise SpecError(f"{source} [axes]: {k} = {values!r} must be a non-empty list of values, e.g. "
                            f"{k} = [{json.dumps(PruneConfig().to_json().get(k, 0.8))}]; a single value goes "
                            "in [fixed]")
        vals = [_value(f"{source} [axes]", k, v) for v in values]
        if len({json.dumps(v) for v in vals}) < len(vals):
            raise SpecError(f"{source} [axes]: {k} lists a value twice ({values!r})")
        clean_axes[k] = vals
    clean_cases = []
    for i, case in enumerate(cases):
        where = f"{source} [[cases]] #{i + 1}"
        _check_keys(where, case, SETTING_KEYS)
        if not case:
            raise SpecError(f"{where} is empty: give each case the settings it bundles (e.g. model and task)")
        clean_cases.append({k: _value(where, k, v) for k, v in case.items()})
    for where, keys in (("[axes]", clean_axes), ("[[cases]]", {k for c in clean_cases for k in c})):
        both = sorted(set(fixed) & set(keys))
        if both:
            raise SpecError(f"{source}: {', '.join(both)} is both in [fixed] and in {where}: keep it in one place")
    both = sorted(set(clean_axes) & {k for c in clean_cases for k in c})
    if both:
        raise SpecError(f"{source}: {', '.join(both)} is both an axis and a case key: keep it in one place")
    spec = SweepSpec(fixed, clean_axes, clean_cases, source=source)
    spec.cells = expand(fixed, clean_axes, clean_cases)
    for cell in spec.cells:
        check_cell(cell)
    return spec


def _toml():
    try:
        import tomllib
    except ImportError:  # Python 3.10: the same parser as a package
        try:
            import tomli as tomllib
        except ImportError:
            raise SpecError("reading sweep files needs Python 3.11+ (tomllib) or, on 3.10, pip install tomli") from None
    return tomllib


def load_spec(path: str | Path) -> SweepSpec:
    """Read and check a sweep TOML file (see parse_spec)."""
    tomllib = _toml()
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise SpecError(f"sweep file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"{path} is not valid TOML: {e}") from None
    return parse_spec(data, str(path))

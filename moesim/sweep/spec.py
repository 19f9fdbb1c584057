"""Sweep files: a base scenario and the axes to vary, expanded into points with stable ids.

A sweep YAML has

    name: whatif                       # default: the file's stem
    base: quickstart.yaml              # a scenario file (relative to this file) or an inline mapping
    grid:                              # full product, in the order given (last key varies fastest)
      cache.gpu.capacity_gb: [1, 2, 4]
      predictor.name: [on_demand, oracle]
    zip:                               # equal-length lists, varied together (one axis)
      batch.size: [1, 4, 16]
      trace.synthetic.requests: [4, 8, 32]
    repeats: 3                         # seeds base.seed + 0, 1, 2 for every point
    events: false                      # also write events.parquet for every point
    output: reports/whatif             # default output dir, relative to the working directory (-o wins)

Keys are dotted scenario paths, exactly as `moesim run --set` takes them. A point's id is a short
hash of its overrides (canonical JSON, sorted keys), so it does not depend on the order of the
axes, and a rerun of the same sweep recognises the points it already has.
"""
from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..config import apply_overrides, read_yaml
from ..errors import InputError

SWEEP_KEYS = ("name", "base", "grid", "zip", "repeats", "events", "output")
_PATH = re.compile(r"[A-Za-z_][\w-]*(\.[\w-]+)*")
ID_LEN = 10


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=True, default=str)


def point_id(overrides: dict[str, Any]) -> str:
    """Stable short id of a point: the first hex digits of sha256 of its overrides."""
    return hashlib.sha256(canonical_json(overrides).encode()).hexdigest()[:ID_LEN]


def override_strings(overrides: dict[str, Any]) -> list[str]:
    """`path=value` strings for `config.apply_overrides`; values are YAML-dumped so they load back
    as exactly the same value (a string stays a string, 1e-05 stays a float)."""
    return [f"{k}={yaml.safe_dump(v, default_flow_style=True, width=math.inf)}" for k, v in overrides.items()]


def format_value(v: Any) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, (dict, list)):
        return json.dumps(v, separators=(",", ":"))
    return str(v)


@dataclass(frozen=True)
class Point:
    """One scenario of a sweep: the base plus `overrides` (dotted path → value)."""

    id: str
    index: int
    overrides: dict[str, Any]
    repeat: int | None = None

    @property
    def label(self) -> str:
        return ", ".join(f"{k}={format_value(v)}" for k, v in self.overrides.items()) or "(base)"


@dataclass
class SweepSpec:
    name: str
    base: dict
    base_dir: str
    file: str | None = None          # the sweep file (for messages)
    base_file: str | None = None     # the base scenario's file (for messages about it)
    grid: dict[str, list] = field(default_factory=dict)
    zip: dict[str, list] = field(default_factory=dict)
    repeats: int | None = None
    events: bool = False
    output: str | None = None

    @property
    def axes(self) -> list[str]:
        """The varied paths, grid first then zip (plus `seed` with repeats)."""
        out = list(self.grid) + list(self.zip)
        if self.repeats and "seed" not in out:
            out.append("seed")
        return out

    @property
    def scenario_file(self) -> str | None:
        return self.base_file or self.file

    def points(self) -> list[Point]:
        return expand(self)

    def scenario_hash(self, point: Point) -> str:
        """Hash of everything that defines the point's scenario (base + overrides): a done point
        whose base has changed since is run again."""
        return hashlib.sha256(canonical_json({"base": self.base, "overrides": point.overrides},
                                             ).encode()).hexdigest()[:16]

    def echo(self) -> dict:
        """What sweep.json records: enough for reports and for `moesim report` to rebuild tables."""
        return {"name": self.name, "file": self.file, "base_file": self.base_file, "axes": self.axes,
                "grid": self.grid, "zip": self.zip, "repeats": self.repeats, "events": self.events,
                "base": self.base,
                "points": [{"id": p.id, "index": p.index, "overrides": p.overrides, "repeat": p.repeat,
                            "label": p.label} for p in self.points()]}


def expand(spec: SweepSpec) -> list[Point]:
    """All points, deterministically: grid product (last key fastest) × zip rows × repeats."""
    grid_keys = list(spec.grid)
    grid_rows = list(itertools.product(*(spec.grid[k] for k in grid_keys))) if grid_keys else [()]
    zip_keys = list(spec.zip)
    n_zip = len(next(iter(spec.zip.values()))) if zip_keys else 1
    zip_rows = [tuple(spec.zip[k][i] for k in zip_keys) for i in range(n_zip)] if zip_keys else [()]
    reps = list(range(spec.repeats)) if spec.repeats else [None]
    points: list[Point] = []
    seen: dict[str, Point] = {}
    for g in grid_rows:
        for z in zip_rows:
            for r in reps:
                ov = dict(zip(grid_keys, g))
                ov.update(zip(zip_keys, z))
                if r is not None:
                    seed0 = ov.get("seed", spec.base.get("seed", 0))
                    ov.pop("seed", None)
                    ov["seed"] = int(seed0) + r
                ov = copy.deepcopy(ov)
                p = Point(point_id(ov), len(points), ov, r)
                if p.id in seen:
                    raise InputError(f"points {seen[p.id].index} and {p.index} are identical ({p.label})",
                                     file=spec.file, field="grid" if grid_keys else "zip")
                seen[p.id] = p
                points.append(p)
    return points


# ---- loading ------------------------------------------------------------------------------------

def _check_path(key: Any, file: str | None, section: str) -> str:
    if not isinstance(key, str) or not _PATH.fullmatch(key):
        raise InputError(f"expected a dotted scenario path like cache.gpu.capacity_gb, got {key!r}",
                         file=file, field=f"{section}.{key}")
    return key


def _check_values(values: Any, file: str | None, where: str) -> list:
    if not isinstance(values, list):
        raise InputError(f"expected a list of values, got {type(values).__name__} {values!r}", file=file, field=where)
    if not values:
        raise InputError("expected at least one value, got an empty list", file=file, field=where)
    for v in values:
        try:
            json.dumps(v, allow_nan=False)
        except (TypeError, ValueError):
            raise InputError(f"value {v!r} is not a plain YAML scalar, list or mapping", file=file,
                             field=where) from None
    seen = set()
    for v in values:
        c = canonical_json(v)
        if c in seen:
            raise InputError(f"duplicate value {format_value(v)!r}", file=file, field=where)
        seen.add(c)
    return values


def sweep_from_dict(data: Any, *, file: str | None = None, base_dir: Path | str = ".",
                    overrides: list[str] | tuple[str, ...] = (), default_name: str = "sweep") -> SweepSpec:
    """Validate a sweep mapping. `overrides` (`path=value`) are applied to the base."""
    if not isinstance(data, dict):
        raise InputError(f"expected a mapping at top level, got {type(data).__name__}", file=file)
    unknown = [k for k in data if k not in SWEEP_KEYS]
    if unknown:
        raise InputError(f"unknown key (expected one of: {', '.join(SWEEP_KEYS)})", file=file, field=str(unknown[0]))
    here = Path(base_dir)
    name = data.get("name", default_name)
    if not isinstance(name, str) or not name:
        raise InputError(f"expected a non-empty string, got {name!r}", file=file, field="name")

    if "base" not in data:
        raise InputError("missing required key (a scenario mapping or the path of a scenario file)",
                         file=file, field="base")
    raw = data["base"]
    base_file = None
    if isinstance(raw, str):
        p = Path(raw)
        if not p.is_absolute():
            p = here / p
        if not p.is_file():
            raise InputError(f"base scenario file not found: {p}", file=file, field="base")
        base = read_yaml(p)
        base_file = str(p)
        if not isinstance(base, dict):
            raise InputError(f"expected a mapping at top level, got {type(base).__name__}", file=base_file)
        base.setdefault("name", p.stem)
        scen_dir = p.parent
    elif isinstance(raw, dict):
        base = copy.deepcopy(raw)
        base.setdefault("name", name)
        scen_dir = here
    else:
        raise InputError(f"expected a scenario mapping or a file path, got {type(raw).__name__}",
                         file=file, field="base")
    base = apply_overrides(base, list(overrides), base_file or file)
    seed = base.get("seed", 0)

    grid = data.get("grid") or {}
    zp = data.get("zip") or {}
    for sec, m in (("grid", grid), ("zip", zp)):
        if not isinstance(m, dict):
            raise InputError(f"expected a mapping of scenario path → list of values, got {type(m).__name__}",
                             file=file, field=sec)
        for k, v in m.items():
            _check_path(k, file, sec)
            _check_values(v, file, f"{sec}.{k}")
    both = set(grid) & set(zp)
    if both:
        k = sorted(both)[0]
        raise InputError("a path may be in grid or in zip, not in both", file=file, field=f"zip.{k}")
    lens = {k: len(v) for k, v in zp.items()}
    if len(set(lens.values())) > 1:
        raise InputError("zip lists must have equal lengths, got " + ", ".join(f"{k}: {n}" for k, n in lens.items()),
                         file=file, field="zip")

    repeats = data.get("repeats")
    if repeats is not None:
        if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
            raise InputError(f"expected a whole number ≥ 1 of seeds, got {repeats!r}", file=file, field="repeats")
        seeds = [v for v in grid.get("seed", zp.get("seed", [seed]))]
        for s in seeds:
            if isinstance(s, bool) or not isinstance(s, int):
                raise InputError(f"repeats adds to the seed, which must be an integer (got {s!r})",
                                 file=file, field="seed")
    events = data.get("events", False)
    if not isinstance(events, bool):
        raise InputError(f"expected true or false, got {events!r}", file=file, field="events")
    output = data.get("output")
    if output is not None and not isinstance(output, str):
        raise InputError(f"expected a directory path, got {output!r}", file=file, field="output")

    spec = SweepSpec(name=name, base=base, base_dir=str(scen_dir), file=file, base_file=base_file,
                     grid=grid, zip=zp, repeats=repeats, events=events, output=output)
    expand(spec)  # duplicate points are a bad sweep file
    return spec


def load_sweep(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> SweepSpec:
    """Read and check a sweep YAML file (InputError naming the field if it is bad)."""
    p = Path(path)
    data = read_yaml(p)
    return sweep_from_dict(data, file=str(p), base_dir=p.parent, overrides=overrides, default_name=p.stem)

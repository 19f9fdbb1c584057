"""`moesim calibrate`: fit a runtime's free costs to measured operating points (issue 15).

A POINTS file lists scenarios (with dotted overrides) and what was measured on them (`tpot_ms` or
`tokens_per_s`, or a `moesim replay --real` output directory). The free runtime fields are fitted
with scipy's bounded least squares on relative errors; each residual evaluation simulates every
fitted point, and results are cached by parameter vector. Every point also gets a leave-one-group-
out error (refit without its group); `holdout: true` points never enter a fit and are reported last.
A point's own `runtime:` is replaced by the runtime being fitted.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .config import Scenario, read_yaml, scenario_from_dict, set_fields
from .errors import InputError, pydantic_message
from .hardware.profile import HardwareProfile
from .hardware.runtime import RuntimeCosts, load_runtime

FITTABLE = ("step_host_us", "layer_host_us", "readback_us", "expert_dispatch_us", "lm_head_ms",
            "expert_efficiency", "attention_efficiency", "lm_head_efficiency")
# Hardware fields a fit may set as well, when the profile's own measurement of them is not what the
# runs saw (a disk whose speed drifts between the profile and the runs: benchmarks/gpu/README.md).
# They are fitted for one machine: every point must use the same hardware profile.
FITTABLE_HARDWARE = ("hardware.disk.read_bandwidth_gbps", "hardware.disk.latency_us",
                     "hardware.pcie_h2d.bandwidth_gbps", "hardware.pcie_h2d.latency_us")


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class PointSpec(_Strict):
    """One measured operating point."""

    name: str
    scenario: str | None = Field(None, description="scenario YAML, relative to the POINTS file")
    set: dict[str, Any] = Field(default_factory=dict, description="dotted overrides of the scenario")
    tokens_per_s: float | None = Field(None, gt=0, description="measured throughput (see `throughput`)")
    throughput: Literal["decode", "end_to_end"] = Field(
        "decode", description="what tokens_per_s means: decode = batch.size x 1000 / mean TPOT (the decode rate "
                              "papers report); end_to_end = output tokens / makespan, prefill included")
    tpot_ms: float | None = Field(None, gt=0, description="measured time per output token")
    real: str | None = Field(None, description="a `moesim replay --real` output directory (its summary.json "
                                               "gives the measurement and, without `scenario`, the scenario)")
    source: str = Field("", description="where the measurement comes from")
    group: str | None = Field(None, description="points of one group are left out together (default: the name)")
    holdout: bool = Field(False, description="never used in the fit; reported last")

    @model_validator(mode="after")
    def _one_measurement(self):
        if self.real is None:
            if self.scenario is None:
                raise ValueError("give scenario (with tokens_per_s or tpot_ms) or real")
            if (self.tokens_per_s is None) == (self.tpot_ms is None):
                raise ValueError("give exactly one of tokens_per_s or tpot_ms")
        elif self.tokens_per_s is not None or self.tpot_ms is not None:
            raise ValueError("a real point takes its measurement from the replay's summary.json")
        return self


class PointsFile(_Strict):
    name: str
    description: str = ""
    base_runtime: Any = Field("none", description="runtime preset, path or mapping the fit starts from")
    free: dict[str, tuple[float, float]] = Field(description="runtime fields (and hardware.disk/pcie_h2d "
                                                             "speeds) to fit, with bounds [lo, hi]")
    points: list[PointSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _check(self):
        if not self.free:
            raise ValueError("free: name at least one runtime field to fit")
        for k, (lo, hi) in self.free.items():
            if k not in FITTABLE + FITTABLE_HARDWARE:
                raise ValueError(f"free.{k}: not a fittable field (fittable: {', '.join(FITTABLE + FITTABLE_HARDWARE)})")
            if not lo < hi:
                raise ValueError(f"free.{k}: bounds must have lo < hi, got [{lo}, {hi}]")
        if len({p.name for p in self.points}) != len(self.points):
            raise ValueError("points: names must be unique")
        if not any(not p.holdout for p in self.points):
            raise ValueError("points: every point is held out, nothing to fit")
        return self


@dataclass
class Point:
    """A loaded point: the scenario to simulate and what was measured on it."""

    spec: PointSpec
    scenario: Scenario
    metric: str            # "tpot_ms" | "tokens_per_s"
    measured: float

    @property
    def group(self) -> str:
        return self.spec.group or self.spec.name


def _real_measurement(d: Path, file: str) -> tuple[dict, str, float]:
    path = d / "summary.json"
    if not path.is_file():
        raise InputError(f"no summary.json in {d} (expected a `moesim replay --real` output)", file=file,
                         field="real")
    s = json.loads(path.read_text())
    tpot = (s.get("tpot_ms") or {}).get("mean")
    if tpot:
        return s, "tpot_ms", float(tpot)
    if s.get("tokens_per_s"):
        return s, "tokens_per_s", float(s["tokens_per_s"])
    raise InputError("summary.json has neither tpot_ms.mean nor tokens_per_s", file=str(path))


def load_point(spec: PointSpec, base: Path, file: str) -> Point:
    if spec.real is not None:
        rdir = base / spec.real
        summary, metric, value = _real_measurement(rdir, file)
        if spec.scenario is None and (rdir / "scenario.yaml").is_file():  # written by replay --real
            sfile, sbase = str(rdir / "scenario.yaml"), rdir
            data = read_yaml(sfile)
        elif spec.scenario is None:
            data, sfile, sbase = dict(summary["scenario"]), str(rdir / "summary.json"), rdir
        else:
            sfile, sbase = str(base / spec.scenario), (base / spec.scenario).parent
            data = read_yaml(sfile)
    else:
        sfile = str(base / spec.scenario)
        sbase, data = (base / spec.scenario).parent, read_yaml(sfile)
        metric = "tpot_ms" if spec.tpot_ms is not None else "tokens_per_s"
        value = spec.tpot_ms if spec.tpot_ms is not None else spec.tokens_per_s
    if not isinstance(data, dict):
        raise InputError("expected a scenario mapping", file=sfile)
    data = set_fields(data, spec.set, sfile)
    data.setdefault("name", spec.name)
    return Point(spec, scenario_from_dict(data, file=sfile, base_dir=sbase), metric, float(value))


def load_points(path: str | Path) -> tuple[PointsFile, list[Point]]:
    p = Path(path)
    raw = read_yaml(p)
    if not isinstance(raw, dict):
        raise InputError(f"expected a mapping at top level, got {type(raw).__name__}", file=str(p))
    try:
        pf = PointsFile(**raw)
    except ValidationError as e:
        raise pydantic_message(e, file=str(p)) from None
    return pf, [load_point(s, p.parent, str(p)) for s in pf.points]


@dataclass
class Calibration:
    """The fitted runtime, each point's fit and leave-one-group-out predictions, and the evaluations."""

    runtime: RuntimeCosts
    values: dict[str, float]
    hardware: HardwareProfile | None = None  # with fitted hardware fields, else None
    rows: list[dict] = field(default_factory=list)
    evaluations: int = 0
    cost: float = 0.0


def measure(summary: dict, point: Point) -> float:
    """The simulated counterpart of a point's measurement."""
    if point.metric == "tpot_ms":
        return float(summary["tpot_ms"]["mean"])
    if point.spec.throughput == "end_to_end":
        return float(summary["tokens_per_s"])
    return point.scenario.batch.size * 1000.0 / float(summary["tpot_ms"]["mean"])


class _Fitter:
    """Simulates points under trial runtimes (cached) and runs the bounded least squares."""

    def __init__(self, base: RuntimeCosts | None, free: dict[str, tuple[float, float]], max_evals: int,
                 hardware: HardwareProfile | None = None):
        self.base = base.model_dump() if base is not None else RuntimeCosts().model_dump()
        self.names = list(free)
        self.hw_names = [k for k in self.names if k in FITTABLE_HARDWARE]
        self.hw = hardware  # the points' one profile, when hardware fields are free
        self.lo = [free[k][0] for k in self.names]
        self.hi = [free[k][1] for k in self.names]
        self.max_evals = max_evals
        self.cache: dict[tuple, float] = {}
        self.evaluations = 0

    def runtime(self, x, source: dict[str, str] | None = None) -> RuntimeCosts:
        vals = dict(self.base)
        vals.update({k: float(v) for k, v in zip(self.names, x) if k not in self.hw_names})
        src = dict(vals.get("source") or {})
        src.update(source or {k: "calibration trial" for k in self.names if k not in self.hw_names})
        vals["source"] = src
        return RuntimeCosts(**vals)

    def hardware(self, x, source: str = "calibration trial") -> HardwareProfile | None:
        """The points' profile with the fitted hardware fields set (None when none is free)."""
        if not self.hw_names:
            return None
        hp = self.hw
        for k, v in zip(self.names, x):
            if k in self.hw_names:
                sec, fld = _hw_field(k)
                part = getattr(hp, sec)
                part = part.model_copy(update={fld: float(v), "source": {**part.source, fld: source}})
                hp = hp.model_copy(update={sec: part})
        return hp

    def predict(self, point: Point, x) -> float:
        from .engine.run import simulate

        key = (point.spec.name, tuple(round(float(v), 9) for v in x))
        if key not in self.cache:
            self.evaluations += 1
            upd = {"runtime": self.runtime(x)}
            if self.hw_names:
                upd["hardware"] = self.hardware(x)
            sc = point.scenario.model_copy(update=upd)
            self.cache[key] = measure(simulate(sc).summary, point)
        return self.cache[key]

    def _x(self, u):
        return [lo + float(ui) * (hi - lo) for ui, lo, hi in zip(u, self.lo, self.hi)]

    def fit(self, points: list[Point], u0) -> tuple[list[float], list[float], float]:
        """Bounded, deterministic least squares over unit-scaled parameters; relative residuals."""
        import numpy as np
        from scipy.optimize import least_squares

        def residuals(u):
            x = self._x(u)
            return np.array([self.predict(p, x) / p.measured - 1.0 for p in points])

        res = least_squares(residuals, np.asarray(u0, dtype=float), bounds=(0.0, 1.0), method="trf",
                            diff_step=0.02, max_nfev=self.max_evals, x_scale=1.0)
        return [float(v) for v in res.x], self._x(res.x), float(res.cost)

    def start(self) -> list[float]:
        """The base runtime's values where they lie strictly inside the bounds, else mid-range."""
        u = []
        for k, lo, hi in zip(self.names, self.lo, self.hi):
            if k in self.hw_names:
                sec, fld = _hw_field(k)
                v = getattr(getattr(self.hw, sec), fld)
            else:
                v = self.base.get(k)
            u.append((v - lo) / (hi - lo) if v is not None and lo < v < hi else 0.5)
        return u


def calibrate(pf: PointsFile, points: list[Point], base: RuntimeCosts | None, points_path: str,
              max_evals: int = 30) -> Calibration:
    """Fit on the non-held-out points, then leave each group out in turn and predict it."""
    fitter = _Fitter(base, pf.free, max_evals, _shared_hardware(pf, points, points_path))
    fit_pts = [p for p in points if not p.spec.holdout]
    _, x, cost = fitter.fit(fit_pts, fitter.start())
    groups = sorted({p.group for p in fit_pts})
    loo: dict[str, float | None] = {}
    for g in groups:
        rest = [p for p in fit_pts if p.group != g]
        if not rest:
            break
        _, xg, _ = fitter.fit(rest, fitter.start())  # from the same start: the full fit saw the point
        for p in fit_pts:
            if p.group == g:
                loo[p.spec.name] = fitter.predict(p, xg) / p.measured - 1.0
    rows = []
    for p in sorted(points, key=lambda q: q.spec.holdout):
        pred = fitter.predict(p, x)
        rows.append({"name": p.spec.name, "group": p.group, "holdout": p.spec.holdout, "metric": p.metric,
                     "measured": p.measured, "predicted": pred, "error": pred / p.measured - 1.0,
                     "loo_error": None if p.spec.holdout else loo.get(p.spec.name), "source": p.spec.source})
    used = ", ".join(f"{p.spec.name} ({p.spec.source or 'no source given'})" for p in fit_pts)
    words = f"fitted by moesim calibrate {Path(points_path).name} to {len(fit_pts)} point(s): {used}"
    src = {k: words for k in fitter.names if k not in fitter.hw_names}
    hw = fitter.hardware(x, words)
    if hw is not None:
        hw = hw.model_copy(update={"name": f"{pf.name}-hardware",
                                   "description": f"{hw.name} with {', '.join(fitter.hw_names)} fitted by moesim "
                                                  f"calibrate on {Path(points_path).name}"})
    rt = fitter.runtime(x, src).model_copy(update={
        "name": pf.name,
        "description": pf.description or f"calibrated by moesim calibrate on {Path(points_path).name}"})
    return Calibration(rt, dict(zip(fitter.names, x)), hw, rows, fitter.evaluations, cost)


def _hw_field(name: str) -> tuple[str, str]:
    """`hardware.disk.latency_us` -> ("disk", "latency_us")."""
    _, sec, fld = name.split(".")
    return sec, fld


def _shared_hardware(pf: PointsFile, points: list[Point], file: str) -> HardwareProfile | None:
    """The one hardware profile of every point, when hardware fields are free (else None)."""
    if not any(k in FITTABLE_HARDWARE for k in pf.free):
        return None
    hw = points[0].scenario.hardware
    for p in points[1:]:
        if p.scenario.hardware != hw:
            raise InputError(f"hardware fields are fitted for one machine, but point {p.spec.name!r} uses profile "
                             f"{p.scenario.hardware.name!r} and {points[0].spec.name!r} uses {hw.name!r}",
                             file=file, field="free")
    return hw


def hardware_yaml(cal: Calibration) -> str:
    """The points' hardware profile with the fitted fields (each sourced to the points)."""
    import yaml

    head = "# written by `moesim calibrate`: the points' hardware profile, its fitted fields sourced to the points\n"
    return head + yaml.safe_dump(cal.hardware.model_dump(mode="json", exclude_none=True), sort_keys=False,
                                 allow_unicode=True, width=100)


def runtime_yaml(cal: Calibration) -> str:
    """The calibrated runtime as YAML (only fields that differ from the defaults, plus sources)."""
    import yaml

    d = cal.runtime.model_dump(mode="json")
    default = RuntimeCosts().model_dump(mode="json")
    # (a field the serializer leaves out at its default, e.g. load_slowdown, is absent from `default`)
    out = {k: v for k, v in d.items()
           if k in ("name", "description") or (k != "source" and (k not in default or v != default[k]))}
    out["source"] = {k: v for k, v in d["source"].items() if k in out}
    head = "# written by `moesim calibrate`; each fitted field's source names the points it was fitted to\n"
    return head + yaml.safe_dump(out, sort_keys=False, allow_unicode=True, width=100)


def load_base(raw: Any, file: str) -> RuntimeCosts | None:
    return load_runtime(raw, file=file, base=Path(file).parent)

"""What `moesim trace fit` returns and writes: the fit's result, its preset YAML and reading it back
for generation (`spec_for_preset_file`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from ..errors import InputError
from .compare_stats import rel_err, scalar_keys
from .synthetic import PRESET_FILE_FORMAT, SyntheticParams

PRESET_FORMAT = PRESET_FILE_FORMAT


@dataclass(frozen=True)
class RoutingShape:
    """The part of a model the generator needs."""

    name: str
    num_layers: int
    num_experts: int
    top_k: int


@dataclass
class FitResult:
    params: SyntheticParams
    model: str
    shape: RoutingShape
    trace: str
    trace_sha256: str
    source: str | None
    seed: int
    holdout: float
    split: str
    train_ids: list[int]
    heldout_ids: list[int]
    fitted: list[str]
    fixed: dict
    targets: dict            # fitted statistics of the training requests
    achieved: dict           # the same, synthetic at training size (mean of replicates)
    heldout_real: dict       # full statistics
    heldout_synthetic: dict  # full statistics (mean of eval replicates)
    train_real: dict         # full statistics
    train_synthetic: dict    # full statistics, synthetic at training size (fit replicates)
    replicates: int
    eval_replicates: int
    evaluations: int
    seconds: float
    typical: dict = field(default_factory=dict)
    history: list = field(default_factory=list)
    target_of: dict = field(default_factory=dict)

    def rows(self) -> list[dict]:
        """statistic, held-out real, fitted synthetic, relative error, training real, real train vs held-out."""
        out = []
        for k in scalar_keys(self.heldout_real):
            a, b, t = self.heldout_real.get(k), self.heldout_synthetic.get(k), self.train_real.get(k)
            ts = self.train_synthetic.get(k)
            out.append({"statistic": k, "heldout_real": a, "synthetic": b, "rel_err": rel_err(a, b),
                        "train_real": t, "train_synthetic": ts, "train_rel_err": rel_err(t, ts),
                        "real_split_diff": rel_err(a, t)})
        return out

    def to_document(self) -> dict:
        """The preset YAML document."""
        p = _plain(self.params.model_dump(exclude_none=True))
        return {
            "format": PRESET_FORMAT,
            "model": self.model,
            "num_layers": self.shape.num_layers,
            "num_experts": self.shape.num_experts,
            "top_k": self.shape.top_k,
            "params": p,
            "generate": self.typical,
            "fit": {
                "trace": self.trace,
                "trace_sha256": self.trace_sha256,
                "trace_source": self.source,
                "method": "method of simulated moments: bounded least squares (scipy.optimize.least_squares, trf) on "
                          "relative residuals of the training requests' statistics, common random numbers "
                          "(moesim.traces.fit)",
                "seed": self.seed,
                "holdout": self.holdout,
                "split": self.split,
                "train_requests": self.train_ids,
                "heldout_requests": self.heldout_ids,
                "fitted": self.fitted,
                "fixed": _plain(self.fixed),
                "replicates": self.replicates,
                "eval_replicates": self.eval_replicates,
                "evaluations": self.evaluations,
                "targets_train": _plain(_fit_view(self.targets)),
                "achieved_train": _plain(_fit_view(self.achieved)),
                "heldout": [_plain(r) for r in self.rows()],
            },
        }


def _fit_view(s: dict) -> dict:
    out = {k: s[k] for k in ("overlap_1", "overlap_8", "markov_recall", "probe_recall") if s.get(k) is not None}
    out["entropy_per_layer"] = s["per_layer"]["entropy"]
    return out


def _plain(x):
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return round(float(x), 6)
    if isinstance(x, np.integer):
        return int(x)
    return x


class _Dumper(yaml.SafeDumper):
    """Lists of numbers on one line (rank_bias has num_layers x num_experts of them)."""


def _represent_list(dumper, data):
    flow = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in data) and len(data) > 0
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_Dumper.add_representer(list, _represent_list)


def write_preset(result: FitResult, path) -> Path:
    """Write the fitted preset YAML (loadable with `synthetic.load_preset_file`)."""
    path = Path(path)
    doc = result.to_document()
    text = ("# A synthetic routing preset fitted by `moesim trace fit` (moesim.traces.fit).\n"
            "# Use it with `moesim trace generate --preset-file THIS.yaml -o OUT.parquet`.\n"
            + yaml.dump(doc, Dumper=_Dumper, sort_keys=False, width=120, allow_unicode=True))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def spec_for_preset_file(path, preset: str | None = None):
    """(model spec, params, document) for generating from a fitted preset file: the model preset named
    `preset` (its shape must match the file's), else the file's `model` when it is a model preset of the
    same shape, else a bare routing shape from the file."""
    from ..models import get_preset, preset_names
    from .synthetic import load_preset_file

    params, doc = load_preset_file(path)
    file = str(path)
    shape = {k: doc.get(k) for k in ("num_layers", "num_experts", "top_k")}
    if preset is not None:
        try:
            spec = get_preset(preset)
        except KeyError:
            raise InputError(f"unknown preset {preset!r} (known: {', '.join(preset_names())})",
                             field="--preset") from None
        for k, v in shape.items():
            if v is not None and getattr(spec, k) != v:
                raise InputError(f"the preset was fitted to {k}={v}, model {preset!r} has {k}={getattr(spec, k)}",
                                 file=file, field=k)
        return spec, params, doc
    missing = [k for k, v in shape.items() if v is None]
    if missing:
        raise InputError("missing (needed without --preset to know the routing shape)", file=file,
                         field=missing[0])
    model = doc.get("model")
    if isinstance(model, str):
        try:
            spec = get_preset(model)
            if all(getattr(spec, k) == v for k, v in shape.items()):
                return spec, params, doc
        except KeyError:
            pass
    name = model if isinstance(model, str) and model else Path(file).stem
    return RoutingShape(name, shape["num_layers"], shape["num_experts"], shape["top_k"]), params, doc

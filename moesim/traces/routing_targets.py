"""Published statistics of real MoE routing, and a seeded fit of the synthetic generator to them.

Only statistics a source states as numbers are here. The fit (`fit_mixtral_published`) is what produced
the `mixtral-8x7b-published` preset in synthetic.py; tests/test_routing_presets.py checks that a trace
of that preset reproduces the statistic.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# Jiang et al., "Mixtral of Experts", arXiv:2401.04088, §5, Table 5 ("Percentage of expert assignment
# repetitions"): over The Pile validation subsets, the share of consecutive tokens (i, i+1) whose FIRST
# choice is the same expert, and whose top-2 sets share an expert ("first or second choice"), at layers
# 0, 15 and 31 (random: 12.5% and ~46%). Values in percent, as printed: (first@0, @15, @31, top2@0, @15, @31).
MIXTRAL_TABLE5_LAYERS = (0, 15, 31)
MIXTRAL_TABLE5: dict[str, tuple[float, ...]] = {
    "ArXiv": (14.0, 27.9, 22.7, 46.5, 62.3, 52.9),
    "DM Mathematics": (14.1, 28.4, 19.7, 44.9, 67.0, 44.5),
    "Github": (14.9, 28.1, 19.7, 49.9, 66.9, 49.2),
    "Gutenberg": (13.9, 26.1, 26.3, 49.5, 63.1, 52.2),
    "PhilPapers": (13.6, 25.3, 22.1, 46.9, 61.9, 51.3),
    "PubMed Abstracts": (14.2, 24.6, 22.0, 48.6, 61.6, 51.8),
    "StackExchange": (13.6, 27.2, 23.6, 48.2, 64.6, 53.6),
    "Wikipedia (en)": (14.4, 23.6, 25.3, 49.8, 62.1, 51.8),
}
MIXTRAL_TABLE5_SOURCE = ("Jiang et al. 2024, Mixtral of Experts, arXiv:2401.04088, §5 Table 5 "
                         "(expert assignment repetitions of consecutive tokens, layers 0/15/31, 8 Pile subsets)")


def mixtral_table5_targets() -> dict[str, np.ndarray]:
    """Table 5 averaged over its 8 datasets, as fractions: {"first": [l0, l15, l31], "overlap": [...]},
    and the per-dataset spread (max - min) under "first_range" / "overlap_range"."""
    t = np.array(list(MIXTRAL_TABLE5.values())) / 100.0
    return {"first": t[:, :3].mean(axis=0), "overlap": t[:, 3:].mean(axis=0),
            "first_range": np.ptp(t[:, :3], axis=0), "overlap_range": np.ptp(t[:, 3:], axis=0)}


def repetition_rates(table: pa.Table, layers) -> tuple[np.ndarray, np.ndarray]:
    """(first-choice repeat rate, top-k overlap rate) of consecutive tokens of the same request, one per
    layer in `layers` (Table 5's two measures, counted over every token pair of a trace table)."""
    first, overlap = [], []
    for l in layers:
        part = table.filter(pc.equal(table["layer"], l)).sort_by([("request_id", "ascending"),
                                                                  ("token", "ascending")])
        rid = part["request_id"].to_numpy()
        tok = part["token"].to_numpy()
        k = len(part["experts"][0]) if part.num_rows else 1
        ex = part["experts"].combine_chunks().values.to_numpy().reshape(-1, k)
        same = (rid[1:] == rid[:-1]) & (tok[1:] == tok[:-1] + 1)
        a, b = ex[:-1][same], ex[1:][same]
        first.append(float(np.mean(a[:, 0] == b[:, 0])))
        overlap.append(float(np.mean((a[:, :, None] == b[:, None, :]).any(axis=(1, 2)))))
    return np.array(first), np.array(overlap)


def knot_skews(knots, layers: int, at=MIXTRAL_TABLE5_LAYERS) -> tuple[float, ...]:
    """Per-layer popularity_skew, piecewise linear through `knots` placed at layers `at`."""
    return tuple(round(float(v), 4) for v in np.interp(np.arange(layers), at, knots))


def mixtral_published_stats(params, seeds=(0, 1, 2), requests: int = 8, tokens: int = 128):
    """Table 5's six numbers for a synthetic Mixtral trace of `params`, averaged over model `seeds`
    (each seed draws its own gates, popularity order and requests)."""
    from ..models import get_preset
    from .synthetic import generate

    spec = get_preset("mixtral-8x7b")
    f, o = np.zeros(3), np.zeros(3)
    for s in seeds:
        t = generate(spec, params, requests=requests, prompt_len=tokens, decode_len=0,
                     rng=np.random.default_rng(s))
        fs, os_ = repetition_rates(t, MIXTRAL_TABLE5_LAYERS)
        f += fs
        o += os_
    return f / len(seeds), o / len(seeds)


def fit_mixtral_published(base, seeds=(0, 1, 2), requests: int = 8, tokens: int = 128):
    """Fit tau, tail_prob (a random second choice: real top-2 sets overlap less than the latent gate's, for
    the same first-choice repetition) and the popularity skew at layers 0/15/31 (linear between) of `base` to
    Table 5's dataset means by bounded scipy least_squares; deterministic (common random numbers: the same
    seeds for every evaluation). Returns (params, fitted first rates, fitted overlap rates, result)."""
    from scipy.optimize import least_squares

    tg = mixtral_table5_targets()
    L = 32

    def make(x):
        return base.model_copy(update={"tau": float(x[0]), "tail_prob": float(x[1]),
                                       "popularity_skew": knot_skews(x[2:], L)})

    def resid(x):
        f, o = mixtral_published_stats(make(x), seeds, requests, tokens)
        return np.concatenate([f - tg["first"], o - tg["overlap"]])

    x0 = np.array([0.3, 0.5, 0.3, 0.6, 0.6])
    res = least_squares(resid, x0, bounds=([0.0] * 5, [0.95, 0.95, 2.0, 2.0, 2.0]), diff_step=0.05,
                        xtol=1e-3, ftol=1e-4, max_nfev=60)
    x = np.round(res.x, 3)
    p = make(x)
    f, o = mixtral_published_stats(p, seeds, requests, tokens)
    return p, f, o, res

"""Fit the synthetic latent-gate generator to a routing trace (`moesim trace fit`).

Method: simulated method of moments, checked on held-out requests.

1. Split the trace's requests (seeded) into a training half and a held-out half. Default
   ``stratified``: requests sorted by their own consecutive-token overlap, one of each pair held out at
   random, so that both halves get alike mixes of local and non-local requests (in a 16-request trace a
   few looping greedy decodes otherwise decide the comparison); ``random``: a seeded permutation.
2. Targets: statistics of the TRAINING requests (`compare_stats`), each tied to the knob that moves it
   most: per-layer popularity entropy ↔ ``popularity_skew`` (one per layer); consecutive-token overlap ↔
   ``tau``; its spread across requests ↔ ``tau_spread``; overlap with the previous 8 tokens ↔
   ``topic_weight``; next-layer inter-layer predictability ↔ ``rho`` (recall of a linear probe from layer
   l's pre_attn to layer l+1's experts when the trace has ``pre_attn``, else the Markov recall); and, with
   ``pre_attn`` only: same-layer probe recall ↔ ``attention_noise``, first-order Markov recall ↔
   ``gate_affinity``, and ``hidden_dim`` from pre_attn's effective dimension (participation ratio,
   bisection over a few sizes). Without ``pre_attn`` nothing identifies ``attention_noise``,
   ``gate_affinity`` or ``hidden_dim``: they stay at 0.5, 0.8, 32 (or the values given).
   Phase knobs, when every request has a prompt and a decode longer than 8 tokens: the prompt's own
   consecutive-token overlap ↔ ``prompt_tau`` (an exploring prompt; ``tau``/``tau_spread`` then shape the decode
   mostly); reuse distance p90 ↔ ``loop_share`` (greedy-decode loops: short reuse times); LRU miss at the largest
   default capacity (E/2) ↔ ``tail_prob`` (a sampled, low-confidence last choice: one-off experts, first-use
   misses), with Belady's miss there fitted too. On tiny-learned each alone (and every single-mechanism knob
   tried) fixed the reuse distances only by shrinking the working set (LRU/Belady misses 15-45% low); together
   they fit both. They are fitted after a warm start without them (the fit below with WARM_EVALS evaluations,
   then every knob from its result; from the default start the seeds landed in different basins), and they
   double the evaluation budget.
3. Simulated moments: the same statistics averaged over `replicates` synthetic traces with exactly the
   training requests' prompt/decode lengths (the Markov and probe recalls depend on trace size), from
   the same seeds at every evaluation (common random numbers): a deterministic, nearly smooth objective.
4. Search: Levenberg–Marquardt on the relative residuals, knobs clipped to their ranges, Jacobian by
   forward differences (one per global knob, one for all per-layer skews at once, whose effect on each
   layer's entropy is taken as diagonal). Then, unless ``profile=False``, a per-rank gate-bias correction
   ``rank_bias`` (the popularity shape a Zipf exponent cannot give: dead experts, flat heads) by a damped
   fixed point on the sorted popularity profile, alternating with LM steps on the global knobs; kept only
   if it lowers residuals² + 10·(profile gap)².
5. Check: statistics of the HELD-OUT real requests beside the mean over `eval_replicates` fresh synthetic
   traces (new seeds) with the held-out requests' lengths; also the training-vs-held-out difference of
   the real trace itself (how far two halves of the same trace already are) and the in-sample error.

Every random draw comes from numpy Generators seeded from `seed`.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from ..errors import InputError
from .compare_stats import (
    Routing,
    _participation,
    compare_stats,
    default_capacities,
    load_routing,
    popularity_profile,
    rel_err,
    routing_from_table,
    scalar_keys,
)
from .io import file_sha256
from .synthetic import PRESET_FILE_FORMAT, SyntheticParams, generate

PRESET_FORMAT = PRESET_FILE_FORMAT

# knob -> (target statistic, lower, upper, finite-difference step, start)
KNOBS = {
    "tau": ("overlap_1", 0.0, 0.99, 0.04, 0.5),
    "tau_spread": ("overlap_1_sd", 0.0, 4.0, 0.15, 0.5),
    "topic_weight": ("overlap_8", 0.0, 0.95, 0.04, 0.2),
    "rho": ("markov_recall", 0.0, 0.99, 0.04, 0.8),          # probe_next_recall when the trace has pre_attn
    "attention_noise": ("probe_recall", 0.0, 4.0, 0.1, 0.5),
    "gate_affinity": ("markov_recall", 0.0, 1.0, 0.05, 0.8),
    # phase knobs (traces whose requests have a prompt and a decode); "@C": the largest default cache capacity
    "prompt_tau": ("prompt_overlap_1", 0.0, 0.99, 0.04, 0.4),
    "loop_share": ("reuse_p90", 0.0, 0.9, 0.05, 0.1),
    "tail_prob": ("lru_miss@C", 0.0, 0.5, 0.01, 0.02),
}
#: fitted after a warm start without them (from the defaults' start they land in different basins per seed)
PHASE_KNOBS = ("prompt_tau", "loop_share", "tail_prob")
#: fitted too when the phase knobs are (tail_prob alone overshoots Belady's misses)
PHASE_EXTRA = ("belady_miss@C",)
#: evaluations of the warm start (counted in the budget, which the phase knobs double)
WARM_EVALS = 40
#: fitted too, though no knob is tied to them (least squares over more statistics than knobs)
#: Tried on tiny-learned and left out (before the phase knobs, which now own reuse_p90): ("reuse_p90",) or
#: ("top1_repeat", "reuse_mean") pulled topic_weight up to 0.2-0.3 and left the LRU/Belady miss rates 10-45% low
EXTRA_TARGETS: tuple[str, ...] = ()
RESIDUAL_FLOOR = {"overlap_1_sd": 0.05}
SKEW_MAX = 6.0
SKEW_STEP = 0.1
RANK_BIAS_MAX = 12.0
#: hidden_dim candidates, about 10% apart (the participation ratio is roughly proportional to hidden_dim, so
#: the nearest candidate is within ~5% of it; a coarser grid left tiny-learned's 10% off in-sample)
HIDDEN_DIMS = (4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 16, 18, 20, 22, 24, 27, 30, 33, 36, 40, 44, 48, 53, 58, 64,
               70, 77, 85, 93, 102, 112, 128)


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
                "method": "method of simulated moments: Levenberg-Marquardt on relative residuals of the training "
                          "requests' statistics, common random numbers (moesim.traces.fit)",
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


def _mean_stats(stats: list[dict]) -> dict:
    """Element-wise mean of compare_stats dicts (scalars and per-layer lists)."""
    out: dict = {}
    for k, v in stats[0].items():
        if k == "per_layer":
            out[k] = {pk: np.mean([s[k][pk] for s in stats], axis=0).tolist() if pv else []
                      for pk, pv in v.items()}
        elif isinstance(v, float) or v is None:
            vals = [s[k] for s in stats if s.get(k) is not None]
            out[k] = float(np.mean(vals)) if vals else None
        else:
            out[k] = v
    return out


def _phase_part(r: Routing, decode: bool) -> Routing:
    ex = [e[int(p):] if decode else e[:int(p)] for e, p in zip(r.experts, r.prompt_lens)]
    return Routing(r.num_layers, r.num_experts, r.top_k, ex, np.zeros(len(ex), dtype=np.int64))


def phase_stats(r: Routing) -> dict:
    """Statistics of the prompt tokens alone (each request's first prompt_len tokens): ``prompt_overlap_1``."""
    s = compare_stats(_phase_part(r, False), cache=False, probe=False, reuse=False)
    return {"prompt_overlap_1": s["overlap_1"]}


def synthetic_like(shape: RoutingShape, params: SyntheticParams, like: Routing, seed: int,
                   pre_attn: bool) -> Routing:
    """A synthetic trace with exactly `like`'s request lengths, drawn from default_rng(seed)."""
    tb = generate(shape, params, requests=like.n_requests, prompt_len=like.prompt_lens, decode_len=like.decode_lens,
                  rng=np.random.default_rng(seed), pre_attn=pre_attn)
    return routing_from_table(tb, shape.num_layers, shape.num_experts, shape.top_k, like.prompt_lens,
                              like.decode_lens, pre_attn=pre_attn)


def simulated_stats(shape, params, like: Routing, seeds, pre_attn: bool, full: bool = False,
                    capacities=None) -> dict:
    sts = [compare_stats(synthetic_like(shape, params, like, int(s), pre_attn), capacities=capacities, cache=full,
                         reuse=full, probe=pre_attn) for s in seeds]
    return _mean_stats(sts)


def auto_replicates(real: Routing, holdout: float) -> int:
    """Synthetic traces per evaluation: 16 for small traces (a heterogeneous fit, tau_spread > 0, needs many
    simulated requests to pin its mean), fewer as the training half grows, at least 4."""
    cost = real.tokens * (1 - holdout) * real.num_layers * real.num_experts
    return int(np.clip(np.ceil(2_000_000 / max(cost, 1)), 4, 16))


def split_requests(real: Routing, holdout: float, split: str, rng: np.random.Generator):
    """(held-out, training) request positions. "random": a seeded permutation, round(n·holdout) held out.
    "stratified": requests sorted by their own consecutive-token overlap (their locality), cut into blocks
    of round(1/holdout), one request of each block held out at random (a trailing partial block gives one
    with probability size/block): both halves get alike mixes of local and non-local requests."""
    n = real.n_requests
    if split == "random":
        perm = rng.permutation(n)
        k = int(round(n * holdout))
        return np.sort(perm[:k]), np.sort(perm[k:])
    if split != "stratified":
        raise InputError(f"expected 'random' or 'stratified', got {split!r}", field="--split")
    loc = np.array([compare_stats(real.subset([i]), cache=False, reuse=False, probe=False)["overlap_1"] or 0.0
                    for i in range(n)])
    order = np.argsort(loc, kind="stable")
    b = max(2, int(round(1 / holdout)))
    held = []
    for s in range(0, n, b):
        block = order[s:s + b]
        if len(block) == b or rng.random() < len(block) / b:
            held.append(int(block[rng.integers(len(block))]))
    held = np.sort(np.array(held, dtype=np.int64))
    return held, np.setdiff1d(np.arange(n), held)


def fit_routing(real: Routing, *, seed: int = 0, holdout: float = 0.5, replicates: int | None = None,
                eval_replicates: int = 16, hidden_dim: int | None = None, gate_affinity: float | None = None,
                attention_noise: float | None = None, tau_spread: float | None = None,
                prompt_tau: float | None = None, loop_share: float | None = None, tail_prob: float | None = None,
                profile: bool = True, _phases: bool = True, _check: bool = True,
                split: str = "stratified", max_evals: int = 70,
                tol: float = 0.02, log=None, trace_path: str | None = None) -> FitResult:
    """Fit SyntheticParams to `real` (see the module docstring). `hidden_dim`, `gate_affinity`,
    `attention_noise`: fix that knob instead of fitting it (without pre_attn the last two are fixed at
    0.8 / 0.5 and hidden_dim at 32); so do `tau_spread`, `prompt_tau`, `loop_share`, `tail_prob` (the last three
    are fitted only when every request has more than 8 prompt and 8 decode tokens). `profile`: also fit a per-rank
    bias correction (`rank_bias`). `_phases`, `_check`: internal (the warm start's inner fit)."""
    t0 = time.perf_counter()
    file = trace_path or real.file
    n = real.n_requests
    if not 0 < holdout < 1:
        raise InputError(f"must be between 0 and 1 (got {holdout})", field="--holdout")
    n_hold = int(round(n * holdout))
    if n < 4 or (split == "random" and (n_hold < 2 or n - n_hold < 2)):
        raise InputError(f"needs at least 2 training and 2 held-out requests (the Markov and probe statistics are "
                         f"2-fold over requests); found {n} requests, holdout {holdout}", file=file)
    if min(int(e.shape[0]) for e in real.experts) <= 8:
        raise InputError("every request needs more than 8 tokens (the 8-token window statistic)", file=file)
    if replicates is None:
        replicates = auto_replicates(real, holdout)
    if replicates < 1 or eval_replicates < 1:
        raise InputError("must be >= 1", field="--replicates")
    say = log or (lambda _m: None)
    rng = np.random.default_rng(seed)
    held, train = split_requests(real, holdout, split, rng)
    if len(held) < 2 or len(train) < 2:
        raise InputError(f"the {split} split left {len(train)} training and {len(held)} held-out requests "
                         f"(needs 2 each)", file=file)
    fit_seeds = rng.integers(0, 2**63 - 1, size=replicates)
    eval_seeds = rng.integers(0, 2**63 - 1, size=eval_replicates)
    tr, ho = real.subset(train), real.subset(held)
    L, E, K = real.num_layers, real.num_experts, real.top_k
    shape = RoutingShape(real.model or "fitted", L, E, K)
    use_pre = real.pre_attn is not None
    # phase knobs: only when every request has a prompt and a decode longer than the 8-token window
    given = {"prompt_tau": prompt_tau, "loop_share": loop_share, "tail_prob": tail_prob}
    phases = (_phases and int(tr.decode_lens.min()) > 8 and int(tr.prompt_lens.min()) > 8
              and any(given[k] is None for k in PHASE_KNOBS))
    cap = f"@{default_capacities(E, K)[-1]}"
    target_of = {k: v[0].replace("@C", cap) for k, v in KNOBS.items()}
    extra = EXTRA_TARGETS + (tuple(k.replace("@C", cap) for k in PHASE_EXTRA) if phases else ())
    need_cache = phases or any("_miss@" in k for k in extra)
    need_reuse = phases or any(k.startswith("reuse_") for k in extra)
    targets = compare_stats(tr, cache=need_cache, reuse=need_reuse, probe=use_pre)
    if phases:
        targets.update(phase_stats(tr))
    if use_pre:
        target_of["rho"] = "probe_next_recall"

    fixed: dict = {}
    knobs = ["tau", "topic_weight", "rho"]
    if tau_spread is None:
        knobs.insert(1, "tau_spread")
    else:
        fixed["tau_spread"] = float(tau_spread)
    for k in PHASE_KNOBS:
        v = given[k]
        if v is None and phases and targets.get(target_of[k]) is not None:
            knobs.append(k)
        elif v is not None and (v or k not in ("loop_share", "tail_prob")):
            fixed[k] = float(v)
    if use_pre and attention_noise is None:
        knobs.append("attention_noise")
    else:
        fixed["attention_noise"] = 0.5 if attention_noise is None else float(attention_noise)
    if use_pre and gate_affinity is None and L > 1:
        knobs.append("gate_affinity")
    else:
        fixed["gate_affinity"] = 0.8 if gate_affinity is None else float(gate_affinity)
    if L == 1:
        knobs.remove("rho")
        fixed["rho"] = 0.8

    evals = 0

    # -- stage 0: hidden_dim from the effective dimension of pre_attn ----------------------------------
    fit_dim = hidden_dim is None and use_pre
    dim_fitted = fit_dim

    def choose_dim(base: dict) -> int:
        """The hidden_dim whose synthetic pre_attn participation ratio is closest to the target's
        (bisection over HIDDEN_DIMS: the ratio grows with hidden_dim)."""
        nonlocal evals
        want = targets["pre_attn_dim"]
        cands = [d for d in HIDDEN_DIMS if d <= max(4, real.pre_attn[0].shape[-1])]
        lo_i, hi_i = 0, len(cands) - 1
        got: dict[int, float] = {}
        while lo_i < hi_i:
            mid = (lo_i + hi_i) // 2
            d = cands[mid]
            syn = synthetic_like(shape, SyntheticParams(**{**base, "hidden_dim": d}), tr, int(fit_seeds[0]), True)
            evals += 1
            got[d] = _participation(syn)[0]
            if got[d] < want:
                lo_i = mid + 1
            else:
                hi_i = mid
        d = cands[lo_i]
        below = cands[lo_i - 1] if lo_i > 0 else None
        if below in got and d in got and abs(math.log(got[below] / want)) < abs(math.log(got[d] / want)):
            d = below
        return d

    start = None
    if phases and any(k in knobs for k in PHASE_KNOBS):
        max_evals *= 2
        # warm start: the fit without the phase knobs (which converges reliably), then all knobs from there
        base = fit_routing(real, seed=seed, holdout=holdout, replicates=replicates, eval_replicates=eval_replicates,
                           hidden_dim=hidden_dim, gate_affinity=gate_affinity, attention_noise=attention_noise,
                           tau_spread=tau_spread, profile=False, split=split, max_evals=WARM_EVALS, tol=tol,
                           _phases=False, _check=False)
        bp = base.params
        start = {k: getattr(bp, k) for k in knobs if k not in PHASE_KNOBS}
        start.update(prompt_tau=bp.tau, loop_share=0.0, tail_prob=0.0)
        start_skew = list(bp.popularity_skew) if isinstance(bp.popularity_skew, tuple) else [bp.popularity_skew] * L
        evals += base.evaluations
        if fit_dim:
            hidden_dim, fit_dim = bp.hidden_dim, False
    if fit_dim:
        hidden_dim = choose_dim({})
        say(f"  hidden_dim {hidden_dim} (pre_attn participation ratio {targets['pre_attn_dim']:.1f})")
    fixed["hidden_dim"] = int(hidden_dim if hidden_dim is not None else 32)

    G = len(knobs)
    stat_names = [target_of[k] for k in knobs] + [k for k in extra if targets.get(k) is not None]
    NG = len(stat_names)
    tg = np.array([targets[k] for k in stat_names])
    # relative residuals; a spread across requests is measured against a floor (a homogeneous trace's
    # sd is sampling noise, and dividing by it would let it rule the fit)
    tscale = np.array([max(abs(targets[k]), RESIDUAL_FLOOR.get(k, 1e-3)) for k in stat_names])
    te = np.array(targets["per_layer"]["entropy"])
    escale = np.maximum(1.0 - te, 0.02)
    lo = np.array([KNOBS[k][1] for k in knobs] + [0.0] * L)
    hi = np.array([KNOBS[k][2] for k in knobs] + [SKEW_MAX] * L)
    fd = np.array([KNOBS[k][3] for k in knobs])
    prof_t = popularity_profile(tr)
    eps = 0.5 / max(tr.tokens * K, 1)
    rank_bias = None

    def params_of(x, rb=None) -> SyntheticParams:
        d = {**{k: v for k, v in fixed.items()}, **dict(zip(knobs, (float(v) for v in x[:G])))}
        return SyntheticParams(popularity_skew=tuple(float(v) for v in x[G:]), rank_bias=rb, **d)

    def residual(x, rb=None) -> tuple[np.ndarray, dict, np.ndarray]:
        nonlocal evals
        evals += 1
        p = params_of(x, rb)
        sts, profs = [], []
        for sd in fit_seeds:
            syn = synthetic_like(shape, p, tr, int(sd), use_pre)
            st = compare_stats(syn, capacities=targets.get("capacities"), cache=need_cache, reuse=need_reuse,
                               probe=use_pre)
            if phases:
                st.update(phase_stats(syn))
            sts.append(st)
            profs.append(popularity_profile(syn))
        s = _mean_stats(sts)
        g = np.array([s[k] for k in stat_names])
        e = np.array(s["per_layer"]["entropy"])
        return np.concatenate([(g - tg) / tscale, (e - te) / escale]), s, np.mean(profs, axis=0)

    def lm_iteration(x, r, s, prof, lam, rb, with_skew: bool):
        """One Levenberg-Marquardt iteration: Jacobian, then damped steps until one improves."""
        cols = G + (L if with_skew else 0)
        J = np.zeros((r.size, cols))
        for j in range(G):
            h = fd[j] * (1 if x[j] + fd[j] <= hi[j] else -1)
            xp = x.copy()
            xp[j] += h
            J[:, j] = (residual(xp, rb)[0] - r) / h
        if with_skew:
            sgn = np.where(x[G:] + SKEW_STEP <= hi[G:], 1.0, -1.0)
            xp = x.copy()
            xp[G:] += SKEW_STEP * sgn
            d = (residual(xp, rb)[0] - r) / SKEW_STEP
            for l in range(L):
                J[:NG, G + l] = d[:NG] * sgn[l] / L     # a common shift's effect on the global statistics, shared out
                J[NG + l, G + l] = d[NG + l] * sgn[l]    # each layer's entropy: its own skew only
        A = J.T @ J
        gvec = J.T @ r
        while evals < max_evals:
            step = np.linalg.solve(A + lam * (np.diag(np.diag(A)) + 1e-9 * np.eye(cols)), -gvec)
            xn = x.copy()
            xn[:cols] = np.clip(x[:cols] + step, lo[:cols], hi[:cols])
            rn, sn, pn = residual(xn, rb)
            if rn @ rn < r @ r:
                return xn, rn, sn, pn, max(lam / 3, 1e-4), True
            lam *= 4
            if lam > 1e4:
                break
        return x, r, s, prof, lam, False

    def note(stage):
        say(f"  [{stage}] eval {evals:3d}: max |residual| {np.abs(r).max():.4f}  "
            + " ".join(f"{k}={v:.3f}" for k, v in zip(knobs, x[:G]))
            + "  skew=" + "/".join(f"{v:.2f}" for v in x[G:])
            + (f"  profile gap {np.abs(prof - prof_t).sum(axis=1).mean():.3f}" if profile else ""))

    # -- stage 1: global knobs and per-layer Zipf skew (then hidden_dim again at the fitted knobs) -------
    if start is None:
        x = np.array([KNOBS[k][4] for k in knobs] + [0.3] * L, dtype=np.float64)
    else:
        x = np.array([start[k] for k in knobs] + start_skew, dtype=np.float64)
    r, s, prof = residual(x)
    lam = 1e-2
    budget1 = max_evals if not profile else int(max_evals * 0.6)
    for rnd in range(2):
        while evals + G + 2 <= budget1 and np.abs(r).max() > tol:
            x, r, s, prof, lam, ok = lm_iteration(x, r, s, prof, lam, None, True)
            note("zipf")
            if not ok:
                break
        if not fit_dim or rnd == 1:
            break
        p_now = params_of(x).model_dump()
        d = choose_dim({k: v for k, v in p_now.items() if k != "hidden_dim"})
        if d == fixed["hidden_dim"]:
            break
        say(f"  hidden_dim {fixed['hidden_dim']} -> {d} at the fitted knobs")
        fixed["hidden_dim"] = d
        r, s, prof = residual(x)
    history = [{"stage": "zipf", "evaluations": evals, "max_abs_residual": round(float(np.abs(r).max()), 5)}]

    # -- stage 2: per-rank bias correction (popularity shape), alternating with the global knobs -------
    # kept only if it lowers the score (residuals² + profile gap²) of the stage-1 result
    def score(r_, prof_) -> float:
        return float(r_ @ r_) + float(np.abs(prof_ - prof_t).sum(axis=1).mean()) ** 2 * 10

    if profile:
        rb = np.zeros((L, E))
        best = (score(r, prof), x.copy(), None, r, s, prof)
        worse = 0
        while evals + 2 <= max_evals and worse < 1:
            # damped fixed point: move each rank's bias by the log-ratio of the target and simulated shares
            rb = np.clip(rb + 0.5 * (np.log(prof_t + eps) - np.log(prof + eps)), -RANK_BIAS_MAX, RANK_BIAS_MAX)
            rb -= rb.mean(axis=1, keepdims=True)
            rbt = tuple(tuple(float(round(v, 4)) for v in row) for row in rb)
            r, s, prof = residual(x, rbt)
            note("profile")
            if np.abs(r).max() > tol and evals + G + 2 <= max_evals:
                x, r, s, prof, lam, _ = lm_iteration(x, r, s, prof, lam, rbt, False)
                note("global")
            sc = score(r, prof)
            if sc < best[0]:
                best, worse = (sc, x.copy(), rbt, r, s, prof), 0
            else:
                worse += 1
        _, x, rank_bias, r, s, prof = best
        history.append({"stage": "profile", "evaluations": evals, "max_abs_residual": round(float(np.abs(r).max()), 5),
                        "profile_gap": round(float(np.abs(prof - prof_t).sum(axis=1).mean()), 5),
                        "kept": rank_bias is not None})
    # rounded as the preset file stores them, so that the file holds exactly what is checked below
    params = SyntheticParams(**_plain(params_of(x, rank_bias).model_dump(exclude_none=True)))
    achieved = s

    # -- check: held-out requests ------------------------------------------------------------------------
    train_real = compare_stats(tr)
    caps = train_real["capacities"]
    heldout_real = compare_stats(ho, capacities=caps)
    if _check:
        heldout_syn = simulated_stats(shape, params, ho, eval_seeds, use_pre, full=True, capacities=caps)
        train_syn = simulated_stats(shape, params, tr, fit_seeds, use_pre, full=True, capacities=caps)
    else:   # an inner (warm-start) fit: its caller checks
        heldout_syn = train_syn = {}
    typical = {"requests": int(n), "prompt_len": int(np.median(real.prompt_lens)),
               "decode_len": int(np.median(real.decode_lens))}
    rid = real.request_ids if real.request_ids is not None else np.arange(n)
    fitted = knobs + (["hidden_dim"] if dim_fitted else []) + ["popularity_skew (per layer)"] \
        + (["rank_bias (per layer and rank)"] if rank_bias is not None else [])
    if dim_fitted:
        fixed.pop("hidden_dim")
    return FitResult(
        params=params, model=shape.name, shape=shape, trace=str(file), trace_sha256=file_sha256(file) if file else "",
        source=real.meta.get("source"), seed=seed, holdout=holdout, split=split, train_ids=[int(rid[i]) for i in train],
        heldout_ids=[int(rid[i]) for i in held], fitted=fitted, fixed=fixed,
        targets=targets, achieved=achieved, heldout_real=heldout_real, heldout_synthetic=heldout_syn,
        train_real=train_real, train_synthetic=train_syn, replicates=replicates, eval_replicates=eval_replicates,
        evaluations=evals, seconds=time.perf_counter() - t0, typical=typical, history=history,
        target_of={k: target_of[k] for k in knobs})


def fit_trace(path, **kw) -> FitResult:
    """Fit the generator to the trace file at `path` (InputError naming the file when it is bad)."""
    real = load_routing(path)
    return fit_routing(real, trace_path=str(path), **kw)


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

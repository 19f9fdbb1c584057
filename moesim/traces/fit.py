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
4. Search: bounded least squares (`scipy.optimize.least_squares`, trust-region reflective) on the relative
   residuals, knobs within their ranges, Jacobian by forward differences (one per global knob, one for all
   per-layer skews at once, whose effect on each layer's entropy is taken as diagonal). Then, unless
   ``profile=False``, a per-rank gate-bias correction ``rank_bias`` (the popularity shape a Zipf exponent
   cannot give: dead experts, flat heads) by a damped fixed point on the sorted popularity profile,
   alternating with short least-squares runs on the global knobs; kept only if it lowers
   residuals² + 10·(profile gap)².
5. Check: statistics of the HELD-OUT real requests beside the mean over `eval_replicates` fresh synthetic
   traces (new seeds) with the held-out requests' lengths; also the training-vs-held-out difference of
   the real trace itself (how far two halves of the same trace already are) and the in-sample error.

Every random draw comes from numpy Generators seeded from `seed`.
"""
from __future__ import annotations

import math
import time
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from scipy.optimize import least_squares

from ..errors import InputError, build
from .compare_stats import Routing, _participation, compare_stats, default_capacities, load_routing, popularity_profile
from .fit_result import PRESET_FORMAT, FitResult, RoutingShape, _plain, spec_for_preset_file, write_preset
from .fit_stats import _mean_stats, auto_replicates, phase_stats, simulated_stats, split_requests, synthetic_like
from .io import file_sha256
from .synthetic import SyntheticParams

__all__ = ["FitOptions", "FitResult", "PRESET_FORMAT", "RoutingShape", "fit_routing", "fit_trace",
           "spec_for_preset_file", "split_requests", "synthetic_like", "write_preset"]

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
#: evaluations of the warm start at most (counted in the budget, which the phase knobs double; never more than
#: the budget given)
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


class FitOptions(BaseModel):
    """What `fit_routing` fits, fixes and spends. A knob given a value here is fixed instead of fitted."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int = Field(0, description="seeds the request split and every draw")
    holdout: float = Field(0.5, gt=0, lt=1, description="share of requests held out")
    split: Literal["random", "stratified"] = Field("stratified", description="how requests are split (split_requests)")
    replicates: int | None = Field(None, ge=1, description="synthetic traces per evaluation [default: auto_replicates]")
    eval_replicates: int = Field(16, ge=1, description="synthetic traces averaged for the held-out check")
    max_evals: int = Field(70, ge=1, description="evaluations of the simulated statistics (doubled with phase knobs)")
    tol: float = Field(0.02, gt=0, description="stop once every relative residual is within this")
    hidden_dim: int | None = Field(None, ge=1, description="fix hidden_dim [default: fitted with pre_attn, else 32]")
    gate_affinity: float | None = Field(None, ge=0, le=1,
                                        description="fix it [default: fitted with pre_attn, else 0.8]")
    attention_noise: float | None = Field(None, ge=0, description="fix it [default: fitted with pre_attn, else 0.5]")
    tau_spread: float | None = Field(None, ge=0, description="fix it [default: fitted]")
    prompt_tau: float | None = Field(None, ge=0, lt=1, description="fix it [default: fitted with phases]")
    loop_share: float | None = Field(None, ge=0, lt=1, description="fix it [default: fitted with phases]")
    tail_prob: float | None = Field(None, ge=0, le=1, description="fix it [default: fitted with phases]")
    profile: bool = Field(True, description="also fit the per-rank popularity correction rank_bias")
    phases: bool = Field(True, description="fit the phase knobs when every request has them (off: the warm start)")
    check: bool = Field(True, description="compare with the held-out requests (off: the warm start)")


class _Stop(Exception):
    """Ends a least-squares run: the evaluation budget is spent, or every residual is within tol."""


class _Fit:
    """One fit of SyntheticParams to a trace (module docstring), one method per stage."""

    def __init__(self, real: Routing, opts: FitOptions, log=None, trace_path: str | None = None):
        self.t0 = time.perf_counter()
        self.real, self.o = real, opts
        self.file = trace_path or real.file
        self.say = log or (lambda _m: None)
        self.evals = 0
        self.max_evals = opts.max_evals
        self.history: list[dict] = []
        self._memo: dict = {}
        self._check_input()
        self._split()
        self._set_targets()
        self._choose_knobs()

    # -- set-up ----------------------------------------------------------------------------------------
    def _check_input(self) -> None:
        real, o, file = self.real, self.o, self.file
        n = real.n_requests
        n_hold = int(round(n * o.holdout))
        if n < 4 or (o.split == "random" and (n_hold < 2 or n - n_hold < 2)):
            raise InputError(f"needs at least 2 training and 2 held-out requests (the Markov and probe statistics "
                             f"are 2-fold over requests); found {n} requests, holdout {o.holdout}", file=file)
        if min(int(e.shape[0]) for e in real.experts) <= 8:
            raise InputError("every request needs more than 8 tokens (the 8-token window statistic)", file=file)
        self.replicates = o.replicates if o.replicates is not None else auto_replicates(real, o.holdout)

    def _split(self) -> None:
        real, o = self.real, self.o
        rng = np.random.default_rng(o.seed)
        self.held, self.train = split_requests(real, o.holdout, o.split, rng)
        if len(self.held) < 2 or len(self.train) < 2:
            raise InputError(f"the {o.split} split left {len(self.train)} training and {len(self.held)} held-out "
                             f"requests (needs 2 each)", file=self.file)
        self.fit_seeds = rng.integers(0, 2**63 - 1, size=self.replicates)
        self.eval_seeds = rng.integers(0, 2**63 - 1, size=o.eval_replicates)
        self.tr, self.ho = real.subset(self.train), real.subset(self.held)
        self.L, self.E, self.K = real.num_layers, real.num_experts, real.top_k
        self.shape = RoutingShape(real.model or "fitted", self.L, self.E, self.K)
        self.use_pre = real.pre_attn is not None

    def _set_targets(self) -> None:
        """The training requests' statistics and which knob each is tied to."""
        o, tr = self.o, self.tr
        # phase knobs: only when every request has a prompt and a decode longer than the 8-token window
        self.given = {"prompt_tau": o.prompt_tau, "loop_share": o.loop_share, "tail_prob": o.tail_prob}
        self.phases = (o.phases and int(tr.decode_lens.min()) > 8 and int(tr.prompt_lens.min()) > 8
                       and any(self.given[k] is None for k in PHASE_KNOBS))
        cap = f"@{default_capacities(self.E, self.K)[-1]}"
        self.target_of = {k: v[0].replace("@C", cap) for k, v in KNOBS.items()}
        self.extra = EXTRA_TARGETS + (tuple(k.replace("@C", cap) for k in PHASE_EXTRA) if self.phases else ())
        self.need_cache = self.phases or any("_miss@" in k for k in self.extra)
        self.need_reuse = self.phases or any(k.startswith("reuse_") for k in self.extra)
        self.targets = compare_stats(tr, cache=self.need_cache, reuse=self.need_reuse, probe=self.use_pre)
        if self.phases:
            self.targets.update(phase_stats(tr))
        if self.use_pre:
            self.target_of["rho"] = "probe_next_recall"

    def _choose_knobs(self) -> None:
        """The knobs to fit (`knobs`) and those held (`fixed`)."""
        o, L = self.o, self.L
        fixed: dict = {}
        knobs = ["tau", "topic_weight", "rho"]
        if o.tau_spread is None:
            knobs.insert(1, "tau_spread")
        else:
            fixed["tau_spread"] = float(o.tau_spread)
        for k in PHASE_KNOBS:
            v = self.given[k]
            if v is None and self.phases and self.targets.get(self.target_of[k]) is not None:
                knobs.append(k)
            elif v is not None and (v or k not in ("loop_share", "tail_prob")):
                fixed[k] = float(v)
        if self.use_pre and o.attention_noise is None:
            knobs.append("attention_noise")
        else:
            fixed["attention_noise"] = 0.5 if o.attention_noise is None else float(o.attention_noise)
        if self.use_pre and o.gate_affinity is None and L > 1:
            knobs.append("gate_affinity")
        else:
            fixed["gate_affinity"] = 0.8 if o.gate_affinity is None else float(o.gate_affinity)
        if L == 1:
            knobs.remove("rho")
            fixed["rho"] = 0.8
        self.knobs, self.fixed = knobs, fixed
        self.fit_dim = self.dim_fitted = o.hidden_dim is None and self.use_pre

    # -- stage 0: the start (a warm start without the phase knobs) and hidden_dim ---------------------------
    def choose_dim(self, base: dict) -> int:
        """The hidden_dim whose synthetic pre_attn participation ratio is closest to the target's
        (bisection over HIDDEN_DIMS: the ratio grows with hidden_dim)."""
        want = self.targets["pre_attn_dim"]
        cands = [d for d in HIDDEN_DIMS if d <= max(4, self.real.pre_attn[0].shape[-1])]
        lo_i, hi_i = 0, len(cands) - 1
        got: dict[int, float] = {}
        while lo_i < hi_i:
            mid = (lo_i + hi_i) // 2
            d = cands[mid]
            syn = synthetic_like(self.shape, SyntheticParams(**{**base, "hidden_dim": d}), self.tr,
                                 int(self.fit_seeds[0]), True)
            self.evals += 1
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

    def _warm_start(self) -> np.ndarray:
        """The fit without the phase knobs (which converges reliably); all knobs then start from its result."""
        self.max_evals *= 2
        sub = self.o.model_copy(update=dict(profile=False, max_evals=min(WARM_EVALS, self.o.max_evals), phases=False,
                                            check=False, prompt_tau=None, loop_share=None, tail_prob=None,
                                            replicates=self.replicates))
        base = _Fit(self.real, sub).run()
        bp = base.params
        start = {k: getattr(bp, k) for k in self.knobs if k not in PHASE_KNOBS}
        start.update(prompt_tau=bp.tau, loop_share=0.0, tail_prob=0.0)
        skew = list(bp.popularity_skew) if isinstance(bp.popularity_skew, tuple) else [bp.popularity_skew] * self.L
        self.evals += base.evaluations
        if self.fit_dim:
            self.fixed["hidden_dim"], self.fit_dim = bp.hidden_dim, False
        return np.array([start[k] for k in self.knobs] + skew, dtype=np.float64)

    def _start(self) -> np.ndarray:
        if self.phases and any(k in self.knobs for k in PHASE_KNOBS):
            x = self._warm_start()
        else:
            x = np.array([KNOBS[k][4] for k in self.knobs] + [0.3] * self.L, dtype=np.float64)
        if self.fit_dim:
            self.fixed["hidden_dim"] = self.choose_dim({})
            self.say(f"  hidden_dim {self.fixed['hidden_dim']} (pre_attn participation ratio "
                     f"{self.targets['pre_attn_dim']:.1f})")
        self.fixed["hidden_dim"] = int(self.fixed.get("hidden_dim") or self.o.hidden_dim or 32)
        return x

    # -- the objective -----------------------------------------------------------------------------------
    def _set_objective(self) -> None:
        """Residual scales, bounds and difference steps for the knobs chosen."""
        knobs, targets, L = self.knobs, self.targets, self.L
        self.G = len(knobs)
        self.stat_names = [self.target_of[k] for k in knobs] + [k for k in self.extra if targets.get(k) is not None]
        self.NG = len(self.stat_names)
        self.tg = np.array([targets[k] for k in self.stat_names])
        # relative residuals; a spread across requests is measured against a floor (a homogeneous trace's
        # sd is sampling noise, and dividing by it would let it rule the fit)
        self.tscale = np.array([max(abs(targets[k]), RESIDUAL_FLOOR.get(k, 1e-3)) for k in self.stat_names])
        self.te = np.array(targets["per_layer"]["entropy"])
        self.escale = np.maximum(1.0 - self.te, 0.02)
        self.lo = np.array([KNOBS[k][1] for k in knobs] + [0.0] * L)
        self.hi = np.array([KNOBS[k][2] for k in knobs] + [SKEW_MAX] * L)
        self.fd = np.array([KNOBS[k][3] for k in knobs])
        self.prof_t = popularity_profile(self.tr)

    def params_of(self, x, rb=None) -> SyntheticParams:
        d = {**self.fixed, **dict(zip(self.knobs, (float(v) for v in x[:self.G])))}
        return SyntheticParams(popularity_skew=tuple(float(v) for v in x[self.G:]), rank_bias=rb, **d)

    def _key(self, x, rb) -> tuple:
        # rounded: least_squares nudges a start on a bound by ~1e-10 into the interior
        return np.round(x, 9).tobytes(), rb, self.fixed["hidden_dim"]

    def residual(self, x, rb=None) -> tuple[np.ndarray, dict, np.ndarray]:
        """(relative residuals, mean statistics, mean popularity profile) of the synthetic traces at `x`,
        from the fit's seeds (common random numbers); each new point counts one evaluation."""
        key = self._key(x, rb)
        if key not in self._memo:
            self.evals += 1
            self._memo[key] = self._simulate(self.params_of(x, rb))
        return self._memo[key]

    def _simulate(self, p: SyntheticParams) -> tuple[np.ndarray, dict, np.ndarray]:
        sts, profs = [], []
        for sd in self.fit_seeds:
            syn = synthetic_like(self.shape, p, self.tr, int(sd), self.use_pre)
            st = compare_stats(syn, capacities=self.targets.get("capacities"), cache=self.need_cache,
                               reuse=self.need_reuse, probe=self.use_pre)
            if self.phases:
                st.update(phase_stats(syn))
            sts.append(st)
            profs.append(popularity_profile(syn))
        s = _mean_stats(sts)
        g = np.array([s[k] for k in self.stat_names])
        e = np.array(s["per_layer"]["entropy"])
        return np.concatenate([(g - self.tg) / self.tscale, (e - self.te) / self.escale]), s, np.mean(profs, axis=0)

    def _jacobian(self, x, rb, cols: int) -> np.ndarray:
        """Forward differences: one evaluation per global knob and, when the skews are fitted, one for all of
        them at once (each layer's entropy moved by its own skew only; the global statistics shared out)."""
        G, L, NG = self.G, self.L, self.NG
        r = self.residual(x, rb)[0]
        J = np.zeros((r.size, cols))
        for j in range(G):
            h = self.fd[j] * (1 if x[j] + self.fd[j] <= self.hi[j] else -1)
            xp = x.copy()
            xp[j] += h
            J[:, j] = (self.residual(xp, rb)[0] - r) / h
        if cols > G:
            sgn = np.where(x[G:] + SKEW_STEP <= self.hi[G:], 1.0, -1.0)
            xp = x.copy()
            xp[G:] += SKEW_STEP * sgn
            d = (self.residual(xp, rb)[0] - r) / SKEW_STEP
            for l in range(L):
                J[:NG, G + l] = d[:NG] * sgn[l] / L
                J[NG + l, G + l] = d[NG + l] * sgn[l]
        return J

    def _solve(self, x, rb, cols: int, budget: int, stage: str):
        """Bounded least squares (scipy TRF) over x[:cols], the rest held, from `x`. Returns the best point
        evaluated, (x, residuals, statistics, profile), once the run converges, every residual is within tol
        or `budget` evaluations are spent."""
        best = [x, *self.residual(x, rb)]
        if np.abs(best[1]).max() <= self.o.tol:
            return tuple(best)
        jac_cost = self.G + (cols > self.G)

        def full(z):
            xz = x.copy()
            xz[:cols] = z
            return xz

        def fun(z):
            xz = full(z)
            if self._key(xz, rb) not in self._memo and self.evals >= budget:
                raise _Stop
            r, s, prof = self.residual(xz, rb)
            if r @ r < best[1] @ best[1]:
                best[:] = [xz, r, s, prof]
                self._note(stage, xz, r, prof)
            if np.abs(r).max() <= self.o.tol:
                raise _Stop
            return r

        def jac(z):
            if self.evals + jac_cost + 1 > budget:
                raise _Stop
            return self._jacobian(full(z), rb, cols)

        try:
            least_squares(fun, x[:cols], jac=jac, bounds=(self.lo[:cols], self.hi[:cols]), method="trf",
                          x_scale="jac")
        except _Stop:
            pass
        return tuple(best)

    def _note(self, stage, x, r, prof) -> None:
        G = self.G
        self.say(f"  [{stage}] eval {self.evals:3d}: max |residual| {np.abs(r).max():.4f}  "
                 + " ".join(f"{k}={v:.3f}" for k, v in zip(self.knobs, x[:G]))
                 + "  skew=" + "/".join(f"{v:.2f}" for v in x[G:])
                 + (f"  profile gap {self._gap(prof):.3f}" if self.o.profile else ""))

    def _gap(self, prof) -> float:
        return float(np.abs(prof - self.prof_t).sum(axis=1).mean())

    # -- stage 1: global knobs and per-layer Zipf skew (then hidden_dim again at the fitted knobs) -------
    def _stage_zipf(self, x):
        budget = self.max_evals if not self.o.profile else int(self.max_evals * 0.6)
        x, r, s, prof = self._solve(x, None, self.G + self.L, budget, "zipf")
        if self.fit_dim:
            p_now = self.params_of(x).model_dump()
            d = self.choose_dim({k: v for k, v in p_now.items() if k != "hidden_dim"})
            if d != self.fixed["hidden_dim"]:
                self.say(f"  hidden_dim {self.fixed['hidden_dim']} -> {d} at the fitted knobs")
                self.fixed["hidden_dim"] = d
                x, r, s, prof = self._solve(x, None, self.G + self.L, budget, "zipf")
        self.history.append({"stage": "zipf", "evaluations": self.evals,
                             "max_abs_residual": round(float(np.abs(r).max()), 5)})
        return x, r, s, prof

    # -- stage 2: per-rank bias correction (popularity shape), alternating with the global knobs -------
    def _stage_profile(self, x, r, s, prof):
        """Kept only if it lowers the score (residuals² + 10·profile gap²) of the stage-1 result."""
        def score(r_, prof_) -> float:
            return float(r_ @ r_) + self._gap(prof_) ** 2 * 10

        eps = 0.5 / max(self.tr.tokens * self.K, 1)
        rb = np.zeros((self.L, self.E))
        best = (score(r, prof), x.copy(), None, r, s, prof)
        worse = 0
        while self.evals + 2 <= self.max_evals and worse < 1:
            # damped fixed point: move each rank's bias by the log-ratio of the target and simulated shares
            rb = np.clip(rb + 0.5 * (np.log(self.prof_t + eps) - np.log(prof + eps)), -RANK_BIAS_MAX, RANK_BIAS_MAX)
            rb -= rb.mean(axis=1, keepdims=True)
            rbt = tuple(tuple(float(round(v, 4)) for v in row) for row in rb)
            r, s, prof = self.residual(x, rbt)
            self._note("profile", x, r, prof)
            if np.abs(r).max() > self.o.tol and self.evals + self.G + 2 <= self.max_evals:
                x, r, s, prof = self._solve(x, rbt, self.G, self.evals + self.G + 2, "global")
            sc = score(r, prof)
            if sc < best[0]:
                best, worse = (sc, x.copy(), rbt, r, s, prof), 0
            else:
                worse += 1
        _, x, rank_bias, r, s, prof = best
        self.history.append({"stage": "profile", "evaluations": self.evals,
                             "max_abs_residual": round(float(np.abs(r).max()), 5),
                             "profile_gap": round(self._gap(prof), 5), "kept": rank_bias is not None})
        return x, rank_bias, s

    # -- check: held-out requests ------------------------------------------------------------------------
    def _check(self, params: SyntheticParams) -> dict:
        train_real = compare_stats(self.tr)
        caps = train_real["capacities"]
        out = {"train_real": train_real, "heldout_real": compare_stats(self.ho, capacities=caps),
               "heldout_synthetic": {}, "train_synthetic": {}}
        if self.o.check:   # else an inner (warm-start) fit: its caller checks
            out["heldout_synthetic"] = simulated_stats(self.shape, params, self.ho, self.eval_seeds, self.use_pre,
                                                       full=True, capacities=caps)
            out["train_synthetic"] = simulated_stats(self.shape, params, self.tr, self.fit_seeds, self.use_pre,
                                                     full=True, capacities=caps)
        return out

    def run(self) -> FitResult:
        x = self._start()
        self._set_objective()
        x, r, s, prof = self._stage_zipf(x)
        rank_bias = None
        if self.o.profile:
            x, rank_bias, s = self._stage_profile(x, r, s, prof)
        # rounded as the preset file stores them, so that the file holds exactly what is checked below
        params = SyntheticParams(**_plain(self.params_of(x, rank_bias).model_dump(exclude_none=True)))
        return self._result(params, s, rank_bias)

    def _result(self, params: SyntheticParams, achieved: dict, rank_bias) -> FitResult:
        real, o, n = self.real, self.o, self.real.n_requests
        typical = {"requests": int(n), "prompt_len": int(np.median(real.prompt_lens)),
                   "decode_len": int(np.median(real.decode_lens))}
        rid = real.request_ids if real.request_ids is not None else np.arange(n)
        fitted = self.knobs + (["hidden_dim"] if self.dim_fitted else []) + ["popularity_skew (per layer)"] \
            + (["rank_bias (per layer and rank)"] if rank_bias is not None else [])
        fixed = {k: v for k, v in self.fixed.items() if not (self.dim_fitted and k == "hidden_dim")}
        file = self.file
        return FitResult(
            params=params, model=self.shape.name, shape=self.shape, trace=str(file),
            trace_sha256=file_sha256(file) if file else "", source=real.meta.get("source"), seed=o.seed,
            holdout=o.holdout, split=o.split, train_ids=[int(rid[i]) for i in self.train],
            heldout_ids=[int(rid[i]) for i in self.held], fitted=fitted, fixed=fixed, targets=self.targets,
            achieved=achieved, replicates=self.replicates, eval_replicates=o.eval_replicates,
            evaluations=self.evals, seconds=time.perf_counter() - self.t0, typical=typical, history=self.history,
            target_of={k: self.target_of[k] for k in self.knobs}, **self._check(params))


def fit_routing(real: Routing, *, log=None, trace_path: str | None = None, **options) -> FitResult:
    """Fit SyntheticParams to `real` (module docstring); `options` are FitOptions' fields (a knob given is fixed
    instead of fitted). `log`: a callable for progress lines. Bad options are an InputError naming the field."""
    return _Fit(real, build(FitOptions, options), log=log, trace_path=trace_path).run()


def fit_trace(path, **kw) -> FitResult:
    """Fit the generator to the trace file at `path` (InputError naming the file when it is bad)."""
    real = load_routing(path)
    return fit_routing(real, trace_path=str(path), **kw)

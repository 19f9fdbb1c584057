"""Statistics for comparing two traces (`moesim trace info A B`, `moesim trace fit`).

Computed on in-memory routing (`Routing`: one `[tokens, layers, top_k]` array per request), so the
fitter can score synthetic traces without writing them. Every statistic is identity-free (it does
not care which expert id is which), so a synthetic trace can match a real one:

- ``entropy``: per layer, the entropy of the expert-selection frequencies divided by log2(E)
  (1 = uniform popularity).
- ``overlap_1``: mean over tokens t >= 1 and layers of |S_t ∩ S_{t-1}| / K, S_t the token's top-k set
  at that layer (consecutive tokens of a request).
- ``overlap_1_sd``: the standard deviation across requests of each request's ``overlap_1`` (requests
  differ in locality: a looping greedy decode is far more local than a prompt).
- ``overlap_8``: mean over tokens t >= 8 and layers of the share of S_t that any of tokens t-8..t-1
  used at that layer (an 8-token working set).
- ``markov_recall``: next-layer recall@k of a first-order Markov predictor: counts C_l[a, b] of expert a
  at layer l and b at layer l+1 in the same token; the prediction for layer l+1 is the k experts with
  the largest sum of C_l[a, ·] over the token's experts a at layer l (ties by popularity). Fitted on half
  of the requests and scored on the other half, and back (2-fold by request position), so a bigger
  trace trains a better predictor: compare traces of similar size. ``markov_baseline``: the same with
  popularity alone (the k most used experts of layer l+1 in the fitting half).
- ``reuse_p50/p90/p99`` and ``reuse_mean``: tokens between successive uses of a (layer, expert) by a
  request (first touches excluded); percentiles interpolated between integers (each distance d spread
  evenly over [d-1/2, d+1/2]) so that they move smoothly.
- ``lru_miss@C`` / ``belady_miss@C``: miss ratio of an LRU / Belady cache of C experts per layer, each
  layer's stream (the requests one after another, a token's k experts in gate order) replayed by
  `moesim.cache.replay`; the mean over layers, per layer in ``per_layer``. Capacities default to
  E/8, E/4, E/2 (at least k).
- ``probe_recall`` (traces with ``pre_attn`` only): recall@k of a per-layer ridge regression from the
  standardised pre-attention vector to the multi-hot expert set, 2-fold by request as above — how much
  of a layer's routing its pre-attention state gives away.
- ``probe_next_recall``: the same probe predicting layer l+1's experts from layer l's pre_attn (what a
  speculative next-layer prefetcher sees); ``pre_attn_dim``: participation ratio (sum λ)²/sum λ² of the
  standardised pre_attn covariance (its effective dimension).
- ``top1_repeat``: how often a token's first expert repeats the previous token's (not fitted; shown).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..cache.replay import replay
from ..errors import InputError
from .io import TraceReader

WINDOW = 8
PROBE_RIDGE = 0.03  # ridge penalty per sample on standardised features (see _probe)


@dataclass
class Routing:
    """The routing of a set of requests, in memory."""

    num_layers: int
    num_experts: int
    top_k: int
    experts: list[np.ndarray]                  # per request: [T, L, K] ints, prompt tokens first
    prompt_lens: np.ndarray                    # per request
    pre_attn: list[np.ndarray] | None = None   # per request: [T, L, D] float
    file: str | None = None
    model: str | None = None
    request_ids: np.ndarray | None = None
    meta: dict = field(default_factory=dict)

    @property
    def n_requests(self) -> int:
        return len(self.experts)

    @property
    def lengths(self) -> np.ndarray:
        return np.array([e.shape[0] for e in self.experts], dtype=np.int64)

    @property
    def decode_lens(self) -> np.ndarray:
        return self.lengths - self.prompt_lens

    @property
    def tokens(self) -> int:
        return int(self.lengths.sum())

    def subset(self, idx) -> Routing:
        idx = [int(i) for i in idx]
        return Routing(self.num_layers, self.num_experts, self.top_k, [self.experts[i] for i in idx],
                       self.prompt_lens[idx].copy(),
                       [self.pre_attn[i] for i in idx] if self.pre_attn is not None else None,
                       self.file, self.model,
                       self.request_ids[idx].copy() if self.request_ids is not None else None, dict(self.meta))


def load_routing(path, pre_attn: bool | None = None) -> Routing:
    """Read a trace file into memory (`pre_attn`: read that column; default when the file has it).
    Errors are InputError naming the file."""
    path = str(path)
    if not Path(path).is_file():
        raise InputError("trace file not found", file=path)
    reader = TraceReader(path)
    m = reader.meta
    want = reader.has_pre_attn if pre_attn is None else bool(pre_attn and reader.has_pre_attn)
    ex, pl, pa_, rid = [], [], [], []
    for r in reader.iter_requests(pre_attn=want, scores=False):
        ex.append(r.experts.astype(np.int64))
        pl.append(r.prompt_len)
        rid.append(r.request_id)
        if want:
            pa_.append(np.asarray(r.pre_attn, dtype=np.float32))
    if not ex:
        raise InputError("the trace has no requests", file=path)
    return Routing(m.num_layers, m.num_experts, m.top_k, ex, np.array(pl, dtype=np.int64), pa_ if want else None,
                   path, m.model, np.array(rid, dtype=np.int64),
                   {"source": m.source, "seed": m.seed, "has_pre_attn": reader.has_pre_attn})


def routing_from_table(table, num_layers: int, num_experts: int, top_k: int, prompt_lens, decode_lens,
                       pre_attn: bool = False) -> Routing:
    """A generated table (rows in request, token, layer order, lengths known) as Routing."""
    L, K = num_layers, top_k
    prompt_lens = np.asarray(prompt_lens, dtype=np.int64)
    totals = prompt_lens + np.asarray(decode_lens, dtype=np.int64)
    flat = table.column("experts").combine_chunks().flatten().to_numpy().astype(np.int64)
    cuts = np.cumsum(totals)[:-1]
    ex = np.split(flat.reshape(-1, L, K), cuts)
    pre = None
    if pre_attn:
        col = table.column("pre_attn").combine_chunks()
        vals = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
        pre = np.split(vals.reshape(int(totals.sum()), L, -1), cuts)
    return Routing(L, num_experts, K, list(ex), prompt_lens, pre)


# ---- statistics ---------------------------------------------------------------------------------

def default_capacities(num_experts: int, top_k: int) -> list[int]:
    caps = sorted({max(top_k, num_experts // f) for f in (8, 4, 2)})
    return [c for c in caps if c < num_experts] or [num_experts]


def _occupancy(ex: np.ndarray, E: int) -> np.ndarray:
    """[T, L, K] expert ids -> [T, L, E] bool."""
    T, L, _ = ex.shape
    occ = np.zeros((T, L, E), dtype=bool)
    np.put_along_axis(occ, ex, True, axis=2)
    return occ


def _interp_pct(hist: np.ndarray, q: float) -> float | None:
    """q-quantile of integer data with histogram `hist`, each value d spread over [d-1/2, d+1/2]."""
    tot = hist.sum()
    if tot == 0:
        return None
    cdf = np.cumsum(hist) / tot
    d = int(np.searchsorted(cdf, q, side="left"))
    below = cdf[d - 1] if d > 0 else 0.0
    frac = (q - below) / max(cdf[d] - below, 1e-300)
    return float(d - 0.5 + frac)


def _topk_rows(score: np.ndarray, k: int) -> np.ndarray:
    if k >= score.shape[-1]:
        return np.broadcast_to(np.arange(score.shape[-1]), score.shape).copy()
    return np.argpartition(-score, k - 1, axis=-1)[..., :k]


def _folds(n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    idx = np.arange(n)
    a, b = idx[idx % 2 == 0], idx[idx % 2 == 1]
    return [(a, b), (b, a)] if len(b) else []


def _markov(occs: list[np.ndarray], L: int, E: int, K: int) -> tuple[float | None, float | None, list]:
    if L < 2:
        return None, None, []
    folds = _folds(len(occs))
    if not folds:
        return None, None, []
    # per request: C_r[l, a, b] and the popularity of each layer
    f32 = [o.astype(np.float32).transpose(1, 0, 2) for o in occs]            # [L, T, E]
    C = np.stack([f[:-1].transpose(0, 2, 1) @ f[1:] for f in f32])          # [R, L-1, E, E] (exact: counts < 2**24)
    pop = np.stack([o.sum(axis=0) for o in occs]).astype(np.float64)       # [R, L, E]
    hit = np.zeros(L - 1)
    hitb = np.zeros(L - 1)
    n = 0
    for fit, test in folds:
        Cf = C[fit].sum(axis=0, dtype=np.float64)                          # [L-1, E, E]
        pf = pop[fit].sum(axis=0)[1:]                                      # [L-1, E] popularity of layer l+1
        tie = (pf / (pf.max(axis=1, keepdims=True) + 1.0) * 1e-3)[:, None, :]   # < 1: breaks ties only
        base = _topk_rows(pf, K)                                           # [L-1, K]
        for r in test:
            f = f32[r]
            score = f[:-1].astype(np.float64) @ Cf + tie                   # [L-1, T, E]
            pred = _topk_rows(score, K)                                    # [L-1, T, K]
            nxt = occs[r][:, 1:].transpose(1, 0, 2)                        # [L-1, T, E]
            hit += np.take_along_axis(nxt, pred, axis=2).sum(axis=(1, 2))
            hitb += np.take_along_axis(nxt, np.broadcast_to(base[:, None, :], pred.shape), axis=2).sum(axis=(1, 2))
            n += f.shape[1]
    per = hit / (n * K)
    return float(per.mean()), float((hitb / (n * K)).mean()), per.tolist()


def _probe(routing: Routing, occs: list[np.ndarray], shift: int = 0) -> tuple[float | None, list]:
    """Per-layer ridge probe from pre_attn at layer l to the multi-hot experts at layer l + shift,
    recall@k, 2-fold by request."""
    if routing.pre_attn is None:
        return None, []
    L, K = routing.num_layers, routing.top_k
    folds = _folds(routing.n_requests)
    if not folds or L - shift < 1:
        return None, []
    P = L - shift
    hit = np.zeros(P)
    n = 0
    for fit, test in folds:
        Xf = np.concatenate([routing.pre_attn[i][:, :P] for i in fit]).astype(np.float64).transpose(1, 0, 2)
        Yf = np.concatenate([occs[i][:, shift:] for i in fit]).astype(np.float64).transpose(1, 0, 2)
        Xt = np.concatenate([routing.pre_attn[i][:, :P] for i in test]).astype(np.float64).transpose(1, 0, 2)
        Yt = np.concatenate([occs[i][:, shift:] for i in test]).transpose(1, 0, 2)          # [P, Nt, E]
        _, N, D = Xf.shape
        mu, sd = Xf.mean(axis=1, keepdims=True), Xf.std(axis=1, keepdims=True) + 1e-6
        x = (Xf - mu) / sd
        ym = Yf.mean(axis=1, keepdims=True)
        xt = x.transpose(0, 2, 1)
        gram = xt @ x + PROBE_RIDGE * N * np.eye(D)[None]
        w = np.linalg.solve(gram, xt @ (Yf - ym))
        s = ((Xt - mu) / sd) @ w + ym
        pred = _topk_rows(s, K)
        hit += np.take_along_axis(Yt, pred, axis=2).sum(axis=(1, 2))
        n += Xt.shape[1]
    per = hit / (n * K)
    return float(per.mean()), per.tolist()


def _participation(routing: Routing) -> tuple[float, list]:
    """Participation ratio (sum λ)² / sum λ² of the standardised pre_attn's covariance, per layer: its
    effective dimension (a synthetic trace's pre_attn is `hidden_dim`-dimensional, less at small sizes)."""
    X = np.concatenate(routing.pre_attn).astype(np.float64).transpose(1, 0, 2)   # [L, N, D]
    X = (X - X.mean(axis=1, keepdims=True)) / (X.std(axis=1, keepdims=True) + 1e-6)
    C = X.transpose(0, 2, 1) @ X / max(X.shape[1] - 1, 1)
    tr = np.trace(C, axis1=1, axis2=2)
    pr = tr ** 2 / np.maximum((C * C).sum(axis=(1, 2)), 1e-300)
    return float(pr.mean()), pr.tolist()


def popularity_profile(routing: Routing) -> np.ndarray:
    """[L, E]: each layer's expert shares, sorted in decreasing order."""
    counts = sum(_occupancy(e, routing.num_experts).sum(axis=0) for e in routing.experts).astype(np.float64)
    return -np.sort(-counts / np.maximum(counts.sum(axis=1, keepdims=True), 1), axis=1)


def compare_stats(routing: Routing, capacities=None, cache: bool = True, probe: bool = True,
                  reuse: bool = True) -> dict:
    """The statistics above as a dict: scalar entries, plus ``per_layer`` (lists) and ``capacities``."""
    L, E, K = routing.num_layers, routing.num_experts, routing.top_k
    occs = [_occupancy(e, E) for e in routing.experts]
    counts = np.zeros((L, E), dtype=np.int64)
    ov1 = np.zeros(L)
    n1 = 0
    ov8 = np.zeros(L)
    n8 = 0
    rep = np.zeros(L)
    per_req = []
    for e, o in zip(routing.experts, occs):
        T = o.shape[0]
        counts += o.sum(axis=0)
        if T > 1:
            c = (o[1:] & o[:-1]).sum(axis=(0, 2))
            ov1 += c
            per_req.append(c.sum() / ((T - 1) * L * K))
            rep += (e[1:, :, 0] == e[:-1, :, 0]).sum(axis=0)
            n1 += T - 1
        if T > WINDOW:
            cs = np.concatenate([np.zeros((1, L, E), dtype=np.int32), np.cumsum(o, axis=0, dtype=np.int32)])
            win = cs[WINDOW:T] - cs[: T - WINDOW]                     # uses in tokens t-8..t-1, t = 8..T-1
            ov8 += (o[WINDOW:] & (win > 0)).sum(axis=(0, 2))
            n8 += T - WINDOW
    p = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.where(p > 0, p * np.log2(np.where(p > 0, p, 1.0)), 0.0).sum(axis=1)
    ent_n = ent / np.log2(E) if E > 1 else np.ones(L)
    out: dict = {"requests": routing.n_requests, "tokens": routing.tokens}
    per: dict = {}
    out["entropy"] = float(ent_n.mean())
    per["entropy"] = ent_n.tolist()
    out["hottest_share"] = float(p.max(axis=1).mean())
    out["overlap_1"] = float(ov1.sum() / (n1 * L * K)) if n1 else None
    per["overlap_1"] = (ov1 / (n1 * K)).tolist() if n1 else []
    out["overlap_1_sd"] = float(np.std(per_req)) if len(per_req) > 1 else None
    out["overlap_8"] = float(ov8.sum() / (n8 * L * K)) if n8 else None
    per["overlap_8"] = (ov8 / (n8 * K)).tolist() if n8 else []
    out["top1_repeat"] = float(rep.sum() / (n1 * L)) if n1 else None
    mk, mb, mper = _markov(occs, L, E, K)
    out["markov_recall"], out["markov_baseline"] = mk, mb
    per["markov_recall"] = mper
    if probe and routing.pre_attn is not None:
        out["probe_recall"], per["probe_recall"] = _probe(routing, occs)
        out["probe_next_recall"], per["probe_next_recall"] = _probe(routing, occs, shift=1)
        out["pre_attn_dim"], per["pre_attn_dim"] = _participation(routing)
    if reuse:
        hist = np.zeros(1, dtype=np.int64)
        lay_off = (np.arange(L, dtype=np.int64) * E)[None, :, None]
        for e in routing.experts:
            keys = (e + lay_off).reshape(-1)
            tt = np.broadcast_to(np.arange(e.shape[0], dtype=np.int64)[:, None, None], e.shape).reshape(-1)
            order = np.lexsort((tt, keys))
            ks, ts = keys[order], tt[order]
            d = (ts[1:] - ts[:-1])[ks[1:] == ks[:-1]]
            if d.size:
                h = np.bincount(d)
                if h.size > hist.size:
                    hist = np.concatenate([hist, np.zeros(h.size - hist.size, dtype=np.int64)])
                hist[: h.size] += h
        for q in (50, 90, 99):
            out[f"reuse_p{q}"] = _interp_pct(hist, q / 100)
        out["reuse_mean"] = float((np.arange(hist.size) * hist).sum() / hist.sum()) if hist.sum() else None
    if cache:
        caps = list(capacities) if capacities is not None else default_capacities(E, K)
        out["capacities"] = caps
        for l_policy in ("lru", "belady"):
            for c in caps:
                vals = []
                for l in range(L):
                    stream = np.concatenate([e[:, l, :].reshape(-1) for e in routing.experts])
                    vals.append(replay(stream, int(c), l_policy).miss_ratio)
                out[f"{l_policy}_miss@{c}"] = float(np.mean(vals))
                per[f"{l_policy}_miss@{c}"] = vals
    out["per_layer"] = per
    return out


#: statistics shown by `trace info A B`, in order, with a label
LABELS = {
    "entropy": "popularity entropy / log2(E)",
    "hottest_share": "hottest expert's share",
    "overlap_1": "overlap, consecutive tokens",
    "overlap_1_sd": "  its spread across requests (sd)",
    "overlap_8": f"overlap with previous {WINDOW} tokens",
    "top1_repeat": "top-1 repeat, consecutive tokens",
    "markov_recall": "next-layer recall@k, Markov (2-fold)",
    "markov_baseline": "next-layer recall@k, popularity",
    "probe_recall": "same-layer recall@k, pre_attn probe",
    "probe_next_recall": "next-layer recall@k, pre_attn probe",
    "pre_attn_dim": "pre_attn participation ratio",
    "reuse_p50": "reuse distance p50 (tokens)",
    "reuse_p90": "reuse distance p90",
    "reuse_p99": "reuse distance p99",
    "reuse_mean": "reuse distance mean",
}


def scalar_keys(stats: dict) -> list[str]:
    keys = [k for k in LABELS if stats.get(k) is not None]
    keys += [k for k in stats if ("_miss@" in k)]
    return keys


def label(key: str) -> str:
    if key in LABELS:
        return LABELS[key]
    pol, cap = key.split("_miss@")
    return f"{'LRU' if pol == 'lru' else 'Belady'} miss @{cap} experts/layer"


def rel_err(a, b) -> float | None:
    """|b - a| / |a| (None when either is missing or a is 0)."""
    if a is None or b is None or a == 0:
        return None
    return abs(float(b) - float(a)) / abs(float(a))


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _fmt_list(vals) -> str:
    return " ".join(f"{v:.3f}" if v < 10 else f"{v:.1f}" for v in vals) if vals else "-"


def comparison(path_a, path_b) -> dict:
    """Both traces' statistics (for `trace info A B --json`)."""
    out = {}
    for key, p in (("a", path_a), ("b", path_b)):
        r = load_routing(p)
        s = compare_stats(r)
        out[key] = {"file": str(p), "model": r.model, "source": r.meta.get("source"), "num_layers": r.num_layers,
                    "num_experts": r.num_experts, "top_k": r.top_k, **s}
    return out

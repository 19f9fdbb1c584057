"""What the routing fit (`moesim.traces.fit`) works on: synthetic traces shaped like the real requests, the
mean of their statistics, and the seeded split of the real requests into training and held-out halves."""
from __future__ import annotations

import numpy as np

from ..errors import InputError
from .compare_stats import Routing, compare_stats, routing_from_table
from .fit_result import RoutingShape
from .synthetic import SyntheticParams, generate


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

"""Trace → training samples (numpy only; no torch here).

`load_trace` reads a Parquet trace into memory (one `Req` per request). `split_requests` splits the
request ids into train / val / test (by request, seeded). The sample builders turn requests into
flat arrays:

- speculation: one sample per (token t, anchor layer a) — the `C` most recent routed positions of
  the request's (token, layer) stream ending at (t, a), left-padded — with targets at offsets
  d = 1..H further down that stream. Only what is routed at the gate of layer a is used (see
  `known_slots`): a prefill token's context never reaches into the previous token (in a prefill
  step the previous token's later layers are not routed yet), a decode token's may (the previous
  token finished in the previous step). A target past the last layer (the next token's first
  layers) is kept only from the last prompt token on (inside a prefill step the next token is
  routed in the same step). With `prev_tokens` = P > 0 (an extension) the context also holds the
  layers a-C+1 .. a+H of the P previous tokens, as far as they are routed at that gate.
- pre-attention: one sample per (token, layer): the `pre_attn` vector and the routed set.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ...errors import InputError
from ...traces.io import file_sha256


@dataclass
class Req:
    request_id: int
    prompt_len: int
    experts: np.ndarray                 # [T, L, K] int16, gate order
    pre_attn: np.ndarray | None = None  # [T, L, d] float16
    scores: np.ndarray | None = None    # [T, L, W] float32

    @property
    def tokens(self) -> int:
        return int(self.experts.shape[0])


@dataclass
class TraceData:
    path: str
    meta: dict
    fingerprint: str
    requests: list[Req] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, int, int]:
        return int(self.meta["num_layers"]), int(self.meta["num_experts"]), int(self.meta["top_k"])

    def by_id(self) -> dict[int, Req]:
        return {r.request_id: r for r in self.requests}


def load_trace(path, pre_attn: bool = False, scores: bool = False) -> TraceData:
    """Read every request of a trace (in memory). `pre_attn=True`: the column is required
    (InputError naming the file and the column otherwise)."""
    from dataclasses import asdict

    from ...traces import TraceReader

    reader = TraceReader(path)
    if pre_attn and not reader.has_pre_attn:
        raise InputError("the trace has no pre_attn column, which the pre-attention predictor needs "
                         "(synthetic traces: `moesim trace generate --pre-attn`)", file=str(path), field="pre_attn")
    reqs = [Req(r.request_id, r.prompt_len, r.experts, r.pre_attn if pre_attn else None,
                r.scores if scores else None)
            for r in reader.iter_requests(pre_attn=pre_attn, scores=scores and reader.has_scores)]
    if not reqs:
        raise InputError("the trace has no requests", file=str(path))
    return TraceData(str(path), asdict(reader.meta), file_sha256(path), reqs)


def split_requests(ids, test_fraction: float, val_fraction: float, seed: int) -> dict[str, list[int]]:
    """Seeded split of request ids into train / val / test (each request in exactly one)."""
    ids = np.array(sorted(int(i) for i in ids), dtype=np.int64)
    n = len(ids)
    n_test = max(1, int(round(test_fraction * n)))
    n_val = max(1, int(round(val_fraction * n))) if val_fraction > 0 else 0
    if n - n_test - n_val < 1:
        raise InputError(f"{n} request(s) cannot be split into train / val / test "
                         f"(test_fraction {test_fraction}, val_fraction {val_fraction}); "
                         "a held-out split by request needs at least 3 requests", field="requests")
    perm = ids[np.random.default_rng(seed).permutation(n)]
    return {"test": sorted(perm[:n_test].tolist()), "val": sorted(perm[n_test:n_test + n_val].tolist()),
            "train": sorted(perm[n_test + n_val:].tolist())}


# ---- a flat view of many requests --------------------------------------------------------------

@dataclass
class Flat:
    """Requests concatenated along tokens: routing[g] is global token g = offset[i] + t."""

    routing: np.ndarray   # [G, L, K] int64
    offset: np.ndarray    # [R] first global token of each request
    tokens: np.ndarray    # [R]
    prompt: np.ndarray    # [R]
    ids: np.ndarray       # [R] request ids


def flatten(reqs: list[Req]) -> Flat:
    tokens = np.array([r.tokens for r in reqs], dtype=np.int64)
    offset = np.concatenate([[0], np.cumsum(tokens)[:-1]]).astype(np.int64)
    routing = np.concatenate([r.experts for r in reqs], axis=0).astype(np.int64)
    return Flat(routing, offset, tokens, np.array([r.prompt_len for r in reqs], dtype=np.int64),
                np.array([r.request_id for r in reqs], dtype=np.int64))


class _Rows:
    """Samples stored as arrays with one row per sample (the first field's rows)."""

    def __len__(self) -> int:
        return int(next(iter(self.__dict__.values())).shape[0])

    def subset(self, idx: np.ndarray):
        """The samples `idx` (rows of every array field; other fields shared)."""
        return type(self)(**{k: (v[idx] if isinstance(v, np.ndarray) else v) for k, v in self.__dict__.items()})


# ---- speculation samples -------------------------------------------------------------------------

@dataclass
class SpecSamples(_Rows):
    """N anchors; C context slots (left-padded, newest last); H offsets."""

    ctx_e: np.ndarray      # [N, C, K] expert ids (0 where padded)
    ctx_l: np.ndarray      # [N, C] layer of each context slot (0 where padded)
    ctx_t: np.ndarray      # [N, C] token index of each slot (within its request)
    ctx_mask: np.ndarray   # [N, C] bool, slot holds routing
    tgt_l: np.ndarray      # [N, H] target layer (0 where invalid)
    tgt_e: np.ndarray      # [N, H, K] target routing (gate order)
    tgt_mask: np.ndarray   # [N, H] bool
    req: np.ndarray        # [N] index into the request list
    tok: np.ndarray        # [N] anchor token
    anchor: np.ndarray     # [N] anchor layer
    tgt_tok: np.ndarray    # [N, H] target token (global index into Flat.routing via offset)
    flat: Flat


def slot_offsets(num_layers: int, context_length: int, horizon: int, prev_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Stream offsets of the context slots relative to the anchor (token t, layer a) = stream
    position t*L + a, oldest first, and whether each is a main slot. Extra slots (prev_tokens > 0):
    the layers a-C+1 .. a+H of each of the P previous tokens; then the C main slots a-C+1 .. a."""
    L, C, H, P = num_layers, context_length, horizon, prev_tokens
    extra = [np.arange(-(C - 1), H + 1) - p * L for p in range(P, 0, -1)]
    main = np.arange(-(C - 1), 1)
    offs = np.concatenate(extra + [main]).astype(np.int64)
    return offs, np.r_[np.zeros(offs.size - C, dtype=bool), np.ones(C, dtype=bool)]


def known_slots(S: np.ndarray, t: np.ndarray, a: np.ndarray, decode: np.ndarray, main: np.ndarray, L: int,
                cross_token: bool) -> np.ndarray:
    """Which stream positions S [N, c] of a request are routed at the gate of layer a of token t:
    the token's own layers <= a; earlier tokens' layers <= a in a prefill step (its tokens advance
    layer by layer together), all their layers in a decode step (they finished in earlier steps).
    Main slots reach back one token at most (none without cross_token)."""
    tok, lay = S // L, S % L
    t, a, decode = t[:, None], a[:, None], decode[:, None]
    ok = (S >= 0) & (((tok == t) & (lay <= a)) | ((tok < t) & (decode | (lay <= a))))
    lo = t - (1 if cross_token else 0)
    return ok & (~main[None, :] | (tok >= lo))


def speculation_samples(reqs: list[Req], num_layers: int, context_length: int, horizon: int,
                        cross_token: bool = True, prev_tokens: int = 0) -> SpecSamples:
    L, C, H = num_layers, context_length, horizon
    flat = flatten(reqs)
    R = len(reqs)
    # anchors: every (request, token, layer)
    req = np.repeat(np.arange(R), flat.tokens * L)
    local = np.concatenate([np.arange(T * L) for T in flat.tokens.tolist()]) if R else np.zeros(0, np.int64)
    tok, anchor = local // L, local % L
    decode = tok >= flat.prompt[req]
    stream_len = flat.tokens[req] * L
    offs, main = slot_offsets(L, C, H, prev_tokens)
    pos = local[:, None] + offs[None, :]                                # [N, c]
    ctx_mask = known_slots(pos, tok, anchor, decode, main, L, cross_token)
    posc = np.where(ctx_mask, pos, local[:, None])
    g = flat.offset[req][:, None] + posc // L
    ctx_e = np.where(ctx_mask[..., None], flat.routing[g, posc % L], 0)
    ctx_l = np.where(ctx_mask, posc % L, 0)
    ctx_t = np.where(ctx_mask, posc // L, 0)
    # targets
    q = local[:, None] + np.arange(1, H + 1)[None, :]               # [N, H]
    tmask = q < stream_len[:, None]
    crosses = (q // L) > tok[:, None]
    if cross_token:
        wrap_ok = tok >= flat.prompt[req] - 1       # last prompt token or a decode token
        tmask &= ~crosses | wrap_ok[:, None]
    else:
        tmask &= ~crosses
    qc = np.where(tmask, q, local[:, None])
    tgt_tok = flat.offset[req][:, None] + qc // L
    tgt_e = flat.routing[tgt_tok, qc % L]
    tgt_l = np.where(tmask, qc % L, 0)
    keep = tmask.any(axis=1)
    s = SpecSamples(ctx_e.astype(np.int64), ctx_l.astype(np.int64), ctx_t.astype(np.int64), ctx_mask,
                    tgt_l.astype(np.int64), tgt_e.astype(np.int64), tmask, req, tok, anchor, tgt_tok, flat)
    return s.subset(np.flatnonzero(keep)) if not keep.all() else s


# ---- pre-attention samples -----------------------------------------------------------------------

@dataclass
class PreSamples(_Rows):
    x: np.ndarray          # [N, d] float16
    layer: np.ndarray      # [N]
    tgt_e: np.ndarray      # [N, K]
    scores: np.ndarray | None  # [N, W] gate scores when the trace has them
    req: np.ndarray        # [N]
    tok: np.ndarray        # [N]
    flat: Flat


def pre_attention_samples(reqs: list[Req]) -> PreSamples:
    for r in reqs:
        if r.pre_attn is None:
            raise InputError("request has no pre_attn", field="pre_attn")
    flat = flatten(reqs)
    G, L, K = flat.routing.shape
    x = np.concatenate([r.pre_attn for r in reqs], axis=0)           # [G, L, d]
    d = x.shape[2]
    has_scores = all(r.scores is not None for r in reqs)
    scores = np.concatenate([r.scores for r in reqs], axis=0).reshape(G * L, -1) if has_scores else None
    req = np.repeat(np.repeat(np.arange(len(reqs)), flat.tokens), L)
    tok = np.repeat(np.concatenate([np.arange(T) for T in flat.tokens.tolist()]), L)
    return PreSamples(x.reshape(G * L, d), np.tile(np.arange(L), G), flat.routing.reshape(G * L, K),
                      scores, req, tok, flat)


def select_requests(data: TraceData, ids) -> list[Req]:
    by = data.by_id()
    missing = [i for i in ids if i not in by]
    if missing:
        raise InputError(f"request id(s) {missing[:5]} of the checkpoint's split are not in this trace",
                         file=data.path, field="request_id")
    return [by[i] for i in ids]


def trace_summary(data: TraceData) -> dict:
    return {"path": str(data.path), "abs_path": str(Path(data.path).resolve()), "fingerprint": data.fingerprint,
            "meta": data.meta,
            "requests": len(data.requests), "tokens": int(sum(r.tokens for r in data.requests))}

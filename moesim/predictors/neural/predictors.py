"""The two learned predictors as engine predictors: `speculation` and `pre_attention`.

This module does not import torch: the parameters are validated when a scenario loads, and torch
is imported only when the predictor is built (engine start). Both run one batched forward per
hook call, under `torch.no_grad()`, over every token of the step.

- `speculation` — at `gate(l)` the routing of layers <= l of the step's tokens is known; the model
  sees each token's `context_length` most recent routed layers (a decode token's context reaches
  into its previous token, remembered from the previous step) and predicts layers l+1 .. l+h.
  Targets past the last layer are the next step's first layers (the requests' next tokens; in a
  prefill step only each request's last prompt token predicts them).
- `pre_attention` — at `pre_attention(l)` the model of layer l reads each token's pre-attention
  hidden state and predicts layer l's experts, for the same step.

Per target layer the batch's prediction is the union, over tokens, of each token's `per_token`
best experts (default: the model's top_k) whose probability is at least `min_prob`; an expert's
score is its probability summed over those tokens (the expected number of tokens routed to it);
at most `max_per_layer` experts, best first.

`checkpoint` is a path string; a relative path is resolved against the current working directory
(not the scenario's directory); `{model}` in it is replaced by the scenario's model name, so one
sweep over several models can name one checkpoint per model. `latency_us` left out: the forward time measured when the
checkpoint was trained (stored in it with the device it was measured on), interpolated at
`latency_tokens` tokens per call; the engine charges it per hook call (`runs_on`: cpu delays the
prefetches, gpu delays the compute stream).
"""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np
from pydantic import Field

from ...errors import InputError
from ..base import Predictor, PredictorParams, Prefetch
from ..registry import register
from ..topk import RequestMemory

FIELD = "predictor.checkpoint"


class NeuralParams(PredictorParams):
    checkpoint: str = Field(description="path of a checkpoint from `moesim predictor train` (relative paths: "
                                        "from the current working directory; `{model}` is replaced by the "
                                        "scenario's model name)")
    latency_us: float | None = Field(None, ge=0, description="inference time charged per hook call "
                                     "(default: measured at training time, stored in the checkpoint)")
    latency_tokens: float = Field(4, gt=0, description="tokens per call at which the stored latency table is read")
    device: str = Field("cpu", description="torch device the model runs on in the simulation")
    threads: int | None = Field(1, ge=1, description="torch CPU threads (process-wide; default 1: a call's tensors "
                                "are tiny, and with more threads on a busy machine a forward waited 10x longer "
                                "for its threads than it computed); null leaves torch's setting")
    per_token: int | None = Field(None, ge=1, description="experts predicted per token (default: top_k)")
    min_prob: float = Field(0.0, ge=0, le=1, description="ignore per-token predictions below this probability")
    max_per_layer: int | None = Field(None, ge=1, description="at most this many experts per predicted layer")
    max_requests: int = Field(65536, ge=1, description="requests whose position / last token is remembered")


class SpeculationParams(NeuralParams):
    lookahead_layers: int | None = Field(None, ge=1, description="predict this many layers ahead "
                                         "(default and maximum: the checkpoint's horizon)")
    min_confidence: float = Field(0.0, ge=0, le=1, description="skip tokens whose confidence head is below this")


class PreAttentionParams(NeuralParams):
    trace: str | None = Field(None, description="trace file to read pre_attn from while the engine does not "
                              "pass it in the step view (the scenario's trace; relative: from the working dir; "
                              "`{model}` as in checkpoint)")


def _resolve(p: str, model_name: str) -> Path:
    return Path(p.replace("{model}", model_name)).expanduser()


class _NeuralPredictor(Predictor):
    kind: ClassVar[str] = ""

    def __init__(self, params, model, rng):
        super().__init__(params, model, rng)
        from . import checkpoint as ckpt_io
        ckpt_io.require_torch()
        import torch

        from .training import latency_at, load_model

        self._torch = torch
        path = _resolve(params.checkpoint, model.name)
        self.ckpt_path = str(path)
        ck = ckpt_io.load(path, kind=self.kind, field=FIELD)
        ckpt_io.check_model(ck, model, str(path))
        self.ckpt = {k: v for k, v in ck.items() if k not in ("model_state", "train_state")}
        try:
            self.device = torch.device(params.device)
        except RuntimeError as e:
            raise InputError(f"bad torch device {params.device!r}: {e}", field="predictor.device") from None
        if params.threads is not None and self.device.type == "cpu":
            torch.set_num_threads(params.threads)
        self.net = load_model(ck, self.device)
        self.cfg = self.net.cfg
        self.L, self.E, self.K = model.num_layers, model.num_experts, model.top_k
        self.sigmoid = getattr(self.cfg, "loss", "ce") != "ce"
        lat = ck.get("latency")
        if params.latency_us is None:
            us = latency_at(lat, params.latency_tokens) if lat else 0.0
            self.params = params.model_copy(update={"latency_us": us})
        self.latency_source = ("scenario" if params.latency_us is not None else
                               f"checkpoint ({lat['device']})" if lat else "none stored (0)")
        self._lat = lat
        self.n = min(params.per_token or self.K, self.E)
        self.positions = RequestMemory(params.max_requests)   # rid -> next token index
        self._step = None
        self.calls = 0

    def latency_for(self, tokens: int) -> float:
        """Measured µs of one call with `tokens` tokens (the stored table; the scenario's value if set)."""
        from .training import latency_at
        if self._lat is None or self.latency_source == "scenario":
            return float(self.params.latency_us)
        return latency_at(self._lat, tokens)

    # -- per step --
    def _begin(self, view) -> bool:
        if view.step == self._step:
            return False
        self._step = view.step
        rids = np.asarray(view.token_request_ids, dtype=np.int64)
        pos = np.zeros(len(rids), dtype=np.int64)
        if len(rids):
            order = np.argsort(rids, kind="stable")
            sr = rids[order]
            starts = np.flatnonzero(np.r_[True, sr[1:] != sr[:-1]])
            counts = np.diff(np.r_[starts, len(sr)])
            occ = np.arange(len(sr)) - np.repeat(starts, counts)
            base = np.array([self.positions.get(int(r), 0) for r in sr[starts]], dtype=np.int64)
            pos[order] = np.repeat(base, counts) + occ
            for r, b, c in zip(sr[starts].tolist(), base.tolist(), counts.tolist()):
                self.positions.put(r, b + c)
        self.rids, self.pos = rids, pos
        last = np.ones(len(rids), dtype=bool)
        if len(rids) > 1:
            last[:-1] = rids[1:] != rids[:-1]
        self.last_rows = last        # each request's last row (rows of a request are contiguous)
        return True

    def _emit(self, out: list, step: int, layer: int, probs: np.ndarray) -> None:
        """probs [T', E] of the tokens asking for (step, layer): union of per-token top-n."""
        if probs.shape[0] == 0:
            return
        n, p = self.n, self.params
        if n < self.E:
            top = np.argpartition(-probs, n - 1, axis=1)[:, :n]
        else:
            top = np.broadcast_to(np.arange(self.E), probs.shape)
        val = np.take_along_axis(probs, top, axis=1)
        keep = val >= p.min_prob
        score = np.zeros(self.E)
        np.add.at(score, top[keep], val[keep])
        order = np.lexsort((np.arange(self.E), -score))
        order = order[score[order] > 0]
        if p.max_per_layer is not None:
            order = order[:p.max_per_layer]
        out.extend(Prefetch(step, layer, int(e), float(score[e])) for e in order)

    def _probs(self, logits):
        t = self._torch
        return (t.sigmoid(logits) if self.sigmoid else t.softmax(logits, dim=-1)).float().cpu().numpy()


@register
class Speculation(_NeuralPredictor):
    """Inter-layer speculation (seeds 000/002) from a trained checkpoint; see the module docstring.
    The context of each token is built with the same rule as the training samples
    (`data.known_slots`): only routing known at this gate."""

    name = "speculation"
    kind = "speculation"
    Params = SpeculationParams

    def __init__(self, params, model, rng):
        super().__init__(params, model, rng)
        from .data import slot_offsets

        cfg = self.cfg
        if params.lookahead_layers is not None and params.lookahead_layers > cfg.horizon:
            raise InputError(f"lookahead_layers {params.lookahead_layers} exceeds the checkpoint's horizon "
                             f"{cfg.horizon}", field="predictor.lookahead_layers")
        self.h = params.lookahead_layers or cfg.horizon
        # previous tokens kept per request: the extra slots of P previous tokens start C-1 layers before
        # the anchor's layer, so they can reach one token further back
        self.P = cfg.prev_tokens + 1 if cfg.prev_tokens else (1 if cfg.cross_token else 0)
        self.offs, self.main = slot_offsets(self.L, cfg.context_length, cfg.horizon, cfg.prev_tokens)
        self.memory = RequestMemory(params.max_requests)   # rid -> routing of its last P tokens [n, L, K]

    def _begin(self, view) -> bool:
        if not super()._begin(view):
            return False
        T, L, K, P = len(self.rids), self.L, self.K, self.P
        self.decode = view.phase != "prefill"
        self.route = np.zeros((T, L, K), dtype=np.int64)
        self.hist = np.zeros((T, P, L, K), dtype=np.int64)      # tokens t-P .. t-1
        self.hist_ok = np.zeros((T, P), dtype=bool)
        if P and self.decode:
            for i, rid in enumerate(self.rids.tolist()):
                r = self.memory.get(rid)
                if r is not None:
                    n = min(P, r.shape[0])
                    self.hist[i, P - n:] = r[-n:]
                    self.hist_ok[i, P - n:] = True
        elif P:  # prefill: the request's earlier rows of this step (rows of a request are contiguous)
            self._src = np.full((T, P), -1, dtype=np.int64)
            for p in range(1, P + 1):
                j = np.arange(T) - p
                ok = j >= 0
                ok[ok] = self.rids[j[ok]] == self.rids[ok]
                self._src[ok, P - p] = j[ok]
                self.hist_ok[:, P - p] = ok
        self.wrap_rows = ((np.ones(T, dtype=bool) if self.decode else self.last_rows) if self.cfg.cross_token
                          else np.zeros(T, dtype=bool))
        return True

    def _context(self, layer: int):
        from .data import known_slots

        T, L, P = len(self.rids), self.L, self.P
        if P and not self.decode:
            src = self._src
            ok = src >= 0
            self.hist[ok] = self.route[src[ok]]
        ext = np.concatenate([self.hist.reshape(T, P * L, self.K), self.route], axis=1)   # [T, (P+1)L, K]
        idx = P * L + layer + self.offs                                                  # [c]
        S = np.broadcast_to(idx, (T, idx.size))
        rel = idx // L - P                                                               # token offset
        exists = np.ones((T, idx.size), dtype=bool)
        past = rel < 0
        if past.any():
            exists[:, past] = self.hist_ok[:, np.clip(P + rel[past], 0, P - 1)] if P else False
        ok = known_slots(S, np.full(T, P), np.full(T, layer), np.full(T, self.decode), self.main, L,
                         self.cfg.cross_token) & exists
        idc = np.clip(idx, 0, ext.shape[1] - 1)
        ctx_e = np.where(ok[..., None], ext[:, idc], 0)
        ctx_l = np.where(ok, (idc % L)[None, :], 0)
        ctx_t = np.where(ok, self.pos[:, None] + rel[None, :], 0)
        return ctx_e, ctx_l, ctx_t, ok

    def on_gate(self, view, layer: int) -> list[Prefetch]:
        self._begin(view)
        te = np.asarray(view.token_experts(layer), dtype=np.int64)
        T = te.shape[0]
        self.route[:, layer] = te
        if T == 0:
            return []
        L, H = self.L, self.cfg.horizon
        targets = [(d, (layer + d) // L, (layer + d) % L) for d in range(1, self.h + 1)]
        if not any(off == 0 for _d, off, _l in targets) and not self.wrap_rows.any():
            return []
        torch = self._torch
        ctx_e, ctx_l, ctx_t, ok = self._context(layer)
        tgt_l = np.tile(((layer + np.arange(1, H + 1)) % L)[None, :], (T, 1))
        dev = self.device
        with torch.no_grad():
            logits, conf = self.net(torch.from_numpy(ctx_e).to(dev), torch.from_numpy(ctx_l).to(dev),
                                    torch.from_numpy(ctx_t).to(dev), torch.from_numpy(ok).to(dev),
                                    torch.from_numpy(tgt_l).to(dev))
            probs = self._probs(logits)
            conf = conf.float().cpu().numpy()
        self.calls += 1
        out: list[Prefetch] = []
        for d, off, lay in targets:
            rows = self.wrap_rows if off else np.ones(T, dtype=bool)
            if self.params.min_confidence > 0:
                rows = rows & (conf[:, d - 1] >= self.params.min_confidence)
            self._emit(out, view.step + off, lay, probs[rows, d - 1])
        return out

    def on_step_end(self, view) -> None:
        self._begin(view)
        if not self.P:
            return
        rids = self.rids
        for r in np.unique(rids).tolist():
            rows = self.route[rids == r]
            old = self.memory.get(r)
            if old is not None and self.decode:
                rows = np.concatenate([old, rows])
            self.memory.put(r, rows[-self.P:].copy())


class _TraceStates:
    """pre_attn rows read from a trace file, request by request in file order (bounded memory:
    requests are dropped once all their tokens have been asked for)."""

    def __init__(self, path: str):
        from ...traces import TraceReader

        self.path = path
        reader = TraceReader(path)
        if not reader.has_pre_attn:
            raise InputError("the trace has no pre_attn column, which the pre_attention predictor needs "
                             "(synthetic traces: `moesim trace generate --pre-attn` or trace.synthetic.pre_attn)",
                             file=path, field="pre_attn")
        self._it = reader.iter_requests(pre_attn=True, scores=False)
        self._have: dict[int, tuple] = {}

    def _get(self, rid: int):
        while rid not in self._have:
            r = next(self._it, None)
            if r is None:
                raise InputError(f"request {rid} of the simulation is not in this trace (predictor.trace must "
                                 "be the scenario's trace)", file=self.path, field="predictor.trace")
            self._have[r.request_id] = (r.pre_attn, r.experts)
        return self._have[rid]

    def rows(self, rids: np.ndarray, pos: np.ndarray, layer: int, what: int = 0) -> np.ndarray:
        out = []
        for rid, p in zip(rids.tolist(), pos.tolist()):
            arr = self._get(rid)[what]
            if p >= arr.shape[0]:
                raise InputError(f"request {rid} has {arr.shape[0]} tokens here but the simulation asks for token "
                                 f"{p} (predictor.trace must be the scenario's trace)", file=self.path,
                                 field="predictor.trace")
            out.append(arr[p, layer])
        return np.stack(out) if out else np.zeros((0, 0))

    def done(self, rid: int, next_pos: int) -> None:
        v = self._have.get(rid)
        if v is not None and next_pos >= v[1].shape[0]:
            del self._have[rid]


@register
class PreAttention(_NeuralPredictor):
    """Same-layer pre-attention router (seed 003) from a trained checkpoint; see the module docstring.

    The hidden states come from `view.pre_attn(layer)` when the engine provides it, else from
    `trace` (which must be the scenario's trace; checked against the engine's routing)."""

    name = "pre_attention"
    kind = "pre_attention"
    Params = PreAttentionParams
    needs_pre_attn: ClassVar[bool] = True   # the engine should check its trace has the column

    def __init__(self, params, model, rng):
        super().__init__(params, model, rng)
        self.states = _TraceStates(str(_resolve(params.trace, model.name))) if params.trace else None

    def _x(self, view, layer: int) -> np.ndarray:
        if hasattr(view, "pre_attn"):
            return np.asarray(view.pre_attn(layer))
        if self.states is None:
            raise InputError("this engine does not pass pre-attention states to predictors; set "
                             "predictor.trace to the scenario's trace file (it must have a pre_attn column)",
                             field="predictor.trace")
        return self.states.rows(self.rids, self.pos, layer)

    def on_pre_attention(self, view, layer: int) -> list[Prefetch]:
        self._begin(view)
        x = self._x(view, layer)
        if x.shape[0] == 0:
            return []
        if x.shape[1] != self.cfg.input_dim:
            raise InputError(f"pre_attn vectors have width {x.shape[1]} but the checkpoint was trained on "
                             f"{self.cfg.input_dim}", file=self.ckpt_path, field=FIELD)
        torch = self._torch
        with torch.no_grad():
            logits = self.net(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device), layer)
            probs = self._probs(logits)
        self.calls += 1
        out: list[Prefetch] = []
        self._emit(out, view.step, layer, probs)
        return out

    def on_gate(self, view, layer: int) -> list[Prefetch]:
        if self.states is not None and layer == 0 and not hasattr(view, "pre_attn"):
            self._begin(view)
            te = np.asarray(view.token_experts(0))
            mine = self.states.rows(self.rids, self.pos, 0, what=1)
            if te.shape != mine.shape or not np.array_equal(te, mine):
                raise InputError(f"the routing of step {view.step} differs from this trace's: predictor.trace "
                                 "must be the scenario's trace", file=self.states.path, field="predictor.trace")
        return []

    def on_step_end(self, view) -> None:
        self._begin(view)
        if self.states is not None:
            for rid in np.unique(self.rids).tolist():
                self.states.done(rid, self.positions.get(rid, 0))

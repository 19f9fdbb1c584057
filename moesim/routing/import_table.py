"""The common core of the importers (`routing.importers`): parsed rows -> a checked moesim trace table.
Every check names the input row that breaks it."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from ..errors import InputError


@dataclass(frozen=True)
class Shape:
    num_layers: int
    num_experts: int
    top_k: int


@dataclass
class _Rows:
    """Parsed rows: parallel arrays plus a function naming input row i."""

    rid: np.ndarray                 # int64
    tok: np.ndarray                 # int64
    lay: np.ndarray                 # int64
    experts: list                   # per row: list of ints
    where: Callable[[int], str]
    phase: list | None = None       # per row: "prefill"/"decode" (None when the input has none)
    scores: list | None = None      # per row: list of floats, or None


@dataclass
class _Ordered:
    """The rows sorted by (request, token, layer): `order` indexes the input rows."""

    order: np.ndarray
    r: np.ndarray
    t: np.ndarray
    l: np.ndarray


def _build(rows: _Rows, shape: Shape, file: str, prompt_len, first_layer: int = 0) -> pa.Table:
    """Check the rows and turn them into a trace table. Errors name the input row."""
    if len(rows.rid) == 0:
        raise InputError("no routing rows found", file=file)
    lay = _check_ids(rows, shape, file, first_layer)
    ex = _check_experts(rows, shape, file)
    o = _order(rows, lay, shape.num_layers, file, first_layer)
    pre = _prefill(rows, o, shape.num_layers, file, prompt_len)
    sc = _scores(rows, o, file)
    cols = {
        "request_id": pa.array(o.r.astype(np.int32)),
        "token": pa.array(o.t.astype(np.int32)),
        "phase": pa.DictionaryArray.from_arrays(pa.array((~pre).astype(np.int8)), pa.array(["prefill", "decode"])),
        "layer": pa.array(o.l.astype(np.int16)),
        "experts": _lists(ex[o.order], pa.int16()),
    }
    if sc is not None:
        cols["scores"] = _lists(sc, pa.float32())
    return pa.table(cols)


def _check_ids(rows: _Rows, shape: Shape, file: str, first_layer: int) -> np.ndarray:
    """Layer, token and request ids in range; returns the 0-based MoE layers."""
    L, w = shape.num_layers, rows.where
    lay = rows.lay - first_layer
    bad = np.flatnonzero((lay < 0) | (lay >= L))
    if bad.size:
        i = int(bad[0])
        raise InputError(f"{w(i)}: layer {rows.lay[i]} out of range: expected {first_layer}..{first_layer + L - 1} "
                         f"(num_layers={L}{', --first-layer ' + str(first_layer) if first_layer else ''})",
                         file=file, field="layer")
    bad = np.flatnonzero(rows.tok < 0)
    if bad.size:
        i = int(bad[0])
        raise InputError(f"{w(i)}: token must be >= 0, found {rows.tok[i]}", file=file, field="token")
    bad = np.flatnonzero((rows.rid < 0) | (rows.rid > 2**31 - 1))
    if bad.size:
        i = int(bad[0])
        raise InputError(f"{w(i)}: request_id must be in 0..2^31-1, found {rows.rid[i]}", file=file,
                         field="request_id")
    return lay


def _check_experts(rows: _Rows, shape: Shape, file: str) -> np.ndarray:
    """top_k distinct expert ids in range per row; returns them as an [n, top_k] array."""
    E, K, w, n = shape.num_experts, shape.top_k, rows.where, len(rows.rid)
    lens = np.fromiter((len(e) for e in rows.experts), dtype=np.int64, count=n)
    bad = np.flatnonzero(lens != K)
    if bad.size:
        i = int(bad[0])
        raise InputError(f"{w(i)}: expected {K} experts (top_k), found {lens[i]}: {rows.experts[i]}", file=file,
                         field="experts")
    ex = np.asarray(rows.experts, dtype=np.int64).reshape(n, K)
    bad = np.flatnonzero(((ex < 0) | (ex >= E)).any(axis=1))
    if bad.size:
        i = int(bad[0])
        v = int(ex[i][(ex[i] < 0) | (ex[i] >= E)][0])
        raise InputError(f"{w(i)}: expert id out of range: expected 0..{E - 1} (num_experts={E}), found {v}",
                         file=file, field="experts")
    if K > 1:
        s = np.sort(ex, axis=1)
        bad = np.flatnonzero((s[:, 1:] == s[:, :-1]).any(axis=1))
        if bad.size:
            i = int(bad[0])
            raise InputError(f"{w(i)}: duplicate expert within a row: {ex[i].tolist()}", file=file,
                             field="experts")
    return ex


def _order(rows: _Rows, lay: np.ndarray, L: int, file: str, first_layer: int) -> _Ordered:
    """Sort by (request, token, layer); no duplicate rows, every token of a request has every layer."""
    w, n, fl = rows.where, len(rows.rid), first_layer
    order = np.lexsort((lay, rows.tok, rows.rid))
    r, t, l = rows.rid[order], rows.tok[order], lay[order]
    same = (r[1:] == r[:-1]) & (t[1:] == t[:-1]) & (l[1:] == l[:-1])
    if same.any():
        j = int(np.flatnonzero(same)[0])
        a, b = sorted((int(order[j]), int(order[j + 1])))
        raise InputError(f"{w(b)}: duplicate row for (request_id={r[j]}, token={t[j]}, layer={rows.lay[order[j]]}), "
                         f"already at {w(a)}", file=file)
    starts = np.concatenate([[0], np.flatnonzero(r[1:] != r[:-1]) + 1])
    seg = np.repeat(starts, np.diff(np.concatenate([starts, [n]])))
    pos = np.arange(n) - seg
    et, el = pos // L, pos % L
    bad = np.flatnonzero((t != et) | (l != el))
    if bad.size:
        j = int(bad[0])
        i = int(order[j])
        if l[j] != el[j] and t[j] == et[j]:
            raise InputError(f"request {r[j]} token {t[j]}: missing layer {fl + el[j]} (found "
                             f"{rows.lay[i]} at {w(i)}; every token needs layers {fl}..{fl + L - 1})",
                             file=file, field="layer")
        if t[j] != et[j] and el[j] == 0:
            raise InputError(f"request {r[j]}: missing token {et[j]} (next is token {t[j]} at {w(i)}; tokens must be "
                             f"0, 1, 2, ...)", file=file, field="token")
        raise InputError(f"request {r[j]} token {et[j]}: missing layer {fl + el[j]} (every token needs "
                         f"layers {fl}..{fl + L - 1}; next row is {w(i)})", file=file, field="layer")
    ends = np.concatenate([starts[1:], [n]])
    short = np.flatnonzero((ends - starts) % L)
    if short.size:
        j = int(ends[short[0]] - 1)
        raise InputError(f"request {r[j]} token {t[j]}: missing layer {fl + l[j] + 1} (every token needs "
                         f"layers {fl}..{fl + L - 1}; last row is {w(int(order[j]))})", file=file, field="layer")
    return _Ordered(order, r, t, l)


def _prefill(rows: _Rows, o: _Ordered, L: int, file: str, prompt_len) -> np.ndarray:
    """Per sorted row: prefill (True) or decode, from the phase column, else from --prompt-len."""
    if rows.phase is not None:
        return _phase_column(rows, o, L, file)
    if prompt_len is None:
        raise InputError("the input has no phase column: give --prompt-len N (tokens < N are prefill) or "
                         "--prompt-len all", file=file, field="--prompt-len")
    if prompt_len == "all":
        return np.ones(len(rows.rid), dtype=bool)
    return o.t < int(prompt_len)


def _phase_column(rows: _Rows, o: _Ordered, L: int, file: str) -> np.ndarray:
    """The phase column, checked: one phase per token, prompt tokens first, >= 1 prefill token per request."""
    w, order, r, t = rows.where, o.order, o.r, o.t
    ph = np.asarray(rows.phase, dtype=object)
    ok = (ph == "prefill") | (ph == "decode")
    if not ok.all():
        i = int(np.flatnonzero(~ok)[0])
        raise InputError(f"{w(i)}: phase: expected 'prefill' or 'decode', found {rows.phase[i]!r}", file=file,
                         field="phase")
    pre = (ph == "prefill")[order]
    tok_pre = pre.reshape(-1, L)
    mixed = np.flatnonzero((tok_pre != tok_pre[:, :1]).any(axis=1))
    if mixed.size:
        j = int(mixed[0]) * L
        raise InputError(f"request {r[j]} token {t[j]}: phase differs between layers ({w(int(order[j]))})",
                         file=file, field="phase")
    tp, tr, tt = tok_pre[:, 0], r[::L], t[::L]
    tstart = np.concatenate([[0], np.flatnonzero(tr[1:] != tr[:-1]) + 1])
    first = np.zeros(len(tr), dtype=bool)
    first[tstart] = True
    prev_dec = np.concatenate([[False], ~tp[:-1]]) & ~first
    bad = np.flatnonzero(tp & prev_dec)
    if bad.size:
        j = int(bad[0])
        raise InputError(f"request {tr[j]} token {tt[j]}: prefill after a decode token (prompt tokens come "
                         f"first; {w(int(order[j * L]))})", file=file, field="phase")
    bad = np.flatnonzero(~tp[tstart])
    if bad.size:
        j = int(tstart[bad[0]])
        raise InputError(f"request {tr[j]} has no prefill token (token 0 is decode at {w(int(order[j * L]))})",
                         file=file, field="phase")
    return pre


def _scores(rows: _Rows, o: _Ordered, file: str) -> np.ndarray | None:
    """The optional scores, the same width on every row, in sorted order."""
    if rows.scores is None:
        return None
    n = len(rows.rid)
    widths = np.fromiter((len(s) for s in rows.scores), dtype=np.int64, count=n)
    wd = int(widths[0])
    bad = np.flatnonzero(widths != wd)
    if bad.size:
        i = int(bad[0])
        raise InputError(f"{rows.where(i)}: expected {wd} scores like the first row, found {widths[i]}", file=file,
                         field="scores")
    return np.asarray(rows.scores, dtype=np.float32).reshape(n, wd)[o.order] if wd else None


def _lists(a: np.ndarray, typ) -> pa.ListArray:
    n, k = a.shape
    return pa.ListArray.from_arrays(pa.array(np.arange(0, (n + 1) * k, k, dtype=np.int32)),
                                    pa.array(np.ascontiguousarray(a).reshape(-1), type=typ))

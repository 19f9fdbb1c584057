"""Import routing traces written by other tools (`moesim trace import --format ...`).

The model's routing shape (num_layers, num_experts, top_k) is given, never guessed (`--model PRESET`
and/or `--num-layers/--num-experts/--top-k`). Every bad value raises InputError naming the input
file and the row (CSV/JSONL/log: `line N`, 1-based, header included; Parquet: `row N`, 0-based;
NumPy: the array and its index).

Formats
-------
csv
    A header line, then one row per request x token x MoE layer (any order; extra columns ignored):

        request_id,token,layer,experts,phase,scores
        0,0,0,3 17,prefill,0.61 0.39
        0,0,1,"5,9",prefill,
        0,0,2,"[12, 2]",prefill,

    `request_id`, `token` (0, 1, 2, ... within a request, prompt first) and `layer` (0-based MoE
    layer; `--first-layer N` subtracts N) are integers; `experts` holds exactly top_k distinct ids in
    gate-score order, separated by spaces or commas, or as a JSON list. `phase` (`prefill` or
    `decode`) is optional: without it, `--prompt-len N` makes tokens < N prefill (`all`: every
    token). `scores` (optional) holds the same number of floats on every row. Non-integer
    request ids (e.g. "p0") are numbered 0, 1, ... in order of first appearance.
jsonl
    The same fields, one JSON object per line; `experts`/`scores` as JSON lists (or strings as in CSV):
    `{"request_id": 0, "token": 0, "layer": 0, "experts": [3, 17], "phase": "prefill"}`.
numpy
    `.npy`: an int array `[tokens, layers, top_k]` (one request) or `[requests, tokens, layers,
    top_k]`; `.npz`: each array is one request (in the file's order), or a 4-D stack. Tokens whose
    every entry is -1 at the end of a request are padding and dropped. `--prompt-len` is required.
policylang
    moe-policylang's traces, Parquet or JSONL (by extension): `prompt_id, token_idx, layer_idx,
    selected_experts, router_scores` (router_scores optional; a `phase` column is used if present,
    else `--prompt-len`).
llamacpp
    llama.cpp expert-selection logs: text lines, in evaluation order, each giving one MoE layer's
    selected experts for the tokens of one batch. Accepted lines (anything else is ignored as
    log noise, so the lines may carry a log prefix):

        ... layer_id=3 expert_ids=12,7            (also `layer_id: 3, expert_ids: [12, 7]`)
        3,12 7                                    (CSV `layer,expert(s)`, header line optional)
        request 1                                 (optional: starts a new request; also `request_id=1`)

    Consecutive lines of the same layer are joined, so the one-row-per-activation CSV
    (`layer,expert`, one row per routed expert, as llama.cpp's moe-trace example writes) reads
    the same. A record holds n x top_k ids: the top_k ids (descending score, as `ffn_moe_topk`)
    of each of the batch's n tokens, token by token. Layer ids are block indices: the smallest
    seen is MoE layer 0 (`--first-layer` sets it). A batch is the run of records with layers
    0..L-1; a multi-token batch after single-token (decode) batches starts a new request. Phase:
    `--prompt-len` if given, else the first batch and the multi-token batches right after it are
    prefill, the single-token batches decode.
"""
from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from ..errors import InputError
from ..traces.schema import TraceMeta

FORMATS = ("csv", "jsonl", "numpy", "policylang", "llamacpp")


@dataclass(frozen=True)
class Shape:
    num_layers: int
    num_experts: int
    top_k: int


def resolve_shape(model: str | None, num_layers: int | None, num_experts: int | None,
                  top_k: int | None) -> tuple[Shape, str | None]:
    """The routing shape from a model preset and/or explicit numbers (explicit ones win)."""
    L = E = K = None
    name = None
    if model:
        from ..models import get_preset, preset_names

        try:
            spec = get_preset(model)
        except KeyError:
            raise InputError(f"unknown model preset {model!r} (known: {', '.join(preset_names())})",
                             field="--model") from None
        L, E, K, name = spec.num_layers, spec.num_experts, spec.top_k, model
    L = num_layers if num_layers is not None else L
    E = num_experts if num_experts is not None else E
    K = top_k if top_k is not None else K
    for flag, v in (("--num-layers", L), ("--num-experts", E), ("--top-k", K)):
        if v is None:
            raise InputError("the model's routing shape is needed: give --model PRESET or --num-layers, "
                             "--num-experts and --top-k", field=flag)
        if v <= 0:
            raise InputError(f"must be > 0 (got {v})", field=flag)
    if K > E:
        raise InputError(f"top_k ({K}) exceeds num_experts ({E})", field="--top-k")
    if E > 32767 or L > 32767:
        raise InputError("must fit in int16 (<= 32767)", field="--num-experts")
    return Shape(L, E, K), name


def parse_prompt_len(v) -> int | str | None:
    if v is None or v == "all":
        return v
    try:
        n = int(v)
    except (TypeError, ValueError):
        raise InputError(f"expected an integer or 'all', found {v!r}", field="--prompt-len") from None
    if n <= 0:
        raise InputError(f"must be > 0 (got {n}); 'all' makes every token prefill", field="--prompt-len")
    return n


# ---- the common core: rows -> checked trace ----------------------------------------------------------

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


def _build(rows: _Rows, shape: Shape, file: str, prompt_len, first_layer: int = 0) -> pa.Table:
    """Check the rows and turn them into a trace table. Errors name the input row."""
    L, E, K = shape.num_layers, shape.num_experts, shape.top_k
    n = len(rows.rid)
    if n == 0:
        raise InputError("no routing rows found", file=file)
    w = rows.where
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
    # order and completeness
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
            raise InputError(f"request {r[j]} token {t[j]}: missing layer {first_layer + el[j]} (found "
                             f"{rows.lay[i]} at {w(i)}; every token needs layers {first_layer}..{first_layer + L - 1})",
                             file=file, field="layer")
        if t[j] != et[j] and el[j] == 0:
            raise InputError(f"request {r[j]}: missing token {et[j]} (next is token {t[j]} at {w(i)}; tokens must be "
                             f"0, 1, 2, ...)", file=file, field="token")
        raise InputError(f"request {r[j]} token {et[j]}: missing layer {first_layer + el[j]} (every token needs "
                         f"layers {first_layer}..{first_layer + L - 1}; next row is {w(i)})", file=file, field="layer")
    ends = np.concatenate([starts[1:], [n]])
    short = np.flatnonzero((ends - starts) % L)
    if short.size:
        j = int(ends[short[0]] - 1)
        raise InputError(f"request {r[j]} token {t[j]}: missing layer {first_layer + l[j] + 1} (every token needs "
                         f"layers {first_layer}..{first_layer + L - 1}; last row is {w(int(order[j]))})",
                         file=file, field="layer")
    # phase
    if rows.phase is not None:
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
        # prompt first: no prefill token after a decode token, and >= 1 prefill token per request
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
    elif prompt_len is None:
        raise InputError("the input has no phase column: give --prompt-len N (tokens < N are prefill) or "
                         "--prompt-len all", file=file, field="--prompt-len")
    elif prompt_len == "all":
        pre = np.ones(n, dtype=bool)
    else:
        pre = t < int(prompt_len)
    # scores (optional, equal width)
    sc = None
    if rows.scores is not None:
        widths = np.fromiter((len(s) for s in rows.scores), dtype=np.int64, count=n)
        wd = int(widths[0])
        bad = np.flatnonzero(widths != wd)
        if bad.size:
            i = int(bad[0])
            raise InputError(f"{w(i)}: expected {wd} scores like the first row, found {widths[i]}", file=file,
                             field="scores")
        if wd:
            sc = np.asarray(rows.scores, dtype=np.float32).reshape(n, wd)[order]
    cols = {
        "request_id": pa.array(r.astype(np.int32)),
        "token": pa.array(t.astype(np.int32)),
        "phase": pa.DictionaryArray.from_arrays(pa.array((~pre).astype(np.int8)), pa.array(["prefill", "decode"])),
        "layer": pa.array(l.astype(np.int16)),
        "experts": _lists(ex[order], pa.int16()),
    }
    if sc is not None:
        cols["scores"] = _lists(sc, pa.float32())
    return pa.table(cols)


def _lists(a: np.ndarray, typ) -> pa.ListArray:
    n, k = a.shape
    return pa.ListArray.from_arrays(pa.array(np.arange(0, (n + 1) * k, k, dtype=np.int32)),
                                    pa.array(np.ascontiguousarray(a).reshape(-1), type=typ))


# ---- value parsing ----------------------------------------------------------------------------------

_SPLIT = re.compile(r"[\s,;]+")


def _int_list(v, what: str, where: str, file: str) -> list[int]:
    """'3 17', '3,17', '[3, 17]', [3, 17] -> [3, 17]."""
    if isinstance(v, (list, tuple, np.ndarray)):
        out = []
        for x in v:
            if isinstance(x, bool) or not (isinstance(x, (int, np.integer))
                                           or (isinstance(x, float) and x.is_integer())):
                raise InputError(f"{where}: expected integer expert ids, found {x!r}", file=file, field=what)
            out.append(int(x))
        return out
    if isinstance(v, str):
        s = v.strip()
        if s.startswith("["):
            try:
                return _int_list(json.loads(s), what, where, file)
            except json.JSONDecodeError:
                raise InputError(f"{where}: not a JSON list: {v!r}", file=file, field=what) from None
        parts = [p for p in _SPLIT.split(s) if p]
        try:
            return [int(p) for p in parts]
        except ValueError:
            raise InputError(f"{where}: expected integer expert ids like '3 17' or [3, 17], found {v!r}", file=file,
                             field=what) from None
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        return [int(v)]
    raise InputError(f"{where}: expected a list of expert ids, found {v!r}", file=file, field=what)


def _float_list(v, what: str, where: str, file: str) -> list[float]:
    if v is None or (isinstance(v, str) and not v.strip()):
        return []
    if isinstance(v, str):
        s = v.strip()
        try:
            vals = json.loads(s) if s.startswith("[") else [float(p) for p in _SPLIT.split(s) if p]
        except (ValueError, json.JSONDecodeError):
            raise InputError(f"{where}: expected numbers, found {v!r}", file=file, field=what) from None
    elif isinstance(v, (int, float)):
        vals = [v]
    else:
        vals = list(v)
    try:
        out = [float(x) for x in vals]
    except (TypeError, ValueError):
        raise InputError(f"{where}: expected numbers, found {v!r}", file=file, field=what) from None
    if not all(math.isfinite(x) for x in out):
        raise InputError(f"{where}: scores must be finite, found {v!r}", file=file, field=what)
    return out


def _int(v, what: str, where: str, file: str) -> int:
    if isinstance(v, bool):
        raise InputError(f"{where}: expected an integer, found {v!r}", file=file, field=what)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, float) and v.is_integer():
        return int(v)
    try:
        return int(str(v).strip())
    except (TypeError, ValueError):
        raise InputError(f"{where}: expected an integer, found {v!r}", file=file, field=what) from None


class _RequestIds:
    """Integer request ids are kept; if any id is not an integer, all are numbered in order of first
    appearance."""

    def __init__(self, raw: list):
        def as_int(v):
            if isinstance(v, bool):
                return None
            if isinstance(v, (int, np.integer)):
                return int(v)
            try:
                return int(str(v).strip())
            except ValueError:
                return None

        ints = [as_int(v) for v in raw]
        self.renumbered = any(i is None for i in ints)
        if self.renumbered:
            seen: dict = {}
            self.ids = np.array([seen.setdefault(str(v), len(seen)) for v in raw], dtype=np.int64)
        else:
            self.ids = np.array(ints, dtype=np.int64)


# ---- record-oriented formats (CSV, JSONL, policylang) ----------------------------------------------------

CSV_COLUMNS = {"request_id": "request_id", "token": "token", "layer": "layer", "experts": "experts",
               "phase": "phase", "scores": "scores"}
POLICYLANG_COLUMNS = {"request_id": "prompt_id", "token": "token_idx", "layer": "layer_idx",
                      "experts": "selected_experts", "phase": "phase", "scores": "router_scores"}


def _records_to_rows(records: list[tuple[str, dict]], cols: dict, file: str) -> _Rows:
    """records: (row label, dict of raw values)."""
    labels = [lab for lab, _ in records]
    names = set().union(*(rec.keys() for _, rec in records)) if records else set()
    for key in ("request_id", "token", "layer", "experts"):
        if records and cols[key] not in names:
            raise InputError(f"missing column (expected {', '.join(cols[k] for k in ('request_id', 'token', 'layer', 'experts'))})",
                             file=file, field=cols[key])
    rid_raw, tok, lay, ex, ph, sc = [], [], [], [], [], []
    has_phase = cols["phase"] in names
    has_scores = cols["scores"] in names
    for lab, rec in records:
        for key in ("request_id", "token", "layer", "experts"):
            v = rec.get(cols[key])
            if v is None or (isinstance(v, str) and not v.strip()):
                raise InputError(f"{lab}: missing value", file=file, field=cols[key])
        rid_raw.append(rec[cols["request_id"]])
        tok.append(_int(rec[cols["token"]], cols["token"], lab, file))
        lay.append(_int(rec[cols["layer"]], cols["layer"], lab, file))
        ex.append(_int_list(rec[cols["experts"]], cols["experts"], lab, file))
        if has_phase:
            v = rec.get(cols["phase"])
            ph.append(v.strip() if isinstance(v, str) else v)
        if has_scores:
            sc.append(_float_list(rec.get(cols["scores"]), cols["scores"], lab, file))
    rids = _RequestIds(rid_raw)
    return _Rows(rids.ids, np.array(tok, dtype=np.int64), np.array(lay, dtype=np.int64), ex,
                 lambda i: labels[i], ph if has_phase else None, sc if has_scores else None)


def _read_csv(path: Path, file: str) -> list[tuple[str, dict]]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None:
                raise InputError("empty file (expected a header line)", file=file)
            reader.fieldnames = [c.strip() for c in reader.fieldnames]
            out = []
            for rec in reader:
                if None in rec:
                    raise InputError(f"line {reader.line_num}: more fields than the header has", file=file)
                out.append((f"line {reader.line_num}", rec))
            return out
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise InputError(f"cannot read as CSV: {e}", file=file) from None


def json_lines(lines: Iterable[str], file: str) -> Iterator[tuple[int, object]]:
    """(line number, value) of each non-blank line of a JSON-lines text; InputError on bad JSON."""
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"line {n}: not JSON: {e.msg}", file=file) from None


def _read_jsonl(path: Path, file: str) -> list[tuple[str, dict]]:
    out = []
    try:
        with open(path, encoding="utf-8") as f:
            for n, obj in json_lines(f, file):
                if not isinstance(obj, dict):
                    raise InputError(f"line {n}: expected a JSON object", file=file)
                out.append((f"line {n}", obj))
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read: {e}", file=file) from None
    return out


def _read_parquet_rows(path: Path, file: str, cols: dict) -> _Rows:
    import pyarrow.parquet as pq

    try:
        tbl = pq.read_table(path)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise InputError(f"not a readable Parquet file: {e}", file=file) from None
    names = tbl.column_names
    for key in ("request_id", "token", "layer", "experts"):
        if cols[key] not in names:
            raise InputError(f"missing column (found {', '.join(names)})", file=file, field=cols[key])
    def where(i: int) -> str:
        return f"row {i}"

    for key in ("request_id", "token", "layer", "experts", "phase", "scores"):
        c = cols[key]
        if c in names and tbl.column(c).null_count and key != "scores":
            i = int(np.flatnonzero(tbl.column(c).is_null().to_numpy(zero_copy_only=False))[0])
            raise InputError(f"row {i}: missing value", file=file, field=c)

    def ints(key):
        col = tbl.column(cols[key])
        if pa.types.is_integer(col.type):
            return col.to_numpy().astype(np.int64)
        vals = col.to_pylist()
        return np.array([_int(v, cols[key], where(i), file) for i, v in enumerate(vals)], dtype=np.int64)

    rid_col = tbl.column(cols["request_id"])
    rid = (rid_col.to_numpy().astype(np.int64) if pa.types.is_integer(rid_col.type)
           else _RequestIds(rid_col.to_pylist()).ids)
    ex_col = tbl.column(cols["experts"])
    if pa.types.is_list(ex_col.type) or pa.types.is_large_list(ex_col.type) or \
            pa.types.is_fixed_size_list(ex_col.type):
        ex = [[int(x) for x in v] if v is not None else [] for v in ex_col.to_pylist()]
        if any(any(x is None for x in v) for v in ex_col.to_pylist() if v is not None):
            raise InputError("null expert id", file=file, field=cols["experts"])
    else:
        ex = [_int_list(v, cols["experts"], where(i), file) for i, v in enumerate(ex_col.to_pylist())]
    phase = None
    if cols["phase"] in names:
        pc = tbl.column(cols["phase"])
        if pa.types.is_dictionary(pc.type):
            pc = pc.cast(pa.string())
        phase = pc.to_pylist()
    scores = None
    if cols["scores"] in names:
        scores = [_float_list(v, cols["scores"], where(i), file) for i, v in enumerate(tbl.column(cols["scores"]).to_pylist())]
    return _Rows(rid, ints("token"), ints("layer"), ex, where, phase, scores)


# ---- NumPy -------------------------------------------------------------------------------------------

def _numpy_rows(path: Path, file: str, K: int) -> _Rows:
    try:
        if path.suffix.lower() == ".npz":
            with np.load(path, allow_pickle=False) as z:
                arrays = [(f"{k}", z[k]) for k in z.files]
        else:
            arrays = [(path.name, np.load(path, allow_pickle=False))]
    except ValueError as e:
        raise InputError(f"cannot load (object arrays are not accepted; save one int array per request in an "
                         f".npz): {e}", file=file) from None
    except (OSError, EOFError) as e:
        raise InputError(f"not a readable .npy/.npz file: {e}", file=file) from None
    reqs: list[tuple[str, np.ndarray]] = []
    for name, a in arrays:
        if not (np.issubdtype(a.dtype, np.integer) or (np.issubdtype(a.dtype, np.floating)
                                                        and np.all(np.mod(a, 1) == 0))):
            raise InputError(f"{name}: expected an integer array, found dtype {a.dtype}", file=file, field=name)
        a = a.astype(np.int64)
        if a.ndim == 3:
            reqs.append((name, a))
        elif a.ndim == 4:
            reqs.extend((f"{name}[{i}]", a[i]) for i in range(a.shape[0]))
        else:
            raise InputError(f"{name}: expected shape [tokens, layers, top_k] or [requests, tokens, layers, top_k], "
                             f"found {list(a.shape)}", file=file, field=name)
    rid, tok, lay, ex = [], [], [], []
    for r, (name, a) in enumerate(reqs):
        T, L, k = a.shape
        if k != K:
            raise InputError(f"{name}: expected top_k={K} in the last axis, found shape {list(a.shape)}", file=file,
                             field=name)
        pad = (a == -1).all(axis=(1, 2))
        keep = T
        while keep > 0 and pad[keep - 1]:
            keep -= 1
        a = a[:keep]
        if keep == 0:
            raise InputError(f"{name}: no tokens (all padding)", file=file, field=name)
        t, l = np.meshgrid(np.arange(keep), np.arange(L), indexing="ij")
        rid.append(np.full(keep * L, r))
        tok.append(t.ravel())
        lay.append(l.ravel())
        ex.append(a.reshape(-1, K))
    starts = np.cumsum([0] + [len(x) for x in rid])
    names = [n for n, _ in reqs]
    Ls = [a.shape[1] for _, a in reqs]

    def where(i: int) -> str:
        r = int(np.searchsorted(starts, i, side="right") - 1)
        j = i - starts[r]
        return f"{names[r]}[token {j // Ls[r]}, layer {j % Ls[r]}]"

    return _Rows(np.concatenate(rid), np.concatenate(tok), np.concatenate(lay),
                 np.concatenate(ex).tolist(), where)


# ---- llama.cpp -------------------------------------------------------------------------------------------

_KV_RE = re.compile(r"\blayer(?:_id|_idx)?\s*[=:]\s*(\d+)\b.*?\bexpert(?:_id|_idx)?s?\s*[=:]\s*\[?\s*"
                    r"(-?\d+(?:\s*[,\s]\s*-?\d+)*)\s*\]?", re.IGNORECASE)
_CSV_RE = re.compile(r"^\s*(\d+)\s*[,;\t]\s*\"?\[?\s*(-?\d+(?:\s*[,\s]\s*-?\d+)*)\s*\]?\"?\s*$")
_REQ_RE = re.compile(r"^\s*#?\s*request(?:_id)?\s*[=:]?\s*(\S+)\s*$", re.IGNORECASE)
_HEADER_RE = re.compile(r"^\s*layer(?:_id|_idx)?\s*[,;\t]\s*expert(?:_id|_idx)?s?\s*$", re.IGNORECASE)


def _llamacpp_rows(path: Path, file: str, shape: Shape, prompt_len, first_layer: int | None) -> tuple[_Rows, str]:
    L, K = shape.num_layers, shape.top_k
    # 1. lines -> records (layer, ids, first line); consecutive lines of one layer are joined
    requests: list[list[list]] = [[]]
    try:
        f = open(path, encoding="utf-8", errors="replace")
    except OSError as e:
        raise InputError(f"cannot read: {e}", file=file) from None
    with f:
        for n, line in enumerate(f, 1):
            m = _KV_RE.search(line) or _CSV_RE.match(line)
            if m is None:
                if _REQ_RE.match(line):
                    if requests[-1]:
                        requests.append([])
                    continue
                if _HEADER_RE.match(line) or not re.search(r"layer_id|expert_ids", line, re.IGNORECASE):
                    continue  # header or log noise
                raise InputError(f"line {n}: cannot read 'layer_id=<int> expert_ids=<int>,<int>...' here: "
                                 f"{line.strip()[:120]!r}", file=file)
            layer = int(m.group(1))
            ids = [int(x) for x in re.split(r"[\s,]+", m.group(2).strip()) if x]
            cur = requests[-1]
            if cur and cur[-1][0] == layer:
                cur[-1][1].extend(ids)
            else:
                cur.append([layer, ids, n])
    requests = [r for r in requests if r]
    if not requests:
        raise InputError("no 'layer_id=... expert_ids=...' lines found", file=file)
    lo = first_layer if first_layer is not None else min(rec[0] for req in requests for rec in req)
    # 2. records -> batches -> tokens
    rid, tok, lay, ex, labels, pre = [], [], [], [], [], []
    out_req = 0
    for req in requests:
        batches: list[list] = []
        prev = None
        for rec in req:
            idx = rec[0] - lo
            if idx < 0 or idx >= L:
                raise InputError(f"line {rec[2]}: layer {rec[0]} out of range: expected {lo}..{lo + L - 1} "
                                 f"(num_layers={L}, first layer {lo})", file=file, field="layer_id")
            if prev is None or idx <= prev:
                batches.append([])
            elif idx != prev + 1:
                raise InputError(f"line {rec[2]}: expected layer {lo + prev + 1} after layer {lo + prev} (each batch "
                                 f"lists layers {lo}..{lo + L - 1} in order), found {rec[0]}", file=file,
                                 field="layer_id")
            batches[-1].append(rec)
            prev = idx
        # split into requests: a multi-token batch after single-token batches starts a new one
        token = 0
        seen_decode = False
        first_batch = True
        for b in batches:
            if len(b) != L:
                last = b[-1]
                raise InputError(f"line {last[2]}: batch ends after layer {last[0]}: expected layers {lo}..{lo + L - 1} "
                                 f"(num_layers={L})", file=file, field="layer_id")
            counts = {len(rec[1]) for rec in b}
            c = len(b[0][1])
            if len(counts) != 1 or c % K or c == 0:
                bad = next(rec for rec in b if len(rec[1]) != c or c % K or c == 0)
                raise InputError(f"line {bad[2]}: layer {bad[0]} has {len(bad[1])} expert ids; expected top_k={K} "
                                 f"per token and the same token count on every layer of the batch ({c} ids on "
                                 f"layer {b[0][0]})", file=file, field="expert_ids")
            ntok = c // K
            if ntok > 1 and seen_decode:
                out_req += 1
                token, seen_decode, first_batch = 0, False, True
            is_prefill = first_batch or (ntok > 1 and not seen_decode)
            if not is_prefill:
                seen_decode = True
            first_batch = False
            arr = np.array([rec[1] for rec in b], dtype=np.int64).reshape(L, ntok, K).transpose(1, 0, 2)
            for j in range(ntok):
                for li, rec in enumerate(b):
                    rid.append(out_req)
                    tok.append(token + j)
                    lay.append(li)
                    ex.append(arr[j, li].tolist())
                    labels.append(f"line {rec[2]} (token {j} of the batch)")
                    pre.append("prefill" if is_prefill else "decode")
            token += ntok
        out_req += 1
    rows = _Rows(np.array(rid, dtype=np.int64), np.array(tok, dtype=np.int64), np.array(lay, dtype=np.int64), ex,
                 lambda i: labels[i], None if prompt_len is not None else pre)
    return rows, f"first layer {lo}"


# ---- entry point --------------------------------------------------------------------------------------------

def import_trace(path, fmt: str, output, shape: Shape, *, model_name: str | None = None,
                 prompt_len: int | str | None = None, first_layer: int | None = None) -> tuple[Path, TraceMeta]:
    """Read `path` in format `fmt`, check it against `shape`, write a moesim trace to `output`."""
    from ..traces.io import write_trace

    file = str(path)
    p = Path(path)
    if fmt not in FORMATS:
        raise InputError(f"unknown format {fmt!r} (expected one of {', '.join(FORMATS)})", field="--format")
    if not p.is_file():
        raise InputError("input file not found", file=file)
    prompt_len = parse_prompt_len(prompt_len)
    if first_layer is not None and first_layer < 0:
        raise InputError(f"must be >= 0 (got {first_layer})", field="--first-layer")
    fl = first_layer or 0
    if fmt == "csv":
        rows = _records_to_rows(_read_csv(p, file), CSV_COLUMNS, file)
    elif fmt == "jsonl":
        rows = _records_to_rows(_read_jsonl(p, file), CSV_COLUMNS, file)
    elif fmt == "policylang":
        if p.suffix.lower() in (".parquet", ".pq"):
            rows = _read_parquet_rows(p, file, POLICYLANG_COLUMNS)
        else:
            rows = _records_to_rows(_read_jsonl(p, file), POLICYLANG_COLUMNS, file)
    elif fmt == "numpy":
        if prompt_len is None:
            raise InputError("NumPy arrays carry no phase: give --prompt-len N (or 'all')", field="--prompt-len")
        rows = _numpy_rows(p, file, shape.top_k)
    else:
        rows, _ = _llamacpp_rows(p, file, shape, prompt_len, first_layer)
        fl = 0  # layers already mapped
    table = _build(rows, shape, file, prompt_len, fl)
    label = model_name or p.stem
    meta = TraceMeta(model=label, num_layers=shape.num_layers, num_experts=shape.num_experts, top_k=shape.top_k,
                     source=f"collected:{label}@{p.name} (imported from {fmt})", seed=None)
    out = write_trace(output, table, meta)
    return out, meta

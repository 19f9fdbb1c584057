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
from pathlib import Path

import numpy as np
import pyarrow as pa

from ..errors import InputError
from ..traces.schema import TraceMeta
from .import_llamacpp import _llamacpp_rows
from .import_table import Shape, _build, _Rows
from .import_values import _float_list, _int, _int_list, _RequestIds
from .jsonl import json_lines, read_json_lines

__all__ = ["FORMATS", "Shape", "import_trace", "json_lines", "parse_prompt_len", "resolve_shape"]

FORMATS = ("csv", "jsonl", "numpy", "policylang", "llamacpp")


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


def _read_jsonl(path: Path, file: str) -> list[tuple[str, dict]]:
    out = []
    for n, obj in read_json_lines(path, file):
        if not isinstance(obj, dict):
            raise InputError(f"line {n}: expected a JSON object", file=file)
        out.append((f"line {n}", obj))
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

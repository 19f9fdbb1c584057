"""Parquet trace I/O: an atomic writer and a streaming, validating reader.

`write_trace` writes rows sorted by (request_id, token, layer) into a temporary file next to the
target and renames it into place, so a crash never leaves half a trace behind.

`TraceReader.iter_requests()` reads BATCH_ROWS rows at a time, whatever the writer's row groups
(memory is bounded by a batch plus the one request that spans a boundary), and yields a
`RequestTrace` per request with its routing as a dense `[tokens, layers, top_k]` int16 array.
Every check is vectorised over a batch with numpy/Arrow; the only Python loop is over requests.
Bad input raises `InputError` naming the file, the column and the row.
"""
from __future__ import annotations

import hashlib
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..errors import InputError
from .schema import FIELDS, PHASES, REQUIRED_COLUMNS, TraceMeta, trace_schema

DEFAULT_ROW_GROUP_ROWS = 65536
BATCH_ROWS = 16384  # rows decoded at a time when reading requests
SORT_KEYS = [("request_id", "ascending"), ("token", "ascending"), ("layer", "ascending")]


# ---- writing ------------------------------------------------------------------------------------

def _phase_array(col, file) -> pa.DictionaryArray:
    """Any string/dictionary phase column -> dictionary<int8, string> with values (prefill, decode)."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    if pa.types.is_dictionary(col.type):
        col = col.dictionary_decode()
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        raise InputError(f"expected strings 'prefill'/'decode', found type {col.type}", file=file, field="phase")
    idx = pc.index_in(col, value_set=pa.array(PHASES))
    if idx.null_count:
        bad = int(np.flatnonzero(idx.is_null().to_numpy(zero_copy_only=False))[0])
        raise InputError(f"row {bad}: expected 'prefill' or 'decode', found {col[bad].as_py()!r}", file=file,
                         field="phase")
    return pa.DictionaryArray.from_arrays(idx.cast(pa.int8()), pa.array(PHASES))


def _normalise(piece, file) -> pa.Table:
    """Cast a table/batch to the trace schema (optional columns kept if present) and sort it."""
    if isinstance(piece, pa.RecordBatch):
        piece = pa.Table.from_batches([piece])
    if not isinstance(piece, pa.Table):
        raise TypeError(f"expected a pyarrow Table or RecordBatch, got {type(piece).__name__}")
    names = piece.column_names
    for c in REQUIRED_COLUMNS:
        if c not in names:
            raise InputError("missing column", file=file, field=c)
    for c in names:
        if c not in FIELDS:
            raise InputError(f"unknown column (expected {', '.join(FIELDS)})", file=file, field=c)
    schema = trace_schema(scores="scores" in names, pre_attn="pre_attn" in names, arrival_s="arrival_s" in names)
    arrays = []
    for f in schema:
        col = piece.column(f.name)
        if f.name == "phase":
            arrays.append(_phase_array(col, file))
            continue
        try:
            arrays.append(col.cast(f.type))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            raise InputError(f"cannot store as {f.type}: {e}", file=file, field=f.name) from None
    table = pa.Table.from_arrays(arrays, schema=schema)
    return table.sort_by(SORT_KEYS)


def _first_last_key(t: pa.Table) -> tuple[tuple, tuple]:
    cols = [t.column(k).to_numpy() for k, _ in SORT_KEYS] if t.num_rows else None
    if cols is None:
        return (), ()
    return tuple(int(c[0]) for c in cols), tuple(int(c[-1]) for c in cols)


def write_trace(path, table_or_batches, meta: TraceMeta, row_group_rows: int = DEFAULT_ROW_GROUP_ROWS,
                compression: str = "zstd") -> Path:
    """Write a trace to Parquet atomically (temp file + rename), rows sorted by (request_id, token, layer).

    `table_or_batches` is a `pyarrow.Table`/`RecordBatch` or an iterable of them (streamed: each piece
    is sorted, and pieces must follow one another in key order). Row groups hold exactly
    `row_group_rows` rows (the last one fewer) whatever the pieces, so the bytes depend only on the rows.
    """
    path = Path(path)
    file = str(path)
    if row_group_rows <= 0:
        raise ValueError("row_group_rows must be > 0")
    pieces = [table_or_batches] if isinstance(table_or_batches, (pa.Table, pa.RecordBatch)) else table_or_batches
    path.parent.mkdir(parents=True, exist_ok=True)
    # a fresh name that the Parquet writer creates itself (so the file gets the usual umask mode)
    tmp = str(path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")
    writer = None
    schema = None
    pending: list[pa.Table] = []
    pending_rows = 0
    last_key: tuple | None = None
    try:
        for raw in pieces:
            t = _normalise(raw, file)
            if schema is None:
                schema = t.schema.with_metadata(meta.to_metadata())
                writer = pq.ParquetWriter(tmp, schema, compression=compression)
            elif t.schema.names != schema.names:
                raise InputError(f"pieces have different columns: {t.schema.names} vs {schema.names}", file=file)
            if t.num_rows == 0:
                continue
            first, last = _first_last_key(t)
            if last_key is not None and first <= last_key:
                raise InputError(f"pieces out of order: (request_id, token, layer) {first} after {last_key}",
                                 file=file)
            last_key = last
            pending.append(t.replace_schema_metadata(schema.metadata))
            pending_rows += t.num_rows
            while pending_rows >= row_group_rows:
                buf = pa.concat_tables(pending)
                writer.write_table(buf.slice(0, row_group_rows), row_group_size=row_group_rows)
                rest = buf.slice(row_group_rows)
                pending, pending_rows = ([rest] if rest.num_rows else []), rest.num_rows
        if schema is None:  # nothing given at all: an empty trace with the required columns
            schema = trace_schema(meta=meta)
            writer = pq.ParquetWriter(tmp, schema, compression=compression)
        if pending_rows:
            writer.write_table(pa.concat_tables(pending), row_group_size=row_group_rows)
        writer.close()
        writer = None
        os.replace(tmp, path)
    except BaseException:
        if writer is not None:
            try:
                writer.close()
            except Exception:  # pragma: no cover - best effort cleanup
                pass
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


# ---- reading ------------------------------------------------------------------------------------

@dataclass
class RequestTrace:
    """The routing of one request: `experts[token, layer, k]`, prompt tokens first."""

    request_id: int
    prompt_len: int
    decode_len: int
    layers: int
    experts: np.ndarray                 # [tokens, layers, top_k] int16, gate-score order
    pre_attn: np.ndarray | None = None  # [tokens, layers, dim] float16
    scores: np.ndarray | None = None    # [tokens, layers, width] float32

    @property
    def tokens(self) -> int:
        return self.prompt_len + self.decode_len


_ERRORS = (pa.ArrowException, OSError, ValueError, EOFError)


def _int_type(t) -> bool:
    return pa.types.is_integer(t)


class TraceReader:
    """Streaming reader of a trace file. `meta` is checked when opened; rows when iterated."""

    def __init__(self, path):
        self.path = Path(path)
        self.file = str(path)
        if not self.path.is_file():
            raise InputError("trace file not found", file=self.file)
        try:
            self._pf = pq.ParquetFile(self.path)
            schema = self._pf.schema_arrow
        except _ERRORS as e:
            raise InputError(f"not a readable Parquet file (truncated or corrupt?): {_short(e)}",
                             file=self.file) from None
        self.meta = TraceMeta.from_metadata(schema.metadata, self.file)
        self._check_schema(schema)
        self.num_rows = self._pf.metadata.num_rows
        self.num_row_groups = self._pf.metadata.num_row_groups
        self.has_scores = "scores" in schema.names
        self.has_pre_attn = "pre_attn" in schema.names

    def __repr__(self) -> str:
        return f"TraceReader({self.file!r}, rows={self.num_rows}, meta={self.meta})"

    def _check_schema(self, schema: pa.Schema) -> None:
        for c in REQUIRED_COLUMNS:
            if c not in schema.names:
                raise InputError("missing column", file=self.file, field=c)

        def want(name, ok, expected):
            if name in schema.names and not ok(schema.field(name).type):
                raise InputError(f"expected {expected}, found {schema.field(name).type}", file=self.file, field=name)

        is_list = lambda t: pa.types.is_list(t) or pa.types.is_large_list(t)  # noqa: E731
        want("request_id", _int_type, "int32")
        want("token", _int_type, "int32")
        want("layer", _int_type, "int16")
        want("phase", lambda t: pa.types.is_string(t) or pa.types.is_large_string(t)
             or (pa.types.is_dictionary(t) and pa.types.is_string(t.value_type)), "dictionary<int8, string>")
        want("experts", lambda t: is_list(t) and _int_type(t.value_type), "list<int16>")
        want("scores", lambda t: is_list(t) and pa.types.is_floating(t.value_type), "list<float32>")
        want("pre_attn", lambda t: is_list(t) and pa.types.is_floating(t.value_type), "list<float16>")

    # -- whole-file helpers (small traces, tests) --
    def read_table(self) -> pa.Table:
        try:
            return self._pf.read()
        except _ERRORS as e:
            raise InputError(f"cannot be read (truncated or corrupt?): {_short(e)}", file=self.file) from None

    # -- streaming --
    def iter_requests(self, pre_attn: bool | None = None, scores: bool | None = None) -> Iterator[RequestTrace]:
        """Yield one RequestTrace per request, in file order, reading BATCH_ROWS rows at a time.

        `pre_attn`/`scores`: read those columns (default: when the file has them).
        """
        want_pre = self.has_pre_attn if pre_attn is None else (pre_attn and self.has_pre_attn)
        want_sc = self.has_scores if scores is None else (scores and self.has_scores)
        if pre_attn and not self.has_pre_attn:
            raise InputError("column not in this trace (needed by the pre-attention predictor)", file=self.file,
                             field="pre_attn")
        cols = list(REQUIRED_COLUMNS) + [c for c, on in (("scores", want_sc), ("pre_attn", want_pre)) if on]
        carry: dict | None = None
        base = 0  # global row index of the first row of the next batch
        widths: dict[str, int] = {}
        batches = self._pf.iter_batches(batch_size=BATCH_ROWS, columns=cols)
        while True:
            try:
                batch = next(batches, None)
            except _ERRORS as e:
                raise InputError(f"rows from {base} cannot be read (truncated or corrupt file?): {_short(e)}",
                                 file=self.file) from None
            if batch is None:
                break
            tbl = pa.Table.from_batches([batch])
            if tbl.num_rows == 0:
                continue
            chunk = self._decode(tbl, base, widths)
            base += tbl.num_rows
            work = chunk if carry is None else {k: np.concatenate([carry[k], chunk[k]]) for k in chunk if k != "base"}
            work["base"] = chunk["base"] if carry is None else carry["base"]
            starts = self._check_structure(work)
            # every request but the last is complete
            for i in range(len(starts) - 1):
                yield self._request(work, starts[i], starts[i + 1])
            s = starts[-1]
            carry = {k: (v[s:].copy() if isinstance(v, np.ndarray) else v) for k, v in work.items()}
            carry["base"] = work["base"] + s
        if carry is not None:
            yield self._request(carry, 0, len(carry["rid"]))

    def __iter__(self):
        return self.iter_requests()

    # -- internals --
    def _err(self, msg: str, field: str | None = None) -> InputError:
        return InputError(msg, file=self.file, field=field)

    def _decode(self, tbl: pa.Table, base: int, widths: dict) -> dict:
        """Columns of one batch as numpy arrays, with every per-row check done."""
        L, E, K = self.meta.num_layers, self.meta.num_experts, self.meta.top_k
        n = tbl.num_rows
        out: dict = {"base": base}
        for name in tbl.column_names:
            col = tbl.column(name)
            if col.null_count:
                bad = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
                raise self._err(f"row {base + bad}: null value", name)
        for name, key in (("request_id", "rid"), ("token", "tok"), ("layer", "lay")):
            out[key] = tbl.column(name).to_numpy().astype(np.int64, copy=False)
        tok, lay = out["tok"], out["lay"]
        bad = np.flatnonzero(tok < 0)
        if bad.size:
            raise self._err(f"row {base + bad[0]}: token must be >= 0, found {tok[bad[0]]}", "token")
        bad = np.flatnonzero((lay < 0) | (lay >= L))
        if bad.size:
            raise self._err(f"row {base + bad[0]}: layer out of range: expected 0..{L - 1} (num_layers={L}), "
                            f"found {lay[bad[0]]}", "layer")
        out["pre"] = self._phase(tbl.column("phase"), base)
        # experts: fixed length top_k, ids in range, no duplicates within a row
        ex = tbl.column("experts").combine_chunks()
        lens = pc.list_value_length(ex).to_numpy(zero_copy_only=False)
        bad = np.flatnonzero(lens != K)
        if bad.size:
            raise self._err(f"row {base + bad[0]}: expected {K} experts (top_k), found {lens[bad[0]]}", "experts")
        flat = pc.list_flatten(ex)
        if flat.null_count:
            bad = int(np.flatnonzero(flat.is_null().to_numpy(zero_copy_only=False))[0]) // K
            raise self._err(f"row {base + bad}: null expert id", "experts")
        vals = flat.to_numpy().astype(np.int64, copy=False)
        badv = np.flatnonzero((vals < 0) | (vals >= E))
        if badv.size:
            r = badv[0] // K
            raise self._err(f"row {base + r}: expert id out of range: expected 0..{E - 1} (num_experts={E}), "
                            f"found {vals[badv[0]]}", "experts")
        experts = vals.astype(np.int16).reshape(n, K)
        if K > 1:
            srt = np.sort(experts, axis=1)
            dup = np.flatnonzero((srt[:, 1:] == srt[:, :-1]).any(axis=1))
            if dup.size:
                r = dup[0]
                raise self._err(f"row {base + r}: duplicate expert within a row: {experts[r].tolist()}", "experts")
        out["experts"] = experts
        for name, dtype in (("scores", np.float32), ("pre_attn", np.float16)):
            if name in tbl.column_names:
                out[name] = self._fixed_list(tbl.column(name), name, dtype, base, widths)
        return out

    def _phase(self, col: pa.ChunkedArray, base: int) -> np.ndarray:
        """bool array: True for prefill rows; unknown values are an error."""
        parts, off = [], 0
        for chunk in col.chunks:
            if pa.types.is_dictionary(chunk.type):
                dic = chunk.dictionary.to_pylist()
                code = np.array([1 if v == "prefill" else 0 if v == "decode" else -1 for v in dic] or [-1],
                                dtype=np.int8)
                idx = chunk.indices.to_numpy(zero_copy_only=False).astype(np.int64)
                vals = code[idx]
                bad = np.flatnonzero(vals < 0)
                if bad.size:
                    raise self._err(f"row {base + off + bad[0]}: unknown phase: expected 'prefill' or 'decode', "
                                    f"found {dic[idx[bad[0]]]!r}", "phase")
                parts.append(vals == 1)
            else:
                pre = pc.equal(chunk, "prefill").to_numpy(zero_copy_only=False)
                dec = pc.equal(chunk, "decode").to_numpy(zero_copy_only=False)
                bad = np.flatnonzero(~(pre | dec))
                if bad.size:
                    raise self._err(f"row {base + off + bad[0]}: unknown phase: expected 'prefill' or 'decode', "
                                    f"found {chunk[int(bad[0])].as_py()!r}", "phase")
                parts.append(pre)
            off += len(chunk)
        return np.concatenate(parts) if parts else np.zeros(0, dtype=bool)

    def _fixed_list(self, col: pa.ChunkedArray, name: str, dtype, base: int, widths: dict) -> np.ndarray:
        arr = col.combine_chunks()
        lens = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
        w = widths.setdefault(name, int(lens[0]))
        bad = np.flatnonzero(lens != w)
        if bad.size:
            raise self._err(f"row {base + bad[0]}: expected every row to have {w} values, found {lens[bad[0]]}", name)
        flat = pc.list_flatten(arr)
        if flat.null_count:
            raise self._err(f"row {base}: null values inside the list", name)
        return flat.to_numpy(zero_copy_only=False).astype(dtype, copy=False).reshape(len(arr), w)

    def _check_structure(self, w: dict) -> np.ndarray:
        """Rows strictly sorted by (request, token, layer) and every layer of every token present.
        Returns the start index of each request in `w`."""
        L = self.meta.num_layers
        rid, tok, lay, base = w["rid"], w["tok"], w["lay"], w["base"]
        n = len(rid)
        dr, dt, dl = np.diff(rid), np.diff(tok), np.diff(lay)
        ok = (dr > 0) | ((dr == 0) & ((dt > 0) | ((dt == 0) & (dl > 0))))
        bad = np.flatnonzero(~ok)
        if bad.size:
            j = bad[0] + 1
            here, prev = (rid[j], tok[j], lay[j]), (rid[j - 1], tok[j - 1], lay[j - 1])
            what = "duplicate row" if here == prev else "rows not sorted by (request_id, token, layer)"
            field = "request_id" if rid[j] != rid[j - 1] else "token" if tok[j] != tok[j - 1] else "layer"
            raise self._err(f"row {base + j}: {what}: {_key(here)} follows {_key(prev)} (requests must be "
                            f"contiguous)", field)
        starts = np.concatenate([[0], np.flatnonzero(dr != 0) + 1])
        seg = np.repeat(starts, np.diff(np.concatenate([starts, [n]])))
        pos = np.arange(n) - seg
        et, el = pos // L, pos % L
        bad = np.flatnonzero((tok != et) | (lay != el))
        if bad.size:
            j = bad[0]
            r = rid[j]
            if el[j] != 0:
                raise self._err(f"row {base + j}: request {r} token {et[j]}: missing layer {el[j]} "
                                f"(expected layers 0..{L - 1} for every token)", "layer")
            raise self._err(f"row {base + j}: request {r}: missing token {et[j]} (found token {tok[j]}; expected "
                            f"tokens 0, 1, 2, ... each with layers 0..{L - 1})", "token")
        # complete requests (all but the last) must end on a full token
        ends = np.concatenate([starts[1:], [n]])
        lens = ends - starts
        bad = np.flatnonzero(lens[:-1] % L)
        if bad.size:
            i = bad[0]
            j = ends[i] - 1
            raise self._err(f"row {base + j}: request {rid[j]} token {tok[j]}: missing layer {lay[j] + 1} "
                            f"(expected layers 0..{L - 1} for every token)", "layer")
        return starts

    def _request(self, w: dict, s: int, e: int) -> RequestTrace:
        L, K = self.meta.num_layers, self.meta.top_k
        base = w["base"]
        rid = int(w["rid"][s])
        n = e - s
        if n % L:
            j = e - 1
            raise self._err(f"row {base + j}: request {rid} token {w['tok'][j]}: missing layer {w['lay'][j] + 1} "
                            f"(expected layers 0..{L - 1} for every token)", "layer")
        T = int(n // L)
        pre = w["pre"][s:e].reshape(T, L)
        tok_pre = pre[:, 0]
        mixed = np.flatnonzero((pre != tok_pre[:, None]).any(axis=1))
        if mixed.size:
            t = mixed[0]
            raise self._err(f"row {base + s + t * L}: request {rid} token {t}: phase differs between layers",
                            "phase")
        prompt = int(tok_pre.sum())
        if prompt == 0:
            raise self._err(f"row {base + s}: request {rid} has no prefill tokens (expected the prompt first)",
                            "phase")
        if not tok_pre[:prompt].all():
            t = int(np.flatnonzero(~tok_pre)[0])
            raise self._err(f"row {base + s + t * L}: request {rid}: prefill token after a decode token "
                            f"(expected prompt tokens first)", "phase")
        experts = w["experts"][s:e].reshape(T, L, K).copy()
        out = RequestTrace(rid, prompt, int(T - prompt), int(L), experts)
        if "pre_attn" in w:
            out.pre_attn = w["pre_attn"][s:e].reshape(T, L, -1).copy()
        if "scores" in w:
            out.scores = w["scores"][s:e].reshape(T, L, -1).copy()
        return out


def _key(k) -> str:
    return f"(request_id={k[0]}, token={k[1]}, layer={k[2]})"


def _short(e: BaseException) -> str:
    s = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return s[:200]


def read_requests(path, **kw) -> list[RequestTrace]:
    """Every request of a (small) trace, in memory."""
    return list(TraceReader(path).iter_requests(**kw))


def check_against_model(meta: TraceMeta, spec, file: str | None = None) -> None:
    """InputError when the trace's routing shape disagrees with the ModelSpec."""
    for name in ("num_layers", "num_experts", "top_k"):
        found, expected = getattr(meta, name), getattr(spec, name)
        if found != expected:
            raise InputError(f"trace disagrees with model {spec.name!r}: expected {name}={expected}, "
                             f"found {name}={found} (trace model {meta.model!r})", file=file,
                             field=f"moesim.{name}")


def file_sha256(path) -> str:
    """Hex sha256 of a file's bytes (read in 1 MiB chunks): what a checkpoint or fitted preset
    records of the trace it came from."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
